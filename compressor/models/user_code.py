"""Architectures from the user's own code: `--model package.module:factory`.

The factory is imported as `python -m` would import it (the working directory first on the path), called
with the `--model-arg` keyword arguments, and recorded in model.json with its module's file hash and
version, so a pruned directory is rebuilt from the same code without pickles.

A model.json is data: reading one never imports the module it names on its own authority. A factory
runs only once the user has named it on this machine (on the command line or through the Python API),
which adds it to a small trust list, as Jupyter keeps the notebooks a user trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..errors import UserError

SOURCE = "python"
RESERVED = ("compress", "torchvision", "timm")
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_warned: set[tuple[str, str]] = set()
_settings = {"strict": False}


def set_strict(strict: bool) -> None:
    """Refuse (instead of warning about) a module whose file changed since a directory was written."""
    _settings["strict"] = bool(strict)


def is_factory_spec(name: str) -> bool:
    """`module:attribute` with a module that is not a library source (`timm:resnet18` is a library name)."""
    module, sep, attr = name.partition(":")
    return bool(sep) and module not in RESERVED and bool(_DOTTED.match(module)) and bool(_DOTTED.match(attr))


def split(name: str) -> tuple[str, str]:
    module, sep, attr = name.partition(":")
    if not sep or not _DOTTED.match(module) or not _DOTTED.match(attr):
        raise UserError(f"'{name}' is not a factory spec: use package.module:function (e.g. mynets.models:build)")
    return module, attr


# ----------------------------------------------------------------------------- trust list
def _trust_file() -> Path:
    base = os.environ.get("COMPRESS_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share"), "compress")
    return Path(base) / "trusted-factories.json"


def trusted() -> set[str]:
    try:
        data = json.loads(_trust_file().read_text())
    except (OSError, ValueError):
        return set()
    return {s for s in data.get("factories", []) if isinstance(s, str)} if isinstance(data, dict) else set()


def trust(name: str) -> None:
    """Remember that the user named this factory (atomic write; a read-only home only loses the memory)."""
    from .. import atomic

    split(name)
    have = trusted()
    if name in have:
        return
    with contextlib.suppress(OSError):  # a read-only home: the factory still runs now; a later reload asks again
        atomic.write_json(_trust_file(), {"factories": sorted(have | {name})})


def _check_trusted(name: str) -> None:
    if name not in trusted():
        raise UserError(f"model.json names Python code ({name}) that was never named on this machine; reading a model "
                        f"directory does not run code on its own: name the factory once, e.g. "
                        f"`compress trust {name}` (or give it as `model` to any command), then load the directory again")


# ----------------------------------------------------------------------------- import and call
def _import(module: str):
    # `python -m` puts the working directory first on the path; console scripts do not.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise UserError(f"cannot import '{module}': no such module on the Python path (run from the directory that "
                            "holds the package, install it, or set PYTHONPATH)") from None
        raise UserError(f"importing '{module}' failed: {e}") from None
    except Exception as e:  # the user's module raised while importing
        raise UserError(f"importing '{module}' failed: {type(e).__name__}: {_first(e)}") from None


def factory(name: str) -> Callable[..., Any]:
    module, attr = split(name)
    mod = _import(module)
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"'{module}' has no attribute '{attr}' (from `model` {name})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{name} is not callable; `model` needs a function or class that returns an nn.Module")
    return obj


def accepts(fn: Callable[..., Any], keyword: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def fingerprint(name: str) -> dict[str, Any]:
    """The file and version of the factory's module, recorded so a later reload notices edited code."""
    module, _ = split(name)
    mod = _import(module)
    path = getattr(mod, "__file__", None)
    digest = None
    if path and os.path.isfile(path):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    root = module.split(".")[0]
    version = getattr(sys.modules.get(root), "__version__", None)
    if version is None:
        try:
            from importlib.metadata import PackageNotFoundError, version as dist_version

            try:
                version = dist_version(root)
            except PackageNotFoundError:
                version = None
        except ImportError:  # pragma: no cover
            version = None
    return {"module": module, "file": path, "sha256": digest, "version": None if version is None else str(version)}


def check_fingerprint(name: str, recorded: dict[str, Any] | None) -> None:
    """Warn once per module (or refuse when strict) if its file changed since the directory was written."""
    if not recorded or not recorded.get("sha256"):
        return
    now = fingerprint(name)
    if now["sha256"] == recorded["sha256"]:
        return
    msg = (f"the module of {name} changed since this model directory was written (file {now['file']}: sha256 "
           f"{str(recorded['sha256'])[:12]} then, {str(now['sha256'])[:12]} now)")
    if _settings["strict"]:
        raise UserError(msg + "; refused under `strict`")
    key = (name, str(now["sha256"]))
    if key not in _warned:
        _warned.add(key)
        print(f"warning: {msg}; loading it anyway (pass --strict to refuse)", file=sys.stderr)


def build(name: str, kwargs: dict[str, Any], recorded: dict[str, Any] | None = None, *, named_by_user: bool = False) -> nn.Module:
    """Call the factory; refuse one that fails or returns something other than an nn.Module."""
    if named_by_user:
        trust(name)
    else:
        _check_trusted(name)
        check_fingerprint(name, recorded)
    fn = factory(name)
    try:
        model = fn(**kwargs)
    except UserError:
        raise
    except TypeError as e:
        raise UserError(f"{name}({_kwargs(kwargs)}) failed: {_first(e)} (check `model_arg`)") from None
    except Exception as e:
        raise UserError(f"{name}({_kwargs(kwargs)}) failed: {type(e).__name__}: {_first(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{name} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _kwargs(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _first(e: BaseException) -> str:
    s = str(e)
    return s.splitlines()[0][:200] if s else type(e).__name__
