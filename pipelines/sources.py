"""Read input datasets as streams of WebDataset-style samples, one shard at a time.

Three input layouts are supported, each behind the same :class:`Source` interface:

* **WebDataset tar shards** (:class:`TarSource`): ``data/shard-{000..199}.tar``, a glob, a single
  ``.tar``/``.tar.gz``/``.tgz`` path or any fsspec URL (``s3://``, ``file://``, ``memory://``).
* **Parquet files** (:class:`ParquetSource`): one shard per file; the image column holds raw
  bytes or a HuggingFace ``Image`` struct ``{"bytes", "path"}``.
* **A folder tree of image files** (:class:`FolderSource`), chunked into shards of
  ``folder_shard_size`` samples.

Reading never raises for bad *data*: a shard that cannot be opened, a truncated or corrupt
archive, a sample without an image or with several images, a duplicated key... each becomes a
*quarantined* sample with a machine-readable reason, so the run carries on, the manifest lists
the problem, and none of the problem's bytes reach the release copy (fail closed). Exceptions
are kept for programming and configuration errors (an input spec that names nothing, say).
Names in the data are untrusted too: they are normalised or the sample is quarantined
(:func:`safe_relative_name`), and shown only escaped (:func:`escape_name`).

Every sample carries, besides the contract of ``veil.transforms.stage``:

``__fields__``  tuple of the data fields the *input* had, in input order; writers write exactly
                these (the image under ``__image__`` replaced by the anonymized bytes).
``__paths__``   dict field -> original member name (tar) or relative path (folder), so writers
                mirror the input names exactly (case of extensions included).
``__row__``     Parquet only: dict column -> Python value of every column except the image
                column; for a struct image column the struct's other fields (``path``) are kept
                under the image column with ``bytes`` set to ``None``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import os
import posixpath
import re
import stat
import tarfile
import unicodedata
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from veil.transforms.stage import PENDING, QUARANTINED, Sample

#: Encoded image formats Veil decodes, anonymizes and re-encodes (lower-case extensions).
#: Kept here rather than imported from ``veil.transforms.imageio`` so reading needs no image
#: libraries; the two sets must agree (a test checks it when imageio is importable).
IMAGE_EXTENSIONS: frozenset[str] = frozenset({"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp"})

#: Formats that can show a face but that Veil cannot anonymize. A sample holding one is
#: quarantined rather than having the field passed through untouched (fail closed).
UNSUPPORTED_VISUAL_EXTENSIONS: frozenset[str] = frozenset({
    "gif", "heic", "heif", "avif", "jp2", "j2k", "jpx", "jxl", "ppm", "pgm", "pbm", "pnm",
    "ico", "psd", "svg", "exr", "hdr", "dng", "cr2", "nef", "arw", "raw",
    "mp4", "mov", "avi", "mkv", "webm", "m4v", "mpg", "mpeg",
})

#: Sample fields that pipeline stages add. An input field with one of these names would be
#: overwritten by a stage and then written out as if it were input data, so sources
#: quarantine such samples, and writers never write these fields.
PIPELINE_FIELDS: frozenset[str] = frozenset({
    "status", "reason", "regions", "method", "params", "epsilon", "timings",
    "input_sha256", "output_sha256", "width", "height", "input_format", "input_mode",
    "anonymize_round", "rescan_rounds", "detect_scores", "output_path", "max_score",
    "region_counts",
})

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
_GLOB_CHARS = re.compile(r"[*?\[]")
# WebDataset's key/field split (webdataset.tariterators.base_plus_ext): the key is the member
# path up to the first "." of its basename, the field is the rest. Copied rather than imported
# because importing webdataset pulls in torch, which costs seconds in every worker.
_KEY_FIELD = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_READ_CHUNK = 1 << 20

#: Limits on names taken from input data (tar member names, folder paths). 255 bytes is the
#: per-component limit of Linux, macOS and Windows filesystems; 1024 bytes is macOS's
#: PATH_MAX, so every released name can be extracted on common systems.
MAX_NAME_COMPONENT_BYTES = 255
MAX_NAME_BYTES = 1024
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
# Bidirectional overrides reorder how a name is shown ("gpj.exe" shown as "exe.jpg"), a
# classic spoof in terminals and HTML; they have no business in a file name.
_BIDI_CONTROLS = frozenset("\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069")


def name_problem(name: str, *, path: bool = True) -> str | None:
    """Why ``name`` is not safe to show or to release as-is, or None.

    Text-level rules, shared by every name and key read from data: not valid UTF-8, control
    characters (NUL, escape sequences, newlines, line/paragraph separators), bidirectional
    overrides, and, for names that become paths (``path``), backslashes (a path separator on
    Windows).
    """
    if not name:
        return "empty name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in _BIDI_CONTROLS for c in name):
        return "control or bidirectional-override character"
    if path and "\\" in name:
        return "backslash (a Windows path separator)"
    return None


def safe_relative_name(name: str) -> str:
    """``name`` as a safe relative posix path: ``.`` components and repeated slashes dropped
    (``a/./b.jpg`` -> ``a/b.jpg``). Raises :class:`UnsafeNameError` for a name that could
    escape the folder it is extracted into or misbehave where it is shown: absolute paths,
    ``..`` components, Windows drive letters, the text rules of :func:`name_problem`, a
    component over :data:`MAX_NAME_COMPONENT_BYTES` or a name over :data:`MAX_NAME_BYTES`.
    """
    problem = name_problem(name)
    if problem:
        raise UnsafeNameError(problem)
    if name.startswith("/"):
        raise UnsafeNameError("absolute path")
    if _DRIVE_LETTER.match(name):
        raise UnsafeNameError("Windows drive letter")
    parts = name.split("/")
    if ".." in parts:
        raise UnsafeNameError("'..' component")
    normalised = "/".join(p for p in parts if p not in ("", "."))
    if not normalised:
        raise UnsafeNameError("empty after normalisation")
    if len(normalised.encode("utf-8")) > MAX_NAME_BYTES:
        raise UnsafeNameError(f"longer than {MAX_NAME_BYTES} bytes")
    if any(len(p.encode("utf-8")) > MAX_NAME_COMPONENT_BYTES for p in normalised.split("/")):
        raise UnsafeNameError(f"a component is longer than {MAX_NAME_COMPONENT_BYTES} bytes")
    return normalised


def check_release_name(name: str) -> None:
    """Raise ValueError unless ``name`` is already a safe, normalised relative name: what a
    writer checks before it puts a member or file into the release copy."""
    try:
        if safe_relative_name(name) == name:
            return
        problem = "not normalised"
    except UnsafeNameError as exc:
        problem = str(exc)
    raise ValueError(f"refusing to release a member named {escape_name(name)}: {problem}; a "
                     f"release never holds a name that escapes or misbehaves on extraction")


def escape_name(name: str, *, max_chars: int | None = 300) -> str:
    """``name`` quoted and escaped (``repr``) so that it can be shown in a manifest, a report
    or a terminal without acting on it: control characters, surrogates and overrides become
    visible ``\\x..``/``\\u..`` escapes. Cut to ``max_chars`` (None: never, for keys, which
    must stay unique)."""
    text = repr(name)
    if max_chars is None or len(text) <= max_chars:
        return text
    return text[:max_chars - 3] + "..."


class UnsafeNameError(ValueError):
    """A name taken from input data is not a safe relative path (see :func:`safe_relative_name`)."""


def split_key(name: str) -> tuple[str, str] | None:
    """Split a tar member name into ``(key, field)`` by the WebDataset convention.

    Returns None for names WebDataset ignores: no extension, or a basename starting with a dot
    (``._x.jpg`` macOS resource forks, ``.DS_Store``). The field is lower-cased.
    """
    if posixpath.basename(name).startswith("."):
        # WebDataset's regex would file "d/._x.jpg" under key "d/" as field "_x.jpg"; hidden
        # files are metadata (resource forks, .DS_Store), not sample fields.
        return None
    match = _KEY_FIELD.match(name)
    if not match:
        return None
    return match.group(1), match.group(2).lower()


def field_format(field_name: str) -> str:
    """The format part of a field name: ``"left.jpg"`` -> ``"jpg"`` (WebDataset decodes by the
    last extension, so a ``left.jpg`` field is an image)."""
    return field_name.rsplit(".", 1)[-1].lower()


def is_image_field(field_name: str) -> bool:
    return field_format(field_name) in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class Shard:
    """One unit of work: read, processed and committed as a whole.

    ``id`` is stable across runs and doubles as the output-relative path of the written shard
    (``shard-000.tar``, ``sub/part-0.parquet``); folder shards are ``folder-00000`` and their
    files keep their own relative paths.
    """

    id: str
    url: str
    kind: str
    members: tuple[str, ...] = ()

    def digest(self) -> str:
        """A content id of the shard's definition (kind, url, members). Folder shards are
        re-chunked when files are added or removed, so a resuming driver should fold this
        into the fingerprint it checks, lest it skip a shard whose members changed."""
        h = hashlib.sha256()
        for part in (self.kind, self.url, *self.members):
            h.update(part.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()


@dataclass(frozen=True)
class WorkUnit:
    """A range of one shard's samples, ``[start, stop)`` by sample index (``stop`` None: to
    the end of the shard), read by one task. Splitting a large shard into units lets several
    readers (and the workers behind them) start at once; the shard stays the unit of commit,
    so its units must be written in order and only the last one (``last``) ends the shard."""

    shard: Shard
    start: int = 0
    stop: int | None = None

    @property
    def last(self) -> bool:
        return self.stop is None

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop is None


@dataclass(frozen=True)
class Skipped:
    """An input file or member that is not part of any sample, hence not in the release copy."""

    shard: str
    path: str
    reason: str


class Source(ABC):
    """A dataset as a list of shards, each read as an ordered stream of samples."""

    kind: str = ""

    def __init__(self) -> None:
        self._skipped: list[Skipped] = []

    @abstractmethod
    def list_shards(self) -> list[Shard]:
        """All shards of the input, in a stable order."""

    @abstractmethod
    def read_shard(self, shard: Shard) -> Iterator[Sample]:
        """Stream the shard's samples in input order. Never raises for bad data: problems
        become quarantined samples with a reason."""

    def approx_num_samples(self, shard: Shard) -> int | None:
        """Number of samples in the shard when it is cheap to know (for progress bars)."""
        return None

    def work_units(self, shard: Shard, max_samples: int) -> list[WorkUnit]:
        """The shard as consecutive read units of at most ``max_samples`` samples, in order.
        Sources that cannot seek to a sample (a tar is one stream) read a shard as one unit."""
        return [WorkUnit(shard)]

    def read_unit(self, unit: WorkUnit) -> Iterator[Sample]:
        """Stream the unit's samples, exactly as :meth:`read_shard` yields them for that range
        (same keys, same ``__index__``)."""
        if not unit.whole:
            raise ValueError(f"{type(self).__name__} reads whole shards only, not samples "
                             f"{unit.start}..{unit.stop} of {unit.shard.id}")
        yield from self.read_shard(unit.shard)

    def skipped(self) -> list[Skipped]:
        """Files and members seen so far that belong to no sample and are therefore not
        released (hidden files, files with no image of the same name, symlinked directories,
        tar metadata). Folders report at listing time, tars as shards are read."""
        return list(self._skipped)

    # Helpers shared by the concrete sources -------------------------------------------------

    @staticmethod
    def _sample(shard: Shard, index: int, key: str, source: str) -> Sample:
        return {
            "__key__": key,
            "__shard__": shard.id,
            "__index__": index,
            "__image__": "",
            "__source__": source,
            "__fields__": (),
            "status": PENDING,
            "reason": "",
        }

    @classmethod
    def _quarantined(cls, shard: Shard, index: int, key: str, source: str, reason: str,
                     fields: Sequence[str] = ()) -> Sample:
        sample = cls._sample(shard, index, key, source)
        sample["__fields__"] = tuple(fields)
        sample["status"] = QUARANTINED
        sample["reason"] = reason
        return sample


def _check_fields(fields: Sequence[str]) -> tuple[str, str | None]:
    """Decide whether a sample with these data fields can be processed.

    Returns ``(image_field, None)`` when it can, ``("", reason)`` when it must be quarantined.
    Exactly one image field is required: Veil anonymizes one image per sample, and any second
    image (``seg.png``, ``right.jpg``) would otherwise be released untouched.
    """
    listed = ", ".join(fields) or "none"
    reserved = [f for f in fields if f in PIPELINE_FIELDS or f.startswith("_")]
    if reserved:
        return "", (f"reserved_field_name: field(s) {', '.join(reserved)} clash with pipeline "
                    f"fields (fields: {listed})")
    visual = [f for f in fields if field_format(f) in UNSUPPORTED_VISUAL_EXTENSIONS]
    if visual:
        return "", (f"unsupported_visual_field: {', '.join(visual)} cannot be anonymized "
                    f"(fields: {listed})")
    images = [f for f in fields if is_image_field(f)]
    if not images:
        return "", f"no_image_field: fields: {listed}"
    if len(images) > 1:
        return "", f"multiple_image_fields: {', '.join(images)} (fields: {listed})"
    return images[0], None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# -------------------------------------------------------------------------------------------
# Spec resolution and shard ids


def _suffix_kind(name: str) -> str | None:
    lower = name.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def absolute_local(url: str) -> str:
    """A local path made absolute; URLs (``s3://...``, ``file://...``) unchanged. Shards are
    read by workers whose working directory is not the driver's (Beam SDK workers, Ray nodes),
    and an unreadable shard's path is recorded in its manifest the same on every runner."""
    return url if "://" in url else os.path.abspath(url)


def _strip_protocol(url: str) -> str:
    import fsspec.core

    _protocol, path = fsspec.core.split_protocol(url)
    return path


def shard_ids(urls: Sequence[str], root: str | None = None) -> list[str]:
    """Stable, unique, output-relative ids for shard URLs.

    Relative to ``root`` when given (a directory input); otherwise the basename, or, when two
    basenames collide (``a/x.tar`` and ``b/x.tar``), the path relative to the common prefix.
    """
    paths = [_strip_protocol(u).replace(os.sep, "/") for u in urls]
    if root is not None:
        base = _strip_protocol(root).replace(os.sep, "/").rstrip("/")
        ids = [posixpath.relpath(p, base) for p in paths]
    else:
        ids = [posixpath.basename(p) for p in paths]
        if len(set(ids)) != len(ids):
            common = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
            ids = [posixpath.relpath(p, common) for p in paths]
    if len(set(ids)) != len(ids):
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"input names the same shard more than once: {', '.join(dupes[:5])}")
    bad = [i for i in ids if i.startswith("../") or i == ".." or posixpath.isabs(i)]
    if bad:
        raise ValueError(f"cannot derive output-relative shard ids for {bad[:3]}")
    return ids


def _expand(spec: str) -> list[str]:
    """Expand brace patterns (WebDataset style) and globs into a sorted list of URLs."""
    import fsspec
    from braceexpand import braceexpand

    patterns = list(braceexpand(spec)) if "{" in spec else [spec]
    urls: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS.search(_strip_protocol(pattern)):
            fs, _token, found = fsspec.get_fs_token_paths(pattern)
            urls.extend(sorted(fs.unstrip_protocol(p) if "://" in pattern else p for p in found))
        else:
            urls.append(pattern)
    return urls


def open_source(spec: str, *, image_column: str = "image", folder_shard_size: int = 1000,
                max_member_bytes: int | None = None, follow_symlinks: bool = False) -> Source:
    """Open an input spec as a :class:`Source`.

    ``spec`` is a tar/Parquet path or URL, a brace pattern or glob of them, or a directory. A
    local directory holding image files is a folder input; one holding only ``.parquet`` (or
    only tar) files is read as those shards (HuggingFace datasets keep Parquet under
    ``data/``). ``max_member_bytes`` quarantines files larger than it without reading them
    (pass ``io.max_bytes``); None reads everything. ``follow_symlinks`` lets a folder input
    read symlinked files whose targets stay inside the folder (``io.follow_symlinks``).
    """
    import fsspec

    if not spec:
        raise ValueError("input: empty input spec")
    has_pattern = "{" in spec or bool(_GLOB_CHARS.search(_strip_protocol(spec)))
    if has_pattern:
        urls = _expand(spec)
        if not urls:
            raise ValueError(f"input {spec!r}: the pattern matches no file")
        kinds = {_suffix_kind(u) for u in urls}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(f"input {spec!r}: a pattern must name only .tar/.tar.gz/.tgz or "
                             f"only .parquet files")
        kind = kinds.pop()
        if kind == "tar":
            return TarSource(urls, max_member_bytes=max_member_bytes)
        return ParquetSource(urls, image_column=image_column)

    kind = _suffix_kind(spec)
    if kind == "tar":
        return TarSource([spec], max_member_bytes=max_member_bytes)
    if kind == "parquet":
        return ParquetSource([spec], image_column=image_column)

    fs, _token, (path,) = fsspec.get_fs_token_paths(spec)
    if not fs.isdir(path):
        raise ValueError(f"input {spec!r}: not a directory, nor a .tar/.tar.gz/.tgz/.parquet "
                         f"file or pattern")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        local = path
        kind = _classify_local_dir(local)
        if kind == "folder":
            return FolderSource(local, shard_size=folder_shard_size,
                                max_member_bytes=max_member_bytes, follow_symlinks=follow_symlinks)
        found = sorted(
            os.path.join(d, f) for d, _dirs, files in os.walk(local) for f in files
            if _suffix_kind(f) == kind
        )
        if kind == "tar":
            return TarSource(found, root=local, max_member_bytes=max_member_bytes)
        return ParquetSource(found, image_column=image_column, root=local)
    # Remote directory: only shard files make sense there.
    files = sorted(fs.find(path))
    parquet = [f for f in files if _suffix_kind(f) == "parquet"]
    tars = [f for f in files if _suffix_kind(f) == "tar"]
    if parquet and not tars:
        return ParquetSource([fs.unstrip_protocol(f) for f in parquet], image_column=image_column,
                             root=fs.unstrip_protocol(path))
    if tars and not parquet:
        return TarSource([fs.unstrip_protocol(f) for f in tars], root=fs.unstrip_protocol(path),
                         max_member_bytes=max_member_bytes)
    raise ValueError(f"input {spec!r}: a remote directory must hold only tar or only Parquet "
                     f"shards; folders of images must be local")


def _classify_local_dir(root: str) -> str:
    """``folder`` if any image file is found (stopping at the first), else ``parquet`` or
    ``tar`` by the shard files found; mixed or empty inputs are errors."""
    seen: set[str] = set()
    for _dirpath, _dirs, files in os.walk(root):
        for name in files:
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            if ext in IMAGE_EXTENSIONS and not name.startswith("."):
                return "folder"
            kind = _suffix_kind(name)
            if kind:
                seen.add(kind)
    if len(seen) == 1:
        return seen.pop()
    if not seen:
        raise ValueError(f"input {root!r}: no image, tar or Parquet file found")
    raise ValueError(f"input {root!r}: holds both tar and Parquet files and no images; name "
                     f"one kind with a pattern")


# -------------------------------------------------------------------------------------------
# WebDataset tar shards


class _Recorder:
    """Read-through wrapper under ``tarfile``'s stream reader.

    It counts the bytes delivered and keeps the most recent ones, so that when ``tarfile``
    stops (it silently treats a missing end-of-archive block, a cut header and an invalid
    header alike as "no more members"), we can look at what was actually at the offset where
    the next header should have been and tell a complete archive from a truncated one.
    """

    def __init__(self, raw: BinaryIO, keep: int = 1 << 17) -> None:
        self.raw = raw
        self.pos = 0
        self.eof = False
        self._keep = keep
        self._tail = bytearray()
        self._tail_start = 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        if not data and n != 0:
            self.eof = True
        self.pos += len(data)
        self._tail += data
        if len(self._tail) > 2 * self._keep:
            drop = len(self._tail) - self._keep
            del self._tail[:drop]
            self._tail_start += drop
        return data

    def bytes_at(self, offset: int, n: int) -> bytes:
        """Bytes ``[offset, offset + n)`` of the stream, reading ahead if needed; shorter when
        the stream ends first."""
        while self.pos < offset + n and not self.eof:
            self.read(max(n, 1 << 16))
        if offset < self._tail_start:
            raise RuntimeError("tar reader lost track of its position")  # internal invariant
        start = offset - self._tail_start
        return bytes(self._tail[start:start + n])

    def drain(self) -> int:
        """Read to the end (bounded by the archive), returning the total length."""
        while not self.eof:
            self.read(1 << 20)
        return self.pos


@dataclass
class _Group:
    """Members sharing a key, accumulated until a member of another key arrives."""

    key: str  # the sample key (derived for a repeated key)
    first_member: str
    base: str = ""  # the member key this group collects
    fields: dict[str, bytes] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    raw_names: dict[str, str] = field(default_factory=dict)  # as in the archive, for reasons
    order: list[str] = field(default_factory=list)
    problem: str | None = None


def _member_kind(info: tarfile.TarInfo) -> str:
    """What a non-regular tar member is, for reasons and skip lists (link targets escaped)."""
    if info.issym():
        return f"symbolic link to {escape_name(info.linkname, max_chars=120)}"
    if info.islnk():
        return f"hard link to {escape_name(info.linkname, max_chars=120)}"
    kinds = {tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device",
             tarfile.FIFOTYPE: "FIFO"}
    return kinds.get(info.type, f"member of type {info.type!r}")


class TarSource(Source):
    """WebDataset tar shards, streamed with ``tarfile`` in ``r|`` mode over fsspec files.

    Members are grouped into samples by the WebDataset convention (key = member path up to the
    first dot of its basename, field = the rest, lower-cased); a key must form one contiguous
    run of members. Hidden members (``._x.jpg`` resource forks, ``.DS_Store``), members without
    an extension and ``__meta__`` members are not samples (WebDataset ignores most of them
    too); they are reported by :meth:`skipped` and not released.

    Archives are untrusted. Member names are normalised (``./a.jpg`` -> ``a.jpg``,
    ``a/./b.jpg`` -> ``a/b.jpg``) and the release uses the normalised names; a sample with a
    name that could escape the extraction folder or misbehave where it is shown (see
    :func:`safe_relative_name`) is quarantined as ``unsafe_name`` under its escaped key
    (``repr``), and two members naming the same file after normalisation quarantine their
    sample. Symbolic and hard links, devices and FIFOs are never followed nor released: one
    named like a sample field quarantines that sample (``link_member``/``special_member``),
    any other is listed by :meth:`skipped`.

    Damaged shards, exactly: every sample proven complete before the damage is yielded
    normally. A sample is proven complete when a member of another key (or the end-of-archive
    block) follows it, so the sample open at the cut is quarantined: with ``truncated_tar:
    member ... is cut off after N of M bytes`` when its member's data was cut, otherwise
    because it may be missing members. Then one shard-level row follows: ``<id>#truncated``
    (the stream ended before the end-of-archive block), ``<id>#corrupt`` (an invalid header
    or bad gzip data mid-shard) or ``<id>#unreadable`` (cannot open, not a tar). A key that
    reappears after other samples is quarantined as ``<key>#duplicate-<n>`` so that every
    yielded key is unique.
    """

    kind = "tar"

    def __init__(self, urls: Sequence[str], *, root: str | None = None,
                 max_member_bytes: int | None = None) -> None:
        super().__init__()
        self.urls = [absolute_local(u) for u in urls]
        self.max_member_bytes = max_member_bytes
        ids = shard_ids(self.urls, None if root is None else absolute_local(root))
        self._shards = [Shard(id=i, url=u, kind="tar") for i, u in zip(ids, self.urls, strict=True)]

    def list_shards(self) -> list[Shard]:
        return list(self._shards)

    def read_shard(self, shard: Shard) -> Iterator[Sample]:
        import fsspec

        counter = itertools.count()
        try:
            handle = fsspec.open(shard.url, "rb").open()
        except Exception as exc:  # noqa: BLE001 - any failure to open is a data problem
            yield self._quarantined(shard, next(counter), f"{shard.id}#unreadable", shard.url,
                                    f"unreadable_shard: {_describe(exc)}")
            return
        with handle:
            stream: BinaryIO = handle
            if shard.url.lower().endswith((".gz", ".tgz")):
                stream = gzip.GzipFile(fileobj=handle, mode="rb")  # type: ignore[assignment]
            yield from self._read_tar(shard, _Recorder(stream), counter)

    # The reading state machine ---------------------------------------------------------------

    def _read_tar(self, shard: Shard, rec: _Recorder, counter: Iterator[int]) -> Iterator[Sample]:
        try:
            tf = tarfile.open(fileobj=rec, mode="r|")  # type: ignore[call-overload]
        except Exception as exc:  # noqa: BLE001 - the first header could not be read
            failure = self._failure(shard, rec, exc, offset=0)
            failure["__index__"] = next(counter)
            yield failure
            return

        seen: set[str] = set()
        repeats: dict[str, int] = {}
        group: _Group | None = None
        failure: Sample | None = None
        while True:
            try:
                info = tf.next()
            except Exception as exc:  # noqa: BLE001 - a later header could not be read
                failure = self._failure(shard, rec, exc, offset=tf.offset)
                break
            if info is None:
                failure = self._end_failure(shard, rec, tf.offset)
                break
            tf.members = []  # stream mode appends every member; keep memory flat
            raw = info.name
            if info.isdir():
                continue
            # Names come from the archive's author: normalise them, and never let one that
            # could escape the extraction folder (or act on a terminal) through, nor show it
            # unescaped. Such a sample is quarantined under its escaped key.
            try:
                name, unsafe = safe_relative_name(raw), None
            except UnsafeNameError as exc:
                name, unsafe = raw, str(exc)
            shown = escape_name(raw) if unsafe else raw
            if "/" not in name and name.startswith("__") and name.endswith("__"):
                self._skip(shard, shown, "webdataset metadata member" if info.isreg()
                           else f"not a regular file: {_member_kind(info)}")
                continue
            parts = split_key(name)
            if parts is None:
                self._skip(shard, shown, "hidden member or no extension: not a sample field"
                           if info.isreg() else f"not a regular file: {_member_kind(info)}")
                continue
            key, fname = parts
            if unsafe:
                key = escape_name(key, max_chars=None)
            if group is None or key != group.base:
                if group is not None:
                    yield self._finish(shard, group, next(counter))
                group = _Group(key=key, first_member=shown, base=key)
                if key in seen:
                    # Yield every key once: the repeat gets a derived key and is quarantined.
                    repeats[key] = repeats.get(key, 0) + 1
                    group.key = f"{key}#duplicate-{repeats[key]}"
                    group.problem = (f"duplicate_key: key {key!r} appears again after other "
                                     f"samples (member {escape_name(raw)})")
                seen.add(key)
            if unsafe:
                group.problem = group.problem or (
                    f"unsafe_name: member {escape_name(raw)}: {unsafe}")
            elif not info.isreg():
                # Links and devices are never followed or released; the sample they belong
                # to would be incomplete, so it is quarantined as a whole.
                code = "link_member" if info.issym() or info.islnk() else "special_member"
                group.problem = group.problem or (
                    f"{code}: member {escape_name(raw)} is a {_member_kind(info)}; links and "
                    f"special files are never followed or released")
            if fname in group.order:
                first = group.raw_names.get(fname, raw)
                group.problem = group.problem or (
                    f"duplicate_field: member {escape_name(raw)} appears twice" if first == raw
                    else f"duplicate_field: members {escape_name(first)} and "
                         f"{escape_name(raw)} both name {name!r} after normalisation")
            group.order.append(fname)
            group.paths[fname] = name
            group.raw_names.setdefault(fname, raw)
            if self.max_member_bytes is not None and info.size > self.max_member_bytes:
                group.problem = group.problem or (
                    f"file_too_large: member {name!r} is {info.size} bytes "
                    f"(limit {self.max_member_bytes})")
            if group.problem:
                continue  # quarantined anyway: do not hold its bytes; tarfile skips the data
            try:
                member = tf.extractfile(info)
                data = member.read() if member is not None else b""
            except Exception as exc:  # noqa: BLE001 - the member's data is cut or unreadable
                failure = self._failure(shard, rec, exc, offset=info.offset)
                if failure["reason"].startswith("truncated_tar"):
                    got = max(0, rec.pos - info.offset_data)
                    reason = (f"truncated_tar: member {name!r} is cut off after {got} of "
                              f"{info.size} bytes")
                else:
                    reason = f"{failure['reason'].split(':', 1)[0]}: member {name!r}: {_describe(exc)}"
                yield self._quarantined(shard, next(counter), group.key, group.first_member,
                                        reason, group.order)
                failure["__index__"] = next(counter)
                yield failure
                return
            group.fields[fname] = data

        if group is not None:
            if failure is None:
                yield self._finish(shard, group, next(counter))
            else:
                # Members are grouped by adjacency, so the last open sample is only known to
                # be complete when a member of another key or the end marker follows it.
                why = failure["reason"].split(":", 1)[0]
                yield self._quarantined(
                    shard, next(counter), group.key, group.first_member,
                    f"{why}: the shard breaks off after this sample, which may be missing "
                    f"members", group.order)
        if failure is not None:
            failure["__index__"] = next(counter)
            yield failure

    def _finish(self, shard: Shard, group: _Group, index: int) -> Sample:
        fields = tuple(group.order)
        if group.problem:
            return self._quarantined(shard, index, group.key, group.first_member, group.problem,
                                     fields)
        image, problem = _check_fields(fields)
        if problem:
            return self._quarantined(shard, index, group.key, group.first_member, problem, fields)
        sample = self._sample(shard, index, group.key, group.paths[image])
        sample["__image__"] = image
        sample["__fields__"] = fields
        sample["__paths__"] = dict(group.paths)
        sample.update(group.fields)
        return sample

    def _end_failure(self, shard: Shard, rec: _Recorder, offset: int) -> Sample | None:
        """``tarfile`` reported no further member at ``offset``. It says so alike for an
        end-of-archive block, a missing one, a cut header and an invalid header; tell which."""
        try:
            block = rec.bytes_at(offset, tarfile.BLOCKSIZE)
        except Exception as exc:  # noqa: BLE001 - the stream broke while looking ahead
            return self._failure(shard, rec, exc, offset=offset)
        if len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE:
            return None  # end-of-archive marker: the shard is complete
        if len(block) == tarfile.BLOCKSIZE:
            try:
                tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                return self._quarantined(
                    shard, -1, f"{shard.id}#corrupt", shard.url,
                    f"corrupt_tar: invalid tar header at byte {offset}; members after it are "
                    f"unknown")
            # A valid header whose extended data or successor header is cut off.
            try:
                rec.drain()
            except Exception as exc:  # noqa: BLE001
                return self._failure(shard, rec, exc, offset=offset)
        return self._truncated(shard, rec.pos)

    def _failure(self, shard: Shard, rec: _Recorder, exc: BaseException, *,
                 offset: int) -> Sample:
        """The shard-level quarantine row for an error raised while reading (index set by the
        caller). The stream hitting its end first means truncation; otherwise the archive is
        corrupt (bad header, bad gzip data) or the storage failed."""
        if isinstance(exc, EOFError) or rec.eof:
            return self._truncated(shard, rec.pos)
        if isinstance(exc, tarfile.TarError | zlib.error | gzip.BadGzipFile):
            if offset == 0:
                return self._quarantined(shard, -1, f"{shard.id}#unreadable", shard.url,
                                         f"unreadable_shard: not a readable tar archive: "
                                         f"{_describe(exc)}")
            return self._quarantined(shard, -1, f"{shard.id}#corrupt", shard.url,
                                     f"corrupt_tar: {_describe(exc)} at byte {offset}; members "
                                     f"after it are unknown")
        return self._quarantined(shard, -1, f"{shard.id}#unreadable", shard.url,
                                 f"unreadable_shard: {_describe(exc)} at byte {rec.pos}")

    def _truncated(self, shard: Shard, total: int) -> Sample:
        return self._quarantined(
            shard, -1, f"{shard.id}#truncated", shard.url,
            f"truncated_tar: shard ends before its end-of-archive marker; members after byte "
            f"{total} are unknown")

    def _skip(self, shard: Shard, name: str, reason: str) -> None:
        self._skipped.append(Skipped(shard.id, name, reason))


# -------------------------------------------------------------------------------------------
# Parquet files

_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "jpg"),
    (b"\x89PNG\r\n\x1a\n", 0, "png"),
    (b"II*\x00", 0, "tif"),
    (b"MM\x00*", 0, "tif"),
    (b"BM", 0, "bmp"),
)


def sniff_image_extension(data: bytes) -> str | None:
    """The image format by its magic bytes, or None when it is none Veil handles."""
    for magic, offset, ext in _MAGIC:
        if data[offset:offset + len(magic)] == magic:
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _ext_hint(value: Any) -> str | None:
    """An extension from a ``path``/``format``/``ext`` value ("a/b.JPG", "JPEG", ".png")."""
    if not isinstance(value, str) or not value:
        return None
    ext = value.rsplit(".", 1)[-1].lower() if "." in value else value.lower()
    return ext if ext in IMAGE_EXTENSIONS else None


class ParquetSource(Source):
    """Parquet files, one shard each, streamed in small record batches.

    The image column holds ``binary``/``large_binary`` bytes or a struct with a ``bytes``
    field (HuggingFace ``Image``). Every other column is kept, as Python values, under
    ``__row__`` so the writer can write the row back unchanged with the file's own schema.
    The image extension is sniffed from the bytes first: the bytes are what the decoder sees,
    and a ``path`` that says ``.jpg`` over PNG data is common. A ``path``/``format``/``ext``
    hint is used when sniffing fails; with neither, the field is ``bin`` and the decoder
    quarantines the sample as not an image.
    """

    kind = "parquet"
    batch_size = 64

    def __init__(self, urls: Sequence[str], *, image_column: str = "image",
                 root: str | None = None) -> None:
        super().__init__()
        self.urls = [absolute_local(u) for u in urls]
        self.image_column = image_column
        ids = shard_ids(self.urls, None if root is None else absolute_local(root))
        self._shards = [Shard(id=i, url=u, kind="parquet")
                        for i, u in zip(ids, self.urls, strict=True)]
        self._metadata: dict[str, Any] = {}

    def list_shards(self) -> list[Shard]:
        return list(self._shards)

    def _open(self, shard: Shard) -> Any:
        import fsspec
        import pyarrow.parquet as pq

        handle = fsspec.open(shard.url, "rb").open()
        try:
            return handle, pq.ParquetFile(handle)
        except Exception:
            handle.close()
            raise

    def file_metadata(self, shard: Shard) -> Any:
        """The file's Parquet footer (``pyarrow.parquet.FileMetaData``), read once."""
        if shard.id not in self._metadata:
            handle, pf = self._open(shard)
            with handle:
                self._metadata[shard.id] = pf.metadata
        return self._metadata[shard.id]

    def schema(self, shard: Shard) -> Any:
        """The file's Arrow schema, metadata included (HuggingFace keeps its features there);
        the writer writes the output file with exactly this schema."""
        return self.file_metadata(shard).schema.to_arrow_schema()

    def approx_num_samples(self, shard: Shard) -> int | None:
        try:
            return int(self.file_metadata(shard).num_rows)
        except Exception:  # noqa: BLE001 - only a progress hint
            return None

    def read_shard(self, shard: Shard) -> Iterator[Sample]:
        counter = itertools.count()
        try:
            handle, pf = self._open(shard)
        except Exception as exc:  # noqa: BLE001
            yield self._quarantined(shard, next(counter), f"{shard.id}#unreadable", shard.url,
                                    f"unreadable_shard: {_describe(exc)}")
            return
        with handle:
            self._metadata.setdefault(shard.id, pf.metadata)
            schema = pf.schema_arrow
            names = schema.names
            stem = shard.id[: -len(".parquet")] if shard.id.lower().endswith(".parquet") else shard.id
            col_problem = self._image_column_problem(schema)
            key_col = next((c for c in ("__key__", "key") if c in names), None)
            hint_cols = [c for c in ("path", "format", "ext") if c in names]
            total = pf.metadata.num_rows
            seen: set[str] = set()
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=self.batch_size):
                    for values in batch.to_pylist():
                        yield self._row_sample(shard, next(counter), row, values, stem, key_col,
                                               hint_cols, col_problem, seen)
                        row += 1
            except Exception as exc:  # noqa: BLE001 - a corrupt page or a read error
                yield self._quarantined(
                    shard, next(counter), f"{shard.id}#corrupt", shard.url,
                    f"corrupt_parquet: {_describe(exc)} after row {row}; "
                    f"{max(0, total - row)} of {total} rows are unknown")

    def _image_column_problem(self, schema: Any) -> str | None:
        import pyarrow as pa

        col = self.image_column
        if col not in schema.names:
            return f"no_image_column: column {col!r} not in file (columns: {', '.join(schema.names)})"
        typ = schema.field(col).type

        def is_bytes(t: Any) -> bool:
            return pa.types.is_binary(t) or pa.types.is_large_binary(t)

        if is_bytes(typ):
            return None
        # A struct's "bytes" must itself be binary: a string or number there would fail
        # mid-file and be reported as a corrupt shard, hiding every row after it.
        if pa.types.is_struct(typ) and typ.get_field_index("bytes") >= 0 and is_bytes(
                typ.field(typ.get_field_index("bytes")).type):
            return None
        return f"unsupported_image_column: column {col!r} has type {typ}, expected bytes or a struct with 'bytes'"

    def _row_sample(self, shard: Shard, index: int, row: int, values: dict[str, Any], stem: str,
                    key_col: str | None, hint_cols: list[str], col_problem: str | None,
                    seen: set[str]) -> Sample:
        raw_key = values.get(key_col) if key_col else None
        key = str(raw_key) if raw_key is not None and str(raw_key) != "" else f"{stem}-{row:08d}"
        source = f"row {row}"
        # Keys here are identifiers, never file names (the writer writes rows back), so only
        # the text rules apply: a key must not act on whatever shows the manifest.
        unsafe = name_problem(key, path=False) or (f"longer than {MAX_NAME_BYTES} bytes"
                                       if len(key.encode("utf-8")) > MAX_NAME_BYTES else None)
        if unsafe:
            problem = f"unsafe_name: key {escape_name(key)} at row {row}: {unsafe}"
            key = escape_name(key, max_chars=None)
        if key in seen:
            return self._quarantined(shard, index, f"{key}#duplicate-row{row}", source,
                                     f"duplicate_key: key {key!r} appears again at row {row}")
        seen.add(key)
        if unsafe:
            return self._quarantined(shard, index, key, source, problem)
        if col_problem:
            return self._quarantined(shard, index, key, source, col_problem)
        image = values.get(self.image_column)
        hints: list[Any] = [values.get(c) for c in hint_cols]
        if isinstance(image, dict):
            data = image.get("bytes")
            hints.insert(0, image.get("path"))
            kept_image: Any = {**image, "bytes": None}
        else:
            data = image
            kept_image = None
        if data is None:
            where = f" (path {hints[0]!r})" if isinstance(image, dict) and hints[0] else ""
            return self._quarantined(shard, index, key, source,
                                     f"missing_image: column {self.image_column!r} holds no "
                                     f"bytes{where}")
        if len(data) == 0:
            return self._quarantined(shard, index, key, source, "empty_file: zero-length image")
        ext = sniff_image_extension(data) or next(
            (e for e in (_ext_hint(h) for h in hints) if e), "bin")
        sample = self._sample(shard, index, key, source)
        sample["__image__"] = ext
        sample["__fields__"] = (ext,)
        sample[ext] = bytes(data)
        row_values = {k: v for k, v in values.items() if k != self.image_column}
        row_values[self.image_column] = kept_image
        sample["__row__"] = row_values
        return sample


# -------------------------------------------------------------------------------------------
# Folder trees


class FolderSource(Source):
    """A local folder tree of image files.

    Files are grouped by key = relative path without the last extension (posix separators):
    ``a/b.jpg`` with ``a/b.json`` and ``a/b.txt`` is one sample with fields ``jpg``, ``json``,
    ``txt``. A group becomes a sample when it has an image (or an image-like file Veil cannot
    anonymize, which is then quarantined so it shows in the manifest); several images under one
    key (``b.jpg`` + ``b.png``) are quarantined as ``multiple_image_fields``. Files in no such
    group (``notes.txt``, ``.DS_Store``, files without extension) may hold personal data, so
    they are never copied: :meth:`skipped` lists them for the driver to log.

    Trees are untrusted. Symlinked directories are not followed (no loops, no escape). A
    symlinked file whose target resolves outside the input folder is never read
    (``symlink_outside_input``); one that stays inside is read only with ``follow_symlinks``
    (``--follow-symlinks``), otherwise quarantined as ``symlink_not_followed``. FIFOs,
    sockets and devices are quarantined without being opened. A file whose relative path is
    not a safe name (:func:`safe_relative_name`: control characters, backslashes, too long)
    is quarantined as ``unsafe_name`` under its escaped key. Hard links are plain files.

    Shards are the sorted samples chunked by ``shard_size``, ids ``folder-00000``...; members
    are every file of those samples, sample by sample.
    """

    kind = "folder"

    def __init__(self, root: str | Path, *, shard_size: int = 1000,
                 max_member_bytes: int | None = None, follow_symlinks: bool = False) -> None:
        super().__init__()
        if shard_size < 1:
            raise ValueError("folder_shard_size must be >= 1")
        self.root = os.path.abspath(os.fspath(root))
        self.shard_size = shard_size
        self.max_member_bytes = max_member_bytes
        self.follow_symlinks = follow_symlinks
        self._shards: list[Shard] | None = None

    @staticmethod
    def _key_field(relpath: str) -> tuple[str, str] | None:
        base = posixpath.basename(relpath)
        if base.startswith(".") or "." not in base:
            return None
        key, ext = relpath.rsplit(".", 1)
        return key, ext.lower()

    def _walk(self) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, self.root)
            for d in dirnames:
                if os.path.islink(os.path.join(dirpath, d)):
                    rel = d if rel_dir == "." else posixpath.join(rel_dir.replace(os.sep, "/"), d)
                    self._skipped.append(Skipped("", _shown(rel), "symlinked directory not followed"))
            for name in sorted(filenames):
                yield name if rel_dir == "." else posixpath.join(rel_dir.replace(os.sep, "/"), name)

    def list_shards(self) -> list[Shard]:
        if self._shards is not None:
            return list(self._shards)
        groups: dict[str, list[str]] = {}
        for rel in self._walk():
            parts = self._key_field(rel)
            if parts is None:
                self._skipped.append(Skipped("", _shown(rel), "hidden file or no extension"))
                continue
            groups.setdefault(parts[0], []).append(rel)
        samples: list[tuple[str, list[str]]] = []
        for key in sorted(groups):
            files = sorted(groups[key], key=lambda r: (self._key_field(r) or ("", ""))[1])
            formats = {field_format(self._key_field(r)[1]) for r in files}  # type: ignore[index]
            if formats & (IMAGE_EXTENSIONS | UNSUPPORTED_VISUAL_EXTENSIONS):
                samples.append((key, files))
            else:
                self._skipped.extend(Skipped("", _shown(r), "no image file with the same name")
                                     for r in files)
        shards = []
        for i in range(0, len(samples), self.shard_size):
            chunk = samples[i:i + self.shard_size]
            members = tuple(r for _key, files in chunk for r in files)
            shards.append(Shard(id=f"folder-{i // self.shard_size:05d}", url=self.root,
                                kind="folder", members=members))
        self._shards = shards
        return list(shards)

    def approx_num_samples(self, shard: Shard) -> int | None:
        return len({self._key_field(m)[0] for m in shard.members})  # type: ignore[index]

    def _groups(self, shard: Shard) -> list[tuple[str, list[tuple[str, str]]]]:
        """(key, [(field, relative path)]) of the shard's samples; keys that are not safe
        names are escaped (``repr``), exactly as :meth:`read_shard` yields them."""
        grouped: dict[str, list[tuple[str, str]]] = {}
        for rel in shard.members:
            parts = self._key_field(rel)
            if parts is None:  # a hand-made Shard; members must be sample files
                grouped.setdefault(rel, []).append(("", rel))
                continue
            grouped.setdefault(parts[0], []).append((parts[1], rel))
        return [(_shown(key, max_chars=None), files) for key, files in grouped.items()]

    def work_units(self, shard: Shard, max_samples: int) -> list[WorkUnit]:
        """Ranges of ``max_samples`` samples: a folder's files are read one by one, so any
        range can be read on its own."""
        n = len(self._groups(shard))
        if max_samples < 1 or n <= max_samples:
            return [WorkUnit(shard)]
        starts = range(0, n, max_samples)
        return [WorkUnit(shard, start, start + max_samples if start + max_samples < n else None)
                for start in starts]

    def read_unit(self, unit: WorkUnit) -> Iterator[Sample]:
        groups = self._groups(unit.shard)
        stop = len(groups) if unit.stop is None else unit.stop
        yield from self._read_groups(unit.shard, groups, unit.start, stop)

    def read_shard(self, shard: Shard) -> Iterator[Sample]:
        groups = self._groups(shard)
        yield from self._read_groups(shard, groups, 0, len(groups))

    def _read_groups(self, shard: Shard, groups: Sequence[tuple[str, list[tuple[str, str]]]],
                     start: int, stop: int) -> Iterator[Sample]:
        root = shard.url or self.root
        for index in range(start, stop):
            key, files = groups[index]
            fields = [f for f, _rel in files]
            image, problem = _check_fields(fields)
            source = _shown(next((rel for f, rel in files if f == image), files[0][1]))
            unsafe = [(rel, _rel_problem(rel)) for _f, rel in files if _rel_problem(rel)]
            if unsafe:
                rel, why = unsafe[0]
                problem = f"unsafe_name: file {escape_name(rel)}: {why}"
            if problem:
                yield self._quarantined(shard, index, key, source, problem, fields)
                continue
            data: dict[str, bytes] = {}
            for fname, rel in files:
                try:
                    data[fname] = self._read_file(root, rel)
                except _Unreadable as exc:
                    problem = f"{exc.kind}: {rel}: {exc}"
                    break
            if problem:
                yield self._quarantined(shard, index, key, source, problem, fields)
                continue
            sample = self._sample(shard, index, key, source)
            sample["__image__"] = image
            sample["__fields__"] = tuple(fields)
            sample["__paths__"] = {f: rel for f, rel in files}
            sample.update(data)
            yield sample

    def _read_file(self, root: str, rel: str) -> bytes:
        path = os.path.join(root, rel)
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                path = self._link_target(root, path)
                st = os.stat(path)  # a dangling link inside the folder fails here
            if not stat.S_ISREG(st.st_mode):
                # FIFOs would block, and opening a device can act on hardware.
                raise _Unreadable("unreadable_path", "not a regular file")
            if self.max_member_bytes is not None and st.st_size > self.max_member_bytes:
                raise _Unreadable("file_too_large",
                                  f"{st.st_size} bytes (limit {self.max_member_bytes})")
            # O_NOFOLLOW + O_NONBLOCK: a file swapped for a link or a FIFO since the check is
            # refused rather than followed or waited on.
            flags = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_CLOEXEC", 0))
            with open(os.open(path, flags), "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise _Unreadable("unreadable_path", "not a regular file")
                return fh.read()
        except OSError as exc:
            raise _Unreadable("unreadable_path", _describe(exc)) from exc

    def _link_target(self, root: str, path: str) -> str:
        """The resolved target of the symlink ``path``, if it may be read. The target itself
        is never named in the reason: it is a path on this machine, not in the dataset."""
        target = os.path.realpath(path)
        real_root = os.path.realpath(root)
        if os.path.commonpath([target, real_root]) != real_root:
            raise _Unreadable("symlink_outside_input", "symbolic link whose target resolves "
                              "outside the input folder; it is never read")
        if not self.follow_symlinks:
            raise _Unreadable("symlink_not_followed", "symbolic link to a file inside the "
                              "input folder; pass --follow-symlinks (io.follow_symlinks) to "
                              "read such links")
        return target


def _rel_problem(rel: str) -> str | None:
    """Why a folder input's relative path is not a safe release name, or None."""
    try:
        return None if safe_relative_name(rel) == rel else "not a normalised relative path"
    except UnsafeNameError as exc:
        return str(exc)


def _shown(name: str, *, max_chars: int | None = 300) -> str:
    """``name`` itself when it is safe, else escaped (for keys, sources and skip lists)."""
    return escape_name(name, max_chars=max_chars) if name_problem(name) else name


class _Unreadable(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
