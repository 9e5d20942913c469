"""Where a run's output lives: a local folder, or any fsspec URL (``s3://``, ``gs://``, ...).

Every writer of the output (shard writers, manifests, ``run.json``, the report) goes through
an :class:`OutputStore`, so the same commit protocol holds on both kinds of storage:

* **data first, manifest last.** A shard's release files are published, then its manifest;
  the manifest is the commit record, and a reader (resume, report, validation) trusts a
  shard only when its manifest is there and lists files that exist.
* **no partial file is ever visible.** On a local folder a file is written to a temporary
  sibling, fsynced and renamed into place. On an object store a file is written to a local
  staging file first and uploaded with one PUT, which the store makes visible whole or not
  at all; object stores have no rename, and need none.
* **a file written twice ends as one copy.** Output bytes are deterministic, so a task that
  a cluster retries publishes the same bytes under the same name again.

Local paths keep the exact behaviour (and bytes) Veil always had. Remote stores need the
fsspec implementation of their protocol (``s3fs`` ships with Veil; ``gcsfs`` for ``gs://``).
"""

from __future__ import annotations

import os
import posixpath
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from veil.pipelines.faults import fault_point

#: Temporary names contain this marker, on every store, so a killed run's leftovers are found.
TEMP_MARKER = ".veil-tmp-"


def is_remote(location: str | os.PathLike[str]) -> bool:
    """True for a URL with a protocol other than ``file://`` (``s3://bucket/x``)."""
    text = os.fspath(location)
    if "://" not in text:
        return False
    return text.split("://", 1)[0].lower() not in ("file", "local")


def as_store(location: str | os.PathLike[str] | OutputStore) -> OutputStore:
    """The store of an output location: an :class:`OutputStore` as is, a URL as a
    :class:`FsspecStore`, anything else as a :class:`LocalStore`."""
    if isinstance(location, OutputStore):
        return location
    text = os.fspath(location)
    if is_remote(text):
        return FsspecStore(text)
    if text.startswith(("file://", "local://")):
        text = text.split("://", 1)[1]
    return LocalStore(Path(text))


def clean_relative(relative: str) -> str:
    """``relative`` as a normalised posix path inside the store; refuses absolute paths and
    ``..`` (a release must never write outside its output)."""
    text = str(relative).replace("\\", "/")
    norm = posixpath.normpath(text)
    if not text or text.startswith("/") or norm == ".." or norm.startswith("../") or norm == ".":
        raise ValueError(f"output path {relative!r} escapes the output folder")
    return norm


def temp_path(final: Path) -> Path:
    """A unique temporary sibling of ``final`` (same directory, so the rename is atomic)."""
    return final.with_name(f"{final.name}{TEMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(path: str | Path) -> None:
    """Make a rename or file creation in ``path`` durable (POSIX needs the directory synced
    too). A no-op where directories cannot be opened (Windows)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(os.fspath(path), flags)
    except (PermissionError, IsADirectoryError, FileNotFoundError):
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems do not support fsync on directories
    finally:
        os.close(fd)


class OutputStore(ABC):
    """An output root. Paths are ``/``-separated and relative to the root."""

    #: The root as the user wrote it (a folder path or a URL), for messages and records.
    url: str
    #: True for a folder of this machine: callers may then use :meth:`local_path`.
    is_local: bool

    def __reduce__(self) -> tuple[Any, ...]:
        # Workers rebuild the store from its URL (fsspec filesystems carry connections).
        return (as_store, (self.url,))

    def display(self, relative: str = "") -> str:
        """``relative`` as a full path or URL, for messages."""
        return self.url.rstrip("/") + ("/" + relative if relative else "")

    @abstractmethod
    def exists(self, relative: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, relative: str) -> bytes: ...

    @abstractmethod
    def open_read(self, relative: str) -> Any:
        """A binary file object (seekable) for reading ``relative``."""

    @abstractmethod
    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write ``relative`` so readers see the old file or the whole new one."""

    @abstractmethod
    def delete(self, relative: str) -> bool:
        """Remove a file; False when it was not there."""

    @abstractmethod
    def list_files(self, prefix: str) -> list[str]:
        """Relative paths of all files under the folder ``prefix`` (``""``: the whole
        store), sorted; empty when the folder does not exist."""

    @abstractmethod
    def delete_tree(self, prefix: str) -> None:
        """Remove the folder ``prefix`` and everything under it (no error when absent)."""

    @abstractmethod
    def staging_file(self, relative: str) -> Path:
        """A new local file to write ``relative``'s content into before :meth:`publish`."""

    @abstractmethod
    def publish(self, staged: Path, relative: str) -> None:
        """Make a staged file visible, whole, at ``relative`` (replacing any old one)."""

    def discard(self, staged: Path) -> None:
        """Forget a staged file that will not be published."""
        staged.unlink(missing_ok=True)

    @abstractmethod
    def sync(self, folder: str) -> None:
        """Make publishes and deletes in ``folder`` durable (local: fsync the directory)."""

    def local_path(self, relative: str = "") -> Path:
        raise TypeError(f"{self.url} is not a local folder")


class LocalStore(OutputStore):
    """A folder of this machine: temp sibling, fsync, rename, fsync the directory."""

    is_local = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = os.fspath(self.root)

    def __reduce__(self) -> tuple[Any, ...]:
        # A worker may run in another working directory: it gets the absolute folder.
        return (as_store, (os.fspath(self.root.absolute()),))

    def local_path(self, relative: str = "") -> Path:
        if not relative:
            return self.root
        final = self.root / clean_relative(relative)
        # Lexically inside is not enough on a local disk: a symlinked folder could lead out.
        if not final.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"output path {relative!r} escapes the output folder")
        return final

    def display(self, relative: str = "") -> str:
        return os.fspath(self.root / relative) if relative else self.url

    def exists(self, relative: str) -> bool:
        return (self.root / relative).is_file()

    def read_bytes(self, relative: str) -> bytes:
        return (self.root / relative).read_bytes()

    def open_read(self, relative: str) -> Any:
        return open(self.root / relative, "rb")  # noqa: SIM115 - the caller closes it

    def write_bytes(self, relative: str, data: bytes) -> None:
        staged = self.staging_file(relative)
        try:
            with open(staged, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            fault_point(f"write:{posixpath.basename(relative)}")
            self.publish(staged, relative)
        except BaseException:
            staged.unlink(missing_ok=True)
            raise
        self.sync(posixpath.dirname(relative))

    def delete(self, relative: str) -> bool:
        try:
            (self.root / relative).unlink()
        except FileNotFoundError:
            return False
        return True

    def list_files(self, prefix: str) -> list[str]:
        folder = self.root / prefix
        if not folder.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in folder.rglob("*") if p.is_file())

    def delete_tree(self, prefix: str) -> None:
        shutil.rmtree(self.root / prefix, ignore_errors=True)

    def staging_file(self, relative: str) -> Path:
        final = self.local_path(relative)
        final.parent.mkdir(parents=True, exist_ok=True)
        return temp_path(final)

    def publish(self, staged: Path, relative: str) -> None:
        os.replace(staged, self.root / relative)

    def sync(self, folder: str) -> None:
        fsync_dir(self.root / folder)


class FsspecStore(OutputStore):
    """Any fsspec filesystem by URL; built for object stores (one PUT per file, no rename).

    Files are staged in a local temporary folder and uploaded whole on publish. Listings are
    never cached: a resume must see what another process committed a moment ago.
    """

    is_local = False

    def __init__(self, url: str) -> None:
        import fsspec.core

        self.url = url.rstrip("/")
        protocol = url.split("://", 1)[0]
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, use_listings_cache=False)
        except ImportError as exc:
            raise ImportError(f"output {url!r} needs the fsspec filesystem for {protocol}:// "
                              f"({exc}); install it (e.g. pip install gcsfs for gs://)") from exc
        except TypeError:  # a filesystem without the listings-cache option
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self._staging: Path | None = None

    def _full(self, relative: str) -> str:
        return f"{self.root}/{clean_relative(relative)}"

    def exists(self, relative: str) -> bool:
        return bool(self.fs.isfile(self._full(relative)))

    def read_bytes(self, relative: str) -> bytes:
        return bytes(self.fs.cat_file(self._full(relative)))

    def open_read(self, relative: str) -> Any:
        return self.fs.open(self._full(relative), "rb")

    def write_bytes(self, relative: str, data: bytes) -> None:
        fault_point(f"write:{posixpath.basename(relative)}")
        self.fs.pipe_file(self._full(relative), bytes(data))

    def delete(self, relative: str) -> bool:
        full = self._full(relative)
        # S3 answers a DELETE of a missing key with success: ask first.
        if not self.fs.isfile(full):
            return False
        try:
            self.fs.rm_file(full)
        except FileNotFoundError:
            return False
        return True

    def list_files(self, prefix: str) -> list[str]:
        base = self._full(prefix) if prefix else self.root
        try:
            found = self.fs.find(base)
        except FileNotFoundError:
            return []
        strip = len(self.root) + 1
        # Object stores list "folder markers" (keys ending in /) that are not files.
        return sorted(p[strip:] for p in found if not p.endswith("/") and p.startswith(base + "/"))

    def delete_tree(self, prefix: str) -> None:
        files = self.list_files(prefix)
        if files:
            self.fs.rm([self._full(f) for f in files])

    def staging_file(self, relative: str) -> Path:
        if self._staging is None or not self._staging.is_dir():
            self._staging = Path(tempfile.mkdtemp(prefix="veil-staging-"))
        name = posixpath.basename(clean_relative(relative))
        return self._staging / f"{name}{TEMP_MARKER}{secrets.token_hex(6)}"

    def publish(self, staged: Path, relative: str) -> None:
        self.fs.put_file(os.fspath(staged), self._full(relative))
        staged.unlink(missing_ok=True)

    def sync(self, folder: str) -> None:
        return None  # a completed PUT is durable
