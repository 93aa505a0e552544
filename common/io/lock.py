"""One run per output directory: an exclusive lock held for the run's life.

`RunLock(directory)` takes `flock(LOCK_EX | LOCK_NB)` on `<directory>/.lock`, which records the holder's pid; a
second run on the same directory is refused with that pid.  The kernel drops the lock when its process dies, so a
killed run never leaves a stale lock.  Releasing deletes the file (and the directory, if the lock created it and
nothing else was written), so a run that stops early leaves nothing behind.  Where fcntl does not exist (Windows)
no lock is taken.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["LockError", "RunLock", "LOCK_FILE"]

LOCK_FILE = ".lock"


class LockError(ValueError):
    """Another live run holds the lock of the directory."""


class RunLock:
    """Context manager: the exclusive lock of `directory` (created if needed); `flag` names it in errors."""

    def __init__(self, directory: str | os.PathLike, flag: str = "--output_dir"):
        self.directory = Path(os.path.expanduser(directory))
        self.path = self.directory / LOCK_FILE
        self.flag = flag
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> "RunLock":
        """Take the lock (LockError naming the holder's pid when another run has it)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        missing = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._created = missing  # deepest first
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockError(f"{self.flag}: {self.directory} is in use by another run (pid {holder}); wait for it "
                                f"to finish or choose another {self.flag}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder deleted the file while releasing: lock the new one
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: a waiting run then re-opens a fresh file
        os.close(self._fd)
        self._fd = None
        for d in self._created:
            try:
                d.rmdir()  # only when empty: what the run wrote stays
            except OSError:
                break

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
