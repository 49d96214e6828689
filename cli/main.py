"""Entry point: one Typer app; every failure becomes one line on stderr with a meaningful exit code.

Exit codes: 0 success; 1 a CI gate failed or an internal error; 2 bad input (nothing written);
130 interrupted.
"""

from __future__ import annotations

import os
import sys

from . import interrupts

if __name__ == "__main__" or os.path.basename(sys.argv[0] or "") == "compress":
    interrupts.watch()  # before the heavy imports: Ctrl-C during them is handled too

import errno  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import signal  # noqa: E402
import traceback  # noqa: E402

import typer  # noqa: E402

from compressor import provenance  # noqa: E402
from compressor.errors import GateFailed, UserError  # noqa: E402

app = typer.Typer(
    name="compress", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Prune, fine-tune, export and profile vision models; prove the speedup on the machine you deploy on.",
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
          strict: bool = typer.Option(False, "--strict", help="Refuse a model directory built from your own code "
                                      "(package.module:factory) whose module file changed since it was written "
                                      "(default: load it with a warning naming both hashes).")):
    """Prune, fine-tune, export and profile vision models; prove the speedup on the machine you deploy on."""
    from compressor.models import user_code

    user_code.set_strict(strict)


@functools.cache
def _register() -> None:
    """Every command (they import torch & co.): done inside run(), where Ctrl-C is handled; once."""
    from . import compare, demo, export, finetune, info, optimize, package, profile, prune, trust

    app.command("demo")(demo.demo)
    app.add_typer(prune.app, name="prune")
    app.command("finetune")(finetune.finetune)
    app.command("export")(export.export)
    app.command("profile")(profile.profile)
    app.command("compare")(compare.compare)
    app.command("package")(package.package)
    app.command("optimize")(optimize.optimize)
    app.command("info")(info.info)
    app.command("trust")(trust.trust)




def application() -> typer.Typer:
    """The Typer app with every command registered (for tests and documentation tools)."""
    _register()
    return app


def as_flags(msg: str) -> str:
    """The library names options in backticks (`min_width_fraction`); on the command line they are flags
    (--min-width-fraction)."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: "--" + m.group(1).replace("_", "-"), msg)


def _err(msg: str) -> None:
    print(f"error: {as_flags(msg)}", file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        _register()
        with provenance.running(shlex.join(["compress", *args])):  # run records quote the command that made them
            rv = app(args=args, prog_name="compress", standalone_mode=False)
        if rv == 130:  # Typer turns KeyboardInterrupt into exit 130; a command may have said more already
            interrupts.report()
        return rv if isinstance(rv, int) else 0
    except (typer.Abort, KeyboardInterrupt):
        interrupts.report()
        return 130
    except typer.TyperException as e:  # usage errors (Typer vendors click; its exceptions derive from this)
        msg = e.format_message() if hasattr(e, "format_message") else str(e)
        _err(msg.replace("\n", " "))
        return 2
    except UserError as e:
        if debug:
            traceback.print_exc()
        _err(str(e).replace("\n", " "))
        return 2
    except GateFailed as e:
        print(f"gate failed: {as_flags(str(e))}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system said no: one line naming the file and why
        if debug:
            traceback.print_exc()
        where = f" ({e.filename})" if e.filename else ""
        reason = e.strerror or type(e).__name__
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EIO):
            _err(f"writing failed: {reason}{where}; nothing was finished")
            return 1
        _err(f"{reason}{where}")
        return 2
    except Exception as e:  # anything else is our bug: one line unless --debug
        if interrupts.interrupted.is_set():  # Ctrl-C inside an import surfaces as ImportError('initialization failed') & co.
            interrupts.report()
            return 130
        from compressor.atomic import disk_error

        full = disk_error(e)
        if full is not None:  # a writer that did not name its path still fails in one line
            if debug:
                traceback.print_exc()
            _err(f"writing failed: {full.strerror}{f' ({full.filename})' if full.filename else ''}; nothing was finished")
            return 1
        if debug:
            traceback.print_exc()
        else:
            _err(f"internal error ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); rerun with --debug for the traceback")
        return 1


def main() -> None:
    interrupts.watch()
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit then fails the write (EFBIG) instead of killing us
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.exit(run())


if __name__ == "__main__":
    main()
