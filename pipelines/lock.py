"""One writer per output folder: ``OUT/.veil.lock``.

Two runs writing one output would interleave shards, manifests and the RELEASE.json verdict,
so every command that writes into an output folder (``veil run``, ``veil validate``, ``veil
report``) holds this lock while it writes.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic: exactly one process creates it)
and holds, as JSON, the host, pid, start time and command of its holder, who also keeps an
exclusive ``flock`` on it for as long as it runs. The kernel drops a ``flock`` when its
process dies, however it dies, so on the same host a lock file whose ``flock`` can be taken
was left by a process that is gone (its pid is checked too, for the message) and is taken
over, with a log line. A lock held by a live process, or written by another host (whose
processes cannot be checked from here), is refused with :class:`OutputLockedError`, which
names the holder and says how to remove a stale lock. The file is removed when the holder
releases it (normal end or exception).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import socket
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

LOCK_FILE = ".veil.lock"
#: A lock file still empty this long after it was written is left by a process that died
#: between creating it and writing its holder (a live one takes microseconds).
_EMPTY_GRACE_S = 5.0
_ATTEMPTS = 50


class OutputLockedError(RuntimeError):
    """Another process holds (or may hold) the output's lock; the message says who and what
    to do. The CLI exits with status 2."""


def lock_path(output: str | Path) -> Path:
    return Path(output) / LOCK_FILE


def _flock(fd: int) -> bool | None:
    """Take an exclusive, non-blocking ``flock``: True taken, False held by another open
    file, None where the filesystem or platform has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP...: no flock here; the pid check decides


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return True
    return True


def describe_holder(info: dict[str, Any]) -> str:
    return (f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started "
            f"{info.get('started', '?')}, command: {info.get('command', '?')}")


class OutputLock:
    """The lock of one output folder; use as a context manager (or :meth:`acquire` and
    :meth:`release`). ``command`` is recorded for whoever finds the lock (default: argv)."""

    def __init__(self, output: str | Path, *, command: str | None = None) -> None:
        text = os.fspath(output)
        if "://" in text:
            raise OutputLockedError(
                f"cannot lock output {text!r}: it is a URL, and only a local folder can be "
                f"locked against a second writer; write to a local folder, then copy the "
                f"release")
        self.output = Path(text)
        self.path = lock_path(self.output)
        self.command = command if command is not None else shlex.join(sys.argv)
        self.info: dict[str, Any] = {}
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this lock is already held")
        if not self.output.is_dir():
            raise FileNotFoundError(f"output folder {os.fspath(self.output)!r} does not exist")
        for _attempt in range(_ATTEMPTS):
            if self._create():
                return self
            if self._take_over_if_stale():
                continue  # the stale file is gone: create ours
            time.sleep(0.1)  # the holder is between creating and writing the file
        raise OutputLockedError(f"could not take the lock {self.path}: it keeps changing "
                                f"hands; is another Veil command starting on this output?")

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                         | getattr(os, "O_CLOEXEC", 0), 0o644)
        except FileExistsError:
            return False
        # A process looking at the new, still empty file may hold its flock for a moment
        # (it then waits, since an empty file is being written): retry until it lets go.
        deadline = time.monotonic() + _EMPTY_GRACE_S
        while _flock(fd) is False:
            if time.monotonic() > deadline:
                os.close(fd)
                self.path.unlink(missing_ok=True)
                raise OutputLockedError(f"could not flock the new lock file {self.path}")
            time.sleep(0.01)
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.now(UTC).isoformat(timespec="seconds"),
                     "command": self.command}
        try:
            os.write(fd, json.dumps(self.info, sort_keys=True).encode() + b"\n")
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd = fd
        return True

    def _take_over_if_stale(self) -> bool:
        """Look at the existing lock file: True when it was stale and has been removed; False
        when it must be waited for (being written); raises when it is held."""
        try:
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return True  # released meanwhile
        try:
            flocked = _flock(fd)
            raw = os.read(fd, 1 << 16)
            try:
                info = json.loads(raw.decode("utf-8"))
                if not isinstance(info, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                if flocked is False:
                    self._refuse({}, "it is held by a live process")
                age = time.time() - os.fstat(fd).st_mtime
                if age < _EMPTY_GRACE_S:
                    return False
                info = {}
            same_host = info.get("host") == socket.gethostname()
            pid = info.get("pid")
            if flocked is False:
                self._refuse(info, "it is held by a live process")
            if info and not same_host:
                self._refuse(info, "it was taken on another host, whose processes cannot be "
                                   "checked from here")
            alive = isinstance(pid, int) and _pid_alive(pid)
            if flocked is None and alive:
                self._refuse(info, f"process {pid} is running (this filesystem has no flock "
                                   f"to tell whether it still holds the lock)")
            # flock taken (or none here and the pid is gone): the holder has died.
            if not self._same_file(fd):
                return True  # someone else replaced it meanwhile: look again
            why = ("pid reused by another process" if alive else "process not running")
            log.warning("taking over stale lock %s (%s; %s)", self.path,
                        describe_holder(info) if info else "holder never written", why)
            self.path.unlink(missing_ok=True)
            return True
        finally:
            os.close(fd)  # closing drops our flock on the old file

    def _same_file(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _refuse(self, info: dict[str, Any], why: str) -> None:
        holder = describe_holder(info) if info else "holder not recorded"
        raise OutputLockedError(
            f"output {os.fspath(self.output)!r} is locked by another Veil command ({why}): "
            f"{holder}. Wait for it to finish. If no Veil command is using this folder (it "
            f"was killed, or its machine rebooted), delete {os.fspath(self.path)!r} and rerun.")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            # Remove the file only if it is still ours; unlink before closing, so the flock
            # covers the removal.
            if self._same_file(fd):
                self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()



class ObjectStoreLock:
    """The lock of an output on an object store (``s3://...``): ``OUT/.veil.lock`` created
    with a conditional PUT that fails when the object exists (``If-None-Match: *``), so
    exactly one writer gets it. A remote holder's process cannot be checked from here, so a
    lock is never taken over: the error names the holder and the object to delete when that
    command is gone (killed, or its machine lost)."""

    def __init__(self, output: str, *, command: str | None = None) -> None:
        from veil.pipelines.storage import as_store

        self.store = as_store(output)
        self.path = self.store.display(LOCK_FILE)
        self.command = command if command is not None else shlex.join(sys.argv)
        self.info: dict[str, Any] = {}
        self.held = False

    def acquire(self) -> ObjectStoreLock:
        if self.held:
            raise RuntimeError(f"{self.path}: this lock is already held")
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.now(UTC).isoformat(timespec="seconds"), "command": self.command}
        store: Any = self.store
        try:
            with store.fs.open(store._full(LOCK_FILE), "xb") as fh:
                fh.write(json.dumps(info, sort_keys=True).encode() + b"\n")
        except FileExistsError:
            try:
                holder = json.loads(self.store.read_bytes(LOCK_FILE))
            except (OSError, ValueError):
                holder = {}
            raise OutputLockedError(
                f"output {self.store.url!r} is locked by another Veil command: "
                f"{describe_holder(holder) if isinstance(holder, dict) and holder else 'holder not recorded'}. "
                f"Wait for it to finish. If no Veil command is using this output (it was killed, "
                f"or its machine was lost), delete {self.path!r} and rerun.") from None
        self.info = info
        self.held = True
        return self

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            current = json.loads(self.store.read_bytes(LOCK_FILE))
        except (OSError, ValueError):
            return
        if current == self.info:  # still ours
            self.store.delete(LOCK_FILE)

    def __enter__(self) -> ObjectStoreLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def output_lock(output: str | Path, *, command: str | None = None) -> OutputLock | ObjectStoreLock:
    """The lock of ``output``: a local folder's :class:`OutputLock`, or an object store's
    :class:`ObjectStoreLock` for a URL."""
    from veil.pipelines.storage import is_remote

    if is_remote(output):
        return ObjectStoreLock(os.fspath(output), command=command)
    return OutputLock(output, command=command)
