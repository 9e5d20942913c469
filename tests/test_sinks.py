"""Shard writers: atomic commits, byte-identical reruns, and refusing what must not be released."""

from __future__ import annotations

import datetime
import hashlib
import io
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from veil.pipelines.sinks import (
    PIPELINE_FIELDS,
    TEMP_MARKER,
    FolderShardWriter,
    ParquetShardWriter,
    atomic_write_bytes,
    open_writer,
    read_released_image,
    remove_stale_temps,
)
from veil.pipelines.sources import FolderSource, ParquetSource, Shard, TarSource, open_source
from veil.transforms.stage import ANONYMIZED, CLEAN, QUARANTINED, quarantine

JPG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


def make_tar(path: Path, members: list[tuple[str, bytes]], *, mtime: int = 1_700_000_000) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = mtime
            info.uname = "alice"
            tf.addfile(info, io.BytesIO(data))


def process(sample: dict, i: int) -> dict:
    """Stand-in for the pipeline: new image bytes, typed fields a real run adds."""
    if sample["status"] == QUARANTINED:
        return sample
    sample[sample["__image__"]] = sample[sample["__image__"]][:4] + b"ANON%d" % i
    sample.update(status=ANONYMIZED, regions=[{"kind": "face", "box": [0, 0, 1, 1]}],
                  width=10, height=20, method="blur", timings={"decode": 0.1},
                  _pixels=object())
    return sample


def tar_members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def tar_input(tmp_path):
    path = tmp_path / "in" / "shard-000.tar"
    path.parent.mkdir()
    make_tar(path, [("a.jpg", JPG), ("a.json", b'{"a": 1}'), ("a.cls", b"1"),
                    ("B.JPEG", JPG), ("B.txt", b"caption"),
                    ("c.json", b"{}"),  # no image: quarantined, must not be written
                    ("visage-é.jpg", JPG)])
    return path


def write_tar(tar_input: Path, out: Path) -> tuple[TarSource, list[dict]]:
    source = open_source(str(tar_input))
    (shard,) = source.list_shards()
    samples = [process(s, i) for i, s in enumerate(source.read_shard(shard))]
    with open_writer(shard, out, source=source) as writer:
        for s in samples:
            if s["status"] != QUARANTINED:
                writer.write(s)
    return source, samples


def test_tar_writer_round_trip(tar_input, tmp_path):
    out = tmp_path / "out"
    _source, samples = write_tar(tar_input, out)
    final = out / "data" / "shard-000.tar"
    assert tar_members(final) == [
        ("a.jpg", JPG[:4] + b"ANON0"), ("a.json", b'{"a": 1}'), ("a.cls", b"1"),
        ("B.JPEG", JPG[:4] + b"ANON1"), ("B.txt", b"caption"),
        ("visage-é.jpg", JPG[:4] + b"ANON3"),
    ]
    assert [s.get("output_path") for s in samples] == ["data/shard-000.tar"] * 2 + [None] + ["data/shard-000.tar"]
    again = list(TarSource([str(final)]).read_shard(TarSource([str(final)]).list_shards()[0]))
    assert [(s["__key__"], s["__fields__"]) for s in again] == [
        ("a", ("jpg", "json", "cls")), ("B", ("jpeg", "txt")), ("visage-é", ("jpg",))]


def test_tar_output_is_byte_identical_and_has_fixed_headers(tar_input, tmp_path):
    write_tar(tar_input, tmp_path / "o1")
    tar_input.touch()  # a different input mtime must not matter
    write_tar(tar_input, tmp_path / "o2")
    first, second = tmp_path / "o1/data/shard-000.tar", tmp_path / "o2/data/shard-000.tar"
    assert sha(first) == sha(second)
    with tarfile.open(first) as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)


def test_gzipped_tar_output_is_deterministic(tmp_path):
    path = tmp_path / "in" / "s.tar.gz"
    path.parent.mkdir()
    buf = tmp_path / "plain.tar"
    make_tar(buf, [("a.jpg", JPG), ("a.txt", b"t")])
    import gzip

    path.write_bytes(gzip.compress(buf.read_bytes(), mtime=123))
    write_tar(path, tmp_path / "o1")
    write_tar(path, tmp_path / "o2")
    first = tmp_path / "o1/data/s.tar.gz"
    assert sha(first) == sha(tmp_path / "o2/data/s.tar.gz")
    assert first.read_bytes()[4:8] == b"\x00\x00\x00\x00"  # gzip mtime field
    assert [n for n, _ in tar_members(first)] == ["a.jpg", "a.txt"]


def test_tar_writer_is_atomic(tar_input, tmp_path):
    out = tmp_path / "out"
    source = open_source(str(tar_input))
    (shard,) = source.list_shards()
    sample = process(next(source.read_shard(shard)), 0)
    writer = open_writer(shard, out, source=source)
    writer.write(sample)
    final = out / "data" / "shard-000.tar"
    assert not final.exists()
    assert [p.name for p in (out / "data").iterdir()][0].startswith("shard-000.tar" + TEMP_MARKER)
    assert writer.commit() == ["data/shard-000.tar"]
    assert final.exists()
    assert [p.name for p in (out / "data").iterdir()] == ["shard-000.tar"]
    with pytest.raises(ValueError, match="committed"):
        writer.write(sample)

    # abort (explicit, and through an exception in the with-block) leaves nothing new behind
    before = final.read_bytes()
    with pytest.raises(RuntimeError):
        with open_writer(shard, out, source=source) as w2:
            w2.write(sample)
            raise RuntimeError("stage crashed")
    assert [p.name for p in (out / "data").iterdir()] == ["shard-000.tar"]
    assert final.read_bytes() == before


def test_writers_refuse_unreleasable_samples(tar_input, tmp_path):
    source = open_source(str(tar_input))
    (shard,) = source.list_shards()
    samples = list(source.read_shard(shard))
    with open_writer(shard, tmp_path / "out", source=source) as writer:
        with pytest.raises(ValueError, match="status 'quarantined'"):
            writer.write(quarantine(dict(samples[0]), "detect_error"))
        with pytest.raises(ValueError, match="status 'pending'"):
            writer.write(dict(samples[0]))  # never processed: raw bytes
        broken = dict(samples[0], status=CLEAN)
        del broken["json"]
        with pytest.raises(ValueError, match="'json' is NoneType"):
            writer.write(broken)
        with pytest.raises(ValueError, match="reserved"):
            writer.write(dict(samples[0], status=CLEAN, __fields__=("jpg", "width"), width=b"1"))
        writer.write(dict(samples[0], status=CLEAN))
    assert [n for n, _ in tar_members(tmp_path / "out/data/shard-000.tar")] == ["a.jpg", "a.json", "a.cls"]


def test_pipeline_fields_are_never_written(tar_input, tmp_path):
    _source, samples = write_tar(tar_input, tmp_path / "out")
    names = {n.split(".", 1)[1] for n, _ in tar_members(tmp_path / "out/data/shard-000.tar")}
    assert names == {"jpg", "json", "cls", "JPEG", "txt"}
    assert not names & PIPELINE_FIELDS
    assert {"status", "regions", "width", "timings"} <= PIPELINE_FIELDS


# --- parquet --------------------------------------------------------------------------------


def parquet_input(path: Path, *, struct: bool) -> pa.Table:
    n = 7
    images = [JPG + bytes([i]) for i in range(n)]
    if struct:
        image_col = pa.array([{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(images)],
                             pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        image_col = pa.array(images, pa.binary())
    table = pa.table({
        "id": pa.array(range(n), pa.int64()),
        "image": image_col,
        "caption": [f"c{i}" if i != 3 else None for i in range(n)],
        "scores": [[0.5, float(i)] for i in range(n)],
        "meta": [{"w": i, "tag": "t"} for i in range(n)],
        "when": pa.array([1_700_000_000_123_456_789 + i for i in range(n)], pa.timestamp("ns")),
        "day": pa.array([datetime.date(2024, 1, i + 1) for i in range(n)]),
    }).replace_schema_metadata({"huggingface": '{"features": {}}'})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=3)
    return table


@pytest.mark.parametrize("struct", [False, True])
def test_parquet_writer_keeps_schema_rows_and_order(tmp_path, struct):
    path = tmp_path / "in" / "part-0.parquet"
    table = parquet_input(path, struct=struct)
    source = open_source(str(path))
    (shard,) = source.list_shards()
    out = tmp_path / "out"
    writer = open_writer(shard, out, source=source)
    assert isinstance(writer, ParquetShardWriter)
    writer.buffer_rows = 2  # several row groups, written as samples arrive
    for i, sample in enumerate(source.read_shard(shard)):
        if i == 2:
            continue  # quarantined upstream: its row is dropped
        writer.write(process(sample, i))
    assert not (out / "data" / "part-0.parquet").exists()
    assert writer.commit() == ["data/part-0.parquet"]

    result = pq.read_table(out / "data" / "part-0.parquet")
    assert result.schema == table.schema
    assert result.schema.metadata == table.schema.metadata
    kept = [i for i in range(7) if i != 2]
    expected = table.take(kept)
    for name in table.column_names:
        if name != "image":
            assert result.column(name).equals(expected.column(name)), name
    images = result.column("image").to_pylist()
    if struct:
        assert [im["path"] for im in images] == [f"img{i}.jpg" for i in kept]
        images = [im["bytes"] for im in images]
    assert images == [JPG[:4] + b"ANON%d" % i for i in kept]
    meta = pq.ParquetFile(out / "data" / "part-0.parquet").metadata
    assert meta.num_row_groups == 3
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_parquet_writer_deterministic_and_empty_when_all_quarantined(tmp_path):
    path = tmp_path / "in" / "p.parquet"
    parquet_input(path, struct=False)
    source = ParquetSource([str(path)])
    (shard,) = source.list_shards()
    for out in ("o1", "o2"):
        with open_writer(shard, tmp_path / out, source=source) as writer:
            for i, s in enumerate(source.read_shard(shard)):
                writer.write(process(s, i))
    assert sha(tmp_path / "o1/data/p.parquet") == sha(tmp_path / "o2/data/p.parquet")
    with open_writer(shard, tmp_path / "o3", source=source):
        pass
    empty = pq.read_table(tmp_path / "o3/data/p.parquet")
    assert empty.num_rows == 0 and empty.schema == source.schema(shard)


def test_parquet_writer_abort_removes_temp(tmp_path):
    path = tmp_path / "in" / "p.parquet"
    parquet_input(path, struct=False)
    source = ParquetSource([str(path)])
    (shard,) = source.list_shards()
    writer = open_writer(shard, tmp_path / "out", source=source)
    writer.write(process(next(source.read_shard(shard)), 0))
    writer.abort()
    assert list((tmp_path / "out" / "data").iterdir()) == []


# --- folders --------------------------------------------------------------------------------


def test_folder_writer_mirrors_tree_atomically(tmp_path):
    root = tmp_path / "in"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "Photo.JPG").write_bytes(JPG)
    (root / "a" / "Photo.txt").write_bytes(b"caption")
    (root / "a" / "b" / "c.png").write_bytes(PNG)
    (root / "a" / "notes.txt").write_bytes(b"personal")
    (root / "x.json").write_bytes(b"{}")
    (root / "x.jpg").write_bytes(JPG)
    source = FolderSource(root, shard_size=10)
    (shard,) = source.list_shards()
    out = tmp_path / "out"
    writer = open_writer(shard, out, source=source)
    assert isinstance(writer, FolderShardWriter)
    samples = [process(s, i) for i, s in enumerate(source.read_shard(shard))]
    for s in samples:
        writer.write(s)
    finals = [p for p in (out / "data").rglob("*") if p.is_file() and TEMP_MARKER not in p.name]
    assert finals == []
    written = writer.commit()
    assert written == ["data/a/Photo.JPG", "data/a/Photo.txt", "data/a/b/c.png", "data/x.jpg",
                       "data/x.json"]
    assert sorted(p.relative_to(out).as_posix() for p in (out / "data").rglob("*") if p.is_file()) == sorted(written)
    assert (out / "data/a/Photo.txt").read_bytes() == b"caption"
    assert (out / "data/a/b/c.png").read_bytes() == PNG[:4] + b"ANON1"
    assert [s["output_path"] for s in samples] == ["data/a/Photo.JPG", "data/a/b/c.png", "data/x.jpg"]
    assert not (out / "data/a/notes.txt").exists()

    second = open_writer(shard, tmp_path / "out2", source=source)
    second.write(samples[0])
    second.abort()
    assert [p for p in (tmp_path / "out2").rglob("*") if p.is_file()] == []


def test_folder_writer_refuses_paths_outside_output(tmp_path):
    shard = Shard(id="folder-00000", url=str(tmp_path), kind="folder", members=("x.jpg",))
    writer = FolderShardWriter(shard, tmp_path / "out")
    sample = {"__key__": "x", "__image__": "jpg", "__fields__": ("jpg",), "jpg": JPG,
              "status": CLEAN, "__paths__": {"jpg": "../../escape.jpg"}}
    with pytest.raises(ValueError, match="escapes"):
        writer.write(sample)
    writer.abort()
    assert not (tmp_path / "escape.jpg").exists()


def test_atomic_write_bytes_and_stale_temp_cleanup(tmp_path):
    target = tmp_path / "d" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]
    stale = tmp_path / "data" / f"s.tar{TEMP_MARKER}123-abcd"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    assert remove_stale_temps(tmp_path) == [stale]
    assert not stale.exists() and target.exists()


# --- reading released images back (report) ------------------------------------------------


def test_read_released_image_for_each_layout(tmp_path, tar_input):
    from veil.pipelines.manifest import manifest_row, write_manifest

    out = tmp_path / "out"
    _source, samples = write_tar(tar_input, out)
    rows = [manifest_row(s) for s in samples]
    assert read_released_image(out, rows[1]) == JPG[:4] + b"ANON1"  # member B.JPEG
    with pytest.raises(FileNotFoundError):
        read_released_image(out, rows[2])  # quarantined: nothing released

    path = tmp_path / "in" / "p.parquet"
    parquet_input(path, struct=True)
    source = ParquetSource([str(path)])
    (shard,) = source.list_shards()
    prows = []
    with open_writer(shard, out, source=source) as writer:
        for i, s in enumerate(source.read_shard(shard)):
            s = process(s, i)
            if i in (1, 2):
                quarantine(s, "detect_error: test")
            else:
                writer.write(s)
            prows.append(manifest_row(s))
    write_manifest(out, shard.id, prows, run_fingerprint="f")
    assert read_released_image(out, prows[4]) == JPG[:4] + b"ANON4"
    assert read_released_image(out, prows[0]) == JPG[:4] + b"ANON0"

    root = tmp_path / "folder"
    root.mkdir()
    (root / "x.png").write_bytes(PNG)
    fsource = FolderSource(root)
    (fshard,) = fsource.list_shards()
    with open_writer(fshard, out, source=fsource) as writer:
        (sample,) = [process(s, 7) for s in fsource.read_shard(fshard)]
        writer.write(sample)
    assert read_released_image(out, manifest_row(sample)) == PNG[:4] + b"ANON7"
