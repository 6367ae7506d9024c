"""The files of a run directory: written so that a reader sees each whole or not at all, and trained by one
process at a time."""
from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable

LOCK_FILE = ".lock"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename the temporary file over ``path`` (atomic on POSIX)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | Path, record: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


class EndedElsewhere(RuntimeError):
    """The run ended (failed or pruned) while this launch was on: another of its workers ran it."""


class AlreadyRunning(RuntimeError):
    """Another process holds the run directory; training it twice would duplicate the result."""


@contextmanager
def exclusive(run_dir: Path, patience_s: float = 1.0):
    """Hold RUN_DIR/.lock while the run trains (released by the OS if the process dies, even by SIGKILL).

    A lock held for less than `patience_s` (a launcher's `held_elsewhere` probe) is waited for."""
    handle = open(Path(run_dir) / LOCK_FILE, "w")
    deadline = time.monotonic() + patience_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                raise AlreadyRunning(f"{run_dir} is being trained by another process") from None
            time.sleep(0.05)
    _HELD.add(handle.fileno())
    try:
        yield
    finally:
        _HELD.discard(handle.fileno())
        handle.close()


_HELD: set[int] = set()  # descriptors of the run locks this process holds


def drop_inherited_locks() -> None:
    """In a process forked from a trainer (a data loader worker): close the inherited copies of the run's lock, so
    that the lock still dies with the trainer. Otherwise a SIGKILLed trainer's orphaned workers would hold it for
    the seconds they take to notice, and a rerun in that window would be refused as already running."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


def held_elsewhere(run_dir: Path) -> bool:
    """Whether a process (on this machine) is training the run now; creates nothing."""
    return held(Path(run_dir) / LOCK_FILE)


def hold(path: Path, note: str = "") -> IO | None:
    """Take the lock file `path` without waiting (writing `note` into it): the open handle, to close when done
    (the lock dies with the process, even by SIGKILL), or None when another process holds it."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(note)
    handle.flush()
    _HELD.add(handle.fileno())  # loader workers forked later drop their copy
    return handle


def release(handle: IO) -> None:
    _HELD.discard(handle.fileno())
    handle.close()


def held(path: Path) -> bool:
    """Whether a process holds the lock file `path`; creates nothing."""
    try:
        handle = open(path, "r")
    except OSError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False
