"""Files on disk: one-line errors for bad input files, output locations checked before any long work, and what a
run writes given ordinary permissions.

`check_output_dir` / `check_output_file` prove that a location can be written (a directory is created and removed
again in its nearest existing ancestor) without leaving anything behind; `read_json` reads a JSON file or raises a
`FileError` naming it; `ordinary_permissions` undoes the private 0600 / 0700 modes of `tempfile.mkstemp` /
`mkdtemp` (the umask applies instead, as for any file the user creates).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

__all__ = ["atomic_write", "FileError", "check_output_dir", "check_output_file", "read_json", "ordinary_permissions"]


class FileError(ValueError):
    """A file or folder that cannot be read or written as expected; the message names the flag or the file."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """Raise FileError unless the directory `path` exists or can be created, and files can be written in it."""
    target = Path(os.path.expanduser(path)).absolute()
    if target.exists() and not target.is_dir():
        raise FileError(f"{flag}: {path} is a file; expected a directory")
    base = _nearest_existing(target)
    if not base.is_dir():
        raise FileError(f"{flag}: cannot create {path}: {base} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".gptaq-write-test.", dir=base))
    except OSError as e:
        raise FileError(f"{flag}: cannot write {path}: {base} is not writable ({e.strerror or e}); "
                        "expected a writable location") from None


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Raise FileError unless the file `path` can be written (its directory exists or can be created)."""
    target = Path(os.path.expanduser(path)).absolute()
    if target.is_dir():
        raise FileError(f"{flag}: {path} is a directory; expected a file path")
    check_output_dir(target.parent, flag)


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """The JSON value in `path`; a FileError naming the file and `expected` (what it should hold) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileError(f"{path} does not exist; expected {expected}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileError(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                        f"expected {expected}") from None


def ordinary_permissions(path: str | os.PathLike) -> None:
    """Modes 0666 / 0777 minus the umask for `path` and, when it is a directory, the entries directly in it
    (mkstemp / mkdtemp and safetensors make them private)."""
    path = Path(path)
    mask = _umask()
    if path.is_dir():
        for entry in path.iterdir():
            if not entry.is_symlink():
                os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = False,
                 fsync: bool = False) -> Path:
    """Create `path` atomically: write(f) into a temporary file beside it (opened "w" or "wb"), optionally
    fsync it, give it ordinary permissions and os.replace it onto `path`; on any failure the temporary file is
    removed and `path` is left as it was.  Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
