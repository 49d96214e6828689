"""Atomic output: everything is written to a temporary sibling, then renamed into place.

A crash or a kill leaves either the old file/directory or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import UserError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _prefix(path: Path) -> str:
    """Temporary siblings carry the writer's pid, so a later run can tell a killed writer's leftovers."""
    return f".{path.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(path: Path) -> None:
    """Remove what a killed writer of `path` left (SIGKILL runs no cleanup): its temporary siblings, and
    put back an old `path` that was moved aside when the kill came between the two renames."""
    with contextlib.suppress(OSError):
        for p in path.parent.glob(f".{glob.escape(path.name)}.*"):
            pid, _, rest = p.name[len(path.name) + 2:].partition(".")
            if not pid.isdigit() or not rest.endswith((".tmp", ".old")) or _alive(int(pid)):
                continue
            if rest.endswith(".old") and not path.exists():
                os.replace(p, path)
            elif p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n")


def json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# A full or size-limited disk as libraries report it: safetensors, torch.save, ONNX and OpenVINO wrap the
# OS error in their own exception types, so it is recognised by its words as well as by errno.
DISK_FULL = ((errno.ENOSPC, "no space left on device"), (errno.EFBIG, "file too large"), (errno.EDQUOT, "disk quota exceeded"))


def disk_error(e: BaseException, path: str | os.PathLike | None = None) -> OSError | None:
    """The OSError (with errno and the path) behind `e` when it is a full or size-limited disk, else None."""
    if isinstance(e, OSError) and e.errno in {code for code, _ in DISK_FULL}:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), e.filename or (None if path is None else str(path)))
    text = str(e).lower()
    for code, words in DISK_FULL:
        if words in text:
            return OSError(code, os.strerror(code), None if path is None else str(path))
    if "failed writing file" in text or "unexpected pos" in text:  # torch's stream writer, with no errno
        return OSError(errno.EIO, "write failed (full disk or file-size limit)", None if path is None else str(path))
    return None


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Every writer goes through here: a full disk becomes one OSError naming `path` (the output the user
    asked for), and the intermediate file that failed where that is another one."""
    try:
        yield
    except Exception as e:
        err = disk_error(e, path)
        if err is None:
            raise
        inner = str(err.filename or "").rpartition(", while writing ")[2]
        where = str(path) if inner in ("", str(path)) else f"{path}, while writing {inner}"
        raise OSError(err.errno, err.strerror, where) from None


@contextlib.contextmanager
def temp_path_for(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success rename it onto `path`."""
    path = Path(path)
    made = _make_parents(path)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with writing(path):
            yield tmp_path
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
        made = []
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        _remove_made(made)


def check_output_path(path: str | os.PathLike, overwrite: bool, kind: str = "dir") -> Path:
    """Refuse an output that cannot be written, before any work is done and without creating anything:
    an existing output without --overwrite, a file where a directory is wanted (or the reverse), a parent
    that is a file or not writable, a name too long for the file system."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > 255:
            raise UserError(f"output name {part[:40]}... is longer than the file system allows (255 bytes)")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} already exists (pass `overwrite` to replace it)")
    if kind == "file" and path.is_dir():
        raise UserError(f"output {path} is a directory; give a file name")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"output {path} is a file; give a directory name")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        raise UserError(f"cannot write {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK):
        raise UserError(f"cannot write to {ancestor}: permission denied")
    return path


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of `path`; return them, deepest first, so a failure can remove them."""
    made = []
    p = path.parent
    while not p.exists():
        made.append(p)
        p = p.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_made(made: list[Path]) -> None:
    for d in made:
        with contextlib.suppress(OSError):
            d.rmdir()


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and swap it into place when the block succeeds.

    An existing directory at `path` is replaced only after the new one is complete.
    """
    path = Path(path)
    made = _make_parents(path)
    sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=_prefix(path), suffix=".tmp"))
    try:
        with writing(path):
            yield tmp
            replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)  # parents made for an output that never came
        raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory `src` onto `dst`, keeping the old `dst` until the new one is in place."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=_prefix(dst), suffix=".old"))
        os.rmdir(old)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
