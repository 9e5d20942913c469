"""Write the release copy, one shard at a time, atomically and byte-for-byte reproducibly.

A shard's output appears under ``OUT/data/`` only when :meth:`ShardWriter.commit` runs: data go
to a temporary name first, are fsynced, then renamed into place, and the directory is fsynced.
A crash therefore leaves either the previous state or the complete shard, never half a file;
the driver writes the shard's manifest after the commit, so a shard without a manifest is
simply redone on resume. Temporary names contain :data:`TEMP_MARKER`;
:func:`remove_stale_temps` clears those a killed run left behind. A failed write (disk full,
file too large, permission denied) raises :class:`OutputWriteError`, which names the file and
what to do; the shard being written leaves nothing behind.

Writers are the last line of defence: they refuse any sample that is not ``anonymized`` or
``clean`` (a quarantined or never-processed sample must not be released), and they write only
the fields the input had (``__fields__``), never working state or pipeline fields.
"""

from __future__ import annotations

import gzip
import os
import posixpath
import tarfile
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from veil.pipelines.faults import fault_point
from veil.pipelines.sources import (
    PIPELINE_FIELDS,
    ParquetSource,
    Shard,
    Source,
    check_release_name,
    is_image_field,
    split_key,
)
from veil.pipelines.storage import (
    TEMP_MARKER,
    LocalStore,
    OutputStore,
    as_store,
    clean_relative,
    fsync_dir,
    temp_path,
)
from veil.transforms.stage import ANONYMIZED, CLEAN, Sample

__all__ = [
    "PIPELINE_FIELDS",
    "RELEASABLE_STATUSES",
    "TEMP_MARKER",
    "FolderShardWriter",
    "OutputWriteError",
    "ParquetShardWriter",
    "ShardWriter",
    "TarShardWriter",
    "atomic_write_bytes",
    "fsync_dir",
    "open_writer",
    "output_error",
    "store_write_bytes",
    "output_fields",
    "read_released_image",
    "remove_stale_temps",
    "temp_path",
]

#: Statuses a sample must have to be written. ``pending`` means a stage never ran on it.
RELEASABLE_STATUSES: frozenset[str] = frozenset({ANONYMIZED, CLEAN})
DATA_DIR = "data"


class OutputWriteError(OSError):
    """The output could not be written (disk full, file too large, permission denied, read-only
    file system). The run stops: a sample is never quarantined for it, since the fault is the
    output's, and a shard whose file failed part-way must not be committed. Keeps ``errno``."""


def output_error(exc: OSError, target: str | Path) -> OutputWriteError:
    """``exc`` as an :class:`OutputWriteError` that names ``target`` and says how to resume."""
    if isinstance(exc, OutputWriteError):
        return exc
    reason = exc.strerror or str(exc)
    return OutputWriteError(exc.errno, f"cannot write {target}: {reason}. Shards already committed "
                                       "are kept; free disk space or fix the output folder's "
                                       "permissions, then rerun the same command to resume")


def _fsync_and_close(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to the local file ``path`` so readers see the old file or the whole new
    one."""
    final = Path(path)
    store_write_bytes(LocalStore(final.parent), final.name, data)


def store_write_bytes(store: OutputStore, relative: str, data: bytes) -> None:
    """:meth:`OutputStore.write_bytes`, with a failed write as :class:`OutputWriteError`."""
    try:
        store.write_bytes(relative, data)
    except OSError as exc:
        raise output_error(exc, store.display(relative)) from exc


def remove_stale_temps(output_root: str | Path | OutputStore) -> list[Path]:
    """Delete temporary files a killed run left under ``output_root``; returns them. An
    object store has none: files are staged on the writer's machine and uploaded whole."""
    removed: list[Path] = []
    store = as_store(output_root)
    if not store.is_local:
        return removed
    root = store.local_path()
    if not root.is_dir():
        return removed
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if TEMP_MARKER in name:
                path = Path(dirpath) / name
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def output_fields(sample: Sample) -> tuple[str, ...]:
    """The fields of ``sample`` that go to the release copy: the input's fields, in input
    order. Raises when the sample is not releasable or its fields are inconsistent, because
    writing a partial or unprocessed sample would be a silent data (or privacy) bug."""
    status = sample.get("status")
    if status not in RELEASABLE_STATUSES:
        raise ValueError(f"refusing to write sample {sample.get('__key__')!r} with status "
                         f"{status!r}: only {sorted(RELEASABLE_STATUSES)} samples are released")
    raw_fields = sample.get("__fields__")
    fields = tuple(str(f) for f in raw_fields) if raw_fields is not None else ()
    image = sample.get("__image__")
    if not fields or image not in fields:
        raise ValueError(f"sample {sample.get('__key__')!r}: __fields__ {fields} does not name "
                         f"its image field {image!r}")
    for name in fields:
        if name.startswith("_") or name in PIPELINE_FIELDS:
            raise ValueError(f"sample {sample.get('__key__')!r}: field {name!r} is reserved")
        if not isinstance(sample.get(name), bytes | bytearray | memoryview):
            raise ValueError(f"sample {sample.get('__key__')!r}: field {name!r} is "
                             f"{type(sample.get(name)).__name__}, expected bytes")
    return fields


class ShardWriter(ABC):
    """Writes one output shard; use as a context manager (commit on success, abort on error)."""

    def __init__(self, shard: Shard, output_root: str | Path | OutputStore) -> None:
        self.shard = shard
        self.store = as_store(output_root)
        self._state = "open"

    def write(self, sample: Sample) -> None:
        """Add one releasable sample, in shard order. Sets ``sample["output_path"]`` to the
        output-relative path of the file that will hold it."""
        if self._state != "open":
            raise ValueError(f"shard {self.shard.id}: writer is {self._state}")
        fields = output_fields(sample)
        self._write(sample, fields)
        fault_point("shard:sample")

    @abstractmethod
    def _write(self, sample: Sample, fields: tuple[str, ...]) -> None: ...

    def commit(self) -> list[str]:
        """Make the shard's output durable and visible; returns the output-relative paths."""
        if self._state != "open":
            raise ValueError(f"shard {self.shard.id}: writer is {self._state}")
        try:
            paths = self._commit()
        except BaseException:
            self.abort()
            raise
        self._state = "committed"
        return paths

    @abstractmethod
    def _commit(self) -> list[str]: ...

    def abort(self) -> None:
        """Remove temporary files; the final output is left as it was before this writer."""
        if self._state == "committed":
            return
        self._state = "aborted"
        self._abort()

    @abstractmethod
    def _abort(self) -> None: ...

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            if self._state == "open":
                self.commit()
        else:
            self.abort()

    def _final(self, relative: str) -> str:
        """``data/<relative>`` (relative to the output), refusing paths that would escape
        ``OUT/data``: lexically, and on a local disk through symlinked folders too."""
        final = f"{DATA_DIR}/{clean_relative(relative)}"
        if self.store.is_local and not self.store.local_path(final).resolve().is_relative_to(
                self.store.local_path(DATA_DIR).resolve()):
            raise ValueError(f"output path {relative!r} escapes the output folder")
        return final

    def _publish(self, staged: Path, relative: str) -> None:
        self.store.publish(staged, relative)
        fault_point("shard:renamed")


class TarShardWriter(ShardWriter):
    """A WebDataset tar with the input shard's name; ``.tar.gz``/``.tgz`` are gzipped.

    Member names are the input's own (``__paths__``), else ``<key>.<field>``; headers carry
    fixed metadata (mtime 0, uid/gid 0, empty user/group names, mode 0644, PAX format), and the
    gzip header has no name or time, so the same samples give the same bytes on every run.
    """

    def __init__(self, shard: Shard, output_root: str | Path | OutputStore) -> None:
        super().__init__(shard, output_root)
        self.final = self._final(shard.id)
        self.tmp = self.store.staging_file(self.final)
        self._file: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._gz: gzip.GzipFile | None = None
        target: Any = self._file
        if shard.id.lower().endswith((".tar.gz", ".tgz")):
            self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0,
                                     compresslevel=6)
            target = self._gz
        self._tar = tarfile.open(fileobj=target, mode="w", format=tarfile.PAX_FORMAT)

    def _write(self, sample: Sample, fields: tuple[str, ...]) -> None:
        key = sample["__key__"]
        paths = sample.get("__paths__") or {}
        members = {name: paths.get(name) or f"{key}.{name}" for name in fields}
        for member in members.values():
            # Defence in depth, before any member of the sample is written: a release must
            # never hold a name that escapes the folder it is extracted into.
            check_release_name(member)
        for name in fields:
            data = bytes(sample[name])
            info = tarfile.TarInfo(members[name])
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            self._tar.addfile(info, _BytesReader(data))
        sample["output_path"] = self.final

    def _commit(self) -> list[str]:
        self._tar.close()
        if self._gz is not None:
            self._gz.close()
        _fsync_and_close(self._file)
        fault_point("shard:fsynced")
        self._publish(self.tmp, self.final)
        self.store.sync(posixpath.dirname(self.final))
        return [self.final]

    def _abort(self) -> None:
        for closer in (self._tar.close, *((self._gz.close,) if self._gz else ()), self._file.close):
            try:
                closer()
            except Exception:  # noqa: BLE001 - best effort: the temp file goes anyway
                pass
        self.store.discard(self.tmp)


class _BytesReader:
    """Minimal file object over bytes for ``TarFile.addfile`` (avoids a BytesIO copy)."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._view) if n < 0 else min(len(self._view), self._pos + n)
        chunk = self._view[self._pos:end].tobytes()
        self._pos = end
        return chunk


class ParquetShardWriter(ShardWriter):
    """A Parquet file with the input file's name and schema (metadata included).

    Rows keep their input order; rows of quarantined samples are absent. The image column gets
    the anonymized bytes, in the input's form (plain bytes, or the struct with its other
    fields such as ``path`` unchanged). Rows are buffered and written a row group at a time.
    """

    buffer_rows = 256

    def __init__(self, shard: Shard, output_root: str | Path | OutputStore,
                 source: ParquetSource) -> None:
        import pyarrow.parquet as pq

        super().__init__(shard, output_root)
        self.image_column = source.image_column
        self.schema = source.schema(shard)
        self.final = self._final(shard.id)
        self.tmp = self.store.staging_file(self.final)
        self._rows: list[dict[str, Any]] = []
        self._file: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit/abort
        self._writer = pq.ParquetWriter(self._file, self.schema,
                                        compression=_input_compression(source, shard))

    def _write(self, sample: Sample, fields: tuple[str, ...]) -> None:
        row = sample.get("__row__")
        if not isinstance(row, dict):
            raise ValueError(f"sample {sample.get('__key__')!r} has no __row__: not read from "
                             f"a Parquet shard")
        data = bytes(sample[sample["__image__"]])
        row = dict(row)
        kept = row.get(self.image_column)
        row[self.image_column] = {**kept, "bytes": data} if isinstance(kept, dict) else data
        self._rows.append(row)
        sample["output_path"] = self.final
        if len(self._rows) >= self.buffer_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def _commit(self) -> list[str]:
        self._flush()
        self._writer.close()
        _fsync_and_close(self._file)
        fault_point("shard:fsynced")
        self._publish(self.tmp, self.final)
        self.store.sync(posixpath.dirname(self.final))
        return [self.final]

    def _abort(self) -> None:
        self._rows = []
        for closer in (self._writer.close, self._file.close):
            try:
                closer()
            except Exception:  # noqa: BLE001
                pass
        self.store.discard(self.tmp)


def _input_compression(source: ParquetSource, shard: Shard) -> str:
    """The codec of the input's first column chunk, so the output is written alike."""
    try:
        meta = source.file_metadata(shard)
        if meta.num_row_groups and meta.num_columns:
            codec = str(meta.row_group(0).column(0).compression).lower()
            if codec in ("snappy", "gzip", "brotli", "zstd", "lz4", "none", "uncompressed"):
                return "none" if codec == "uncompressed" else codec
    except Exception:  # noqa: BLE001 - fall back to the pyarrow default
        pass
    return "snappy"


class FolderShardWriter(ShardWriter):
    """Mirrors the input tree: each file of a sample goes to ``OUT/data/<its relative path>``.

    Files are written and fsynced under temporary names as samples arrive and renamed into
    place on commit, so before commit no final file of the shard exists. A rename that fails
    takes back the files already renamed; a kill during the renames can leave part of the
    shard in place without a manifest, and the shard is then redone on resume with identical
    bytes overwriting those files.
    """

    def __init__(self, shard: Shard, output_root: str | Path | OutputStore) -> None:
        super().__init__(shard, output_root)
        self._pending: list[tuple[Path, str]] = []

    def _write(self, sample: Sample, fields: tuple[str, ...]) -> None:
        paths = sample.get("__paths__") or {}
        image_rel = None
        for name in fields:  # defence in depth, before any file of the sample is created
            check_release_name(paths.get(name) or f"{sample['__key__']}.{name}")
        for name in fields:
            final = self._final(paths.get(name) or f"{sample['__key__']}.{name}")
            tmp = self.store.staging_file(final)
            self._pending.append((tmp, final))
            with open(tmp, "wb") as fh:
                fh.write(sample[name])
                fh.flush()
                os.fsync(fh.fileno())
            if name == sample["__image__"]:
                image_rel = final
        sample["output_path"] = image_rel

    def _commit(self) -> list[str]:
        written: list[str] = []
        fault_point("shard:fsynced")
        try:
            for tmp, final in self._pending:
                self._publish(tmp, final)
                written.append(final)
        except BaseException:
            # Half a shard must not stay in place without its manifest: take back the files
            # already renamed (the shard is redone anyway), the rest are removed by abort.
            for relative in written:
                self.store.delete(relative)
            raise
        for directory in sorted({posixpath.dirname(f) for f in written}):
            self.store.sync(directory)
        self._pending = []
        return written

    def _abort(self) -> None:
        for tmp, _final in self._pending:
            self.store.discard(tmp)
        self._pending = []


def open_writer(shard: Shard, output_root: str | Path | OutputStore, *, source: Source) -> ShardWriter:
    """The writer for ``shard``, writing under ``output_root/data``."""
    if shard.kind == "tar":
        return TarShardWriter(shard, output_root)
    if shard.kind == "parquet":
        if not isinstance(source, ParquetSource):
            raise TypeError("a Parquet shard needs its ParquetSource (for the schema)")
        return ParquetShardWriter(shard, output_root, source)
    if shard.kind == "folder":
        return FolderShardWriter(shard, output_root)
    raise ValueError(f"unknown shard kind {shard.kind!r}")


def read_released_image(output_root: str | Path | OutputStore, row: dict[str, Any], *,
                        image_column: str | None = None) -> bytes:
    """The released image bytes of a manifest row (for reports and audits).

    ``output_path`` names the file holding the image: for a folder the image itself; for a
    tar the member is found by the row's key; for Parquet the row is found by counting the
    released rows before it in the shard's manifest (the writer keeps input order and drops
    only unreleased rows). ``image_column`` defaults to the one recorded in ``OUT/run.json``,
    else ``"image"``. Raises ``FileNotFoundError`` when the image is not there.
    """
    store = as_store(output_root)
    relative = row.get("output_path")
    if not relative or row.get("status") not in RELEASABLE_STATUSES:
        raise FileNotFoundError(f"sample {row.get('key')!r} was not released")
    lower = posixpath.basename(relative).lower()
    if lower.endswith((".tar", ".tar.gz", ".tgz")):
        return _tar_image(store, relative, row["key"])
    if lower.endswith(".parquet"):
        return _parquet_image(store, relative, row, image_column)
    return store.read_bytes(relative)


def _tar_image(store: OutputStore, relative: str, key: str) -> bytes:
    with store.open_read(relative) as raw:
        stream: Any = gzip.GzipFile(fileobj=raw) if relative.lower().endswith((".gz", ".tgz")) else raw
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for info in tf:
                parts = split_key(info.name)
                if info.isreg() and parts and parts[0] == key and is_image_field(parts[1]):
                    member = tf.extractfile(info)
                    if member is not None:
                        return member.read()
    raise FileNotFoundError(f"no image of key {key!r} in {store.display(relative)}")


def _parquet_image(store: OutputStore, relative: str, row: dict[str, Any],
                   image_column: str | None) -> bytes:
    import json

    import pyarrow.parquet as pq

    from veil.pipelines.manifest import read_shard_manifest

    if image_column is None:
        try:
            info = json.loads(store.read_bytes("run.json"))
            image_column = str(info["config"]["image_column"])
        except (OSError, ValueError, KeyError, TypeError):
            image_column = "image"
    manifest = read_shard_manifest(store, row["shard"]).select(["index", "status"]).to_pylist()
    position = sum(1 for r in manifest
                   if r["status"] in RELEASABLE_STATUSES and r["index"] < row["index"])
    with store.open_read(relative) as handle:
        pf = pq.ParquetFile(handle)
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            if position < n:
                value = pf.read_row_group(group, columns=[image_column]).column(0)[position].as_py()
                data = value.get("bytes") if isinstance(value, dict) else value
                if data is None:
                    break
                return bytes(data)
            position -= n
    raise FileNotFoundError(f"row {row.get('index')} of {store.display(relative)} holds no released image")
