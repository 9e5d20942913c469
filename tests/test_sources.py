"""Reading tar, Parquet and folder inputs into samples, and failing closed on bad data."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from veil.pipelines.sources import (
    IMAGE_EXTENSIONS,
    FolderSource,
    ParquetSource,
    Shard,
    TarSource,
    open_source,
    shard_ids,
    sniff_image_extension,
    split_key,
)
from veil.transforms.stage import PENDING, QUARANTINED

JPG = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 300
WEBP = b"RIFF\x10\x00\x00\x00WEBPVP8 " + b"\x01" * 40


def make_tar(path: Path, members: list[tuple[str, bytes]], *, gz: bool = False) -> bytes:
    """Write members (name, data) in order with tarfile; returns the file's bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if gz:
        raw = gzip.compress(raw, mtime=0)
    path.write_bytes(raw)
    return raw


def samples_members(n: int, prefix: str = "k") -> list[tuple[str, bytes]]:
    members = []
    for i in range(n):
        members += [(f"{prefix}{i}.jpg", JPG + bytes([i])), (f"{prefix}{i}.json", b'{"i": %d}' % i),
                    (f"{prefix}{i}.cls", b"%d" % i)]
    return members


def read_all(source, shard=None):
    shards = [shard] if shard else source.list_shards()
    return [s for sh in shards for s in source.read_shard(sh)]


def summary(samples):
    return [(s["__key__"], s["status"], s["reason"].split(":", 1)[0]) for s in samples]


# --- key splitting --------------------------------------------------------------------------


def test_split_key_follows_webdataset_convention():
    from webdataset.tariterators import base_plus_ext

    names = ["a.jpg", "dir/sub/a.b.JPG", "./x.json", "noext", "._a.jpg", "a.seg.png", "d.x/y.z",
             "d/noext"]
    for name in names:
        ours = split_key(name)
        theirs = base_plus_ext(name)
        if theirs == (None, None):
            assert ours is None, name
        else:
            assert ours == (theirs[0], theirs[1].lower()), name
    # Deliberate difference: WebDataset files "d/._a.jpg" under key "d/" as field "_a.jpg";
    # hidden members are not sample fields here.
    assert base_plus_ext("d/._a.jpg") == ("d/", "_a.jpg")
    assert split_key("d/._a.jpg") is None and split_key("d/.DS_Store") is None


def test_image_extensions_agree_with_imageio():
    imageio = pytest.importorskip("veil.transforms.imageio")
    if not hasattr(imageio, "IMAGE_EXTENSIONS"):
        pytest.skip("imageio does not define IMAGE_EXTENSIONS yet")
    assert set(imageio.IMAGE_EXTENSIONS) == set(IMAGE_EXTENSIONS)


def test_sniff_image_extension():
    assert sniff_image_extension(JPG) == "jpg"
    assert sniff_image_extension(PNG) == "png"
    assert sniff_image_extension(WEBP) == "webp"
    assert sniff_image_extension(b"II*\x00rest") == "tif"
    assert sniff_image_extension(b"MM\x00*rest") == "tif"
    assert sniff_image_extension(b"BMxxxx") == "bmp"
    assert sniff_image_extension(b"GIF89a") is None
    assert sniff_image_extension(b"") is None


# --- tar ------------------------------------------------------------------------------------


def test_tar_round_trip_with_webdataset_writer(tmp_path):
    import webdataset as wds

    path = tmp_path / "shard-000.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(4):
            sink.write({"__key__": f"s{i:03d}", "jpg": JPG + bytes([i]),
                        "json": json.dumps({"i": i}).encode(), "cls": str(i).encode()})
    source = open_source(str(path))
    assert isinstance(source, TarSource)
    (shard,) = source.list_shards()
    assert shard == Shard(id="shard-000.tar", url=str(path), kind="tar")
    assert source.approx_num_samples(shard) is None
    samples = list(source.read_shard(shard))
    assert [s["__key__"] for s in samples] == [f"s{i:03d}" for i in range(4)]
    assert [s["__index__"] for s in samples] == [0, 1, 2, 3]
    for i, s in enumerate(samples):
        assert s["status"] == PENDING and s["reason"] == ""
        assert s["__shard__"] == "shard-000.tar"
        assert s["__image__"] == "jpg"
        assert s["jpg"] == JPG + bytes([i])
        assert json.loads(s["json"]) == {"i": i}
        assert s["cls"] == str(i).encode()
        assert set(s["__fields__"]) == {"jpg", "json", "cls"}
        assert s["__paths__"]["jpg"] == f"s{i:03d}.jpg"
        assert s["__source__"] == f"s{i:03d}.jpg"


def test_tar_fields_keep_input_order_and_original_names(tmp_path):
    path = tmp_path / "a.tar"
    make_tar(path, [("dir/K1.JSON", b"{}"), ("dir/K1.JPG", JPG), ("dir/K1.txt", b"hi")])
    (s,) = read_all(TarSource([str(path)]))
    assert s["__key__"] == "dir/K1"
    assert s["__fields__"] == ("json", "jpg", "txt")
    assert s["__paths__"] == {"json": "dir/K1.JSON", "jpg": "dir/K1.JPG", "txt": "dir/K1.txt"}


def test_brace_pattern_and_glob_over_several_shards(tmp_path):
    for n in range(3):
        make_tar(tmp_path / f"shard-{n:03d}.tar", samples_members(2, prefix=f"n{n}-"))
    source = open_source(str(tmp_path / "shard-{000..002}.tar"))
    assert [s.id for s in source.list_shards()] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]
    keys = [s["__key__"] for s in read_all(source)]
    assert keys == ["n0-0", "n0-1", "n1-0", "n1-1", "n2-0", "n2-1"]
    globbed = open_source(str(tmp_path / "shard-*.tar"))
    assert [s.id for s in globbed.list_shards()] == ["shard-000.tar", "shard-001.tar", "shard-002.tar"]


def test_missing_shard_is_listed_and_quarantined(tmp_path):
    make_tar(tmp_path / "shard-000.tar", samples_members(1))
    source = open_source(str(tmp_path / "shard-{000..001}.tar"))
    shards = source.list_shards()
    assert [s.id for s in shards] == ["shard-000.tar", "shard-001.tar"]
    (bad,) = list(source.read_shard(shards[1]))
    assert bad["__key__"] == "shard-001.tar#unreadable"
    assert bad["status"] == QUARANTINED
    assert bad["reason"].startswith("unreadable_shard: FileNotFoundError")
    assert bad["__index__"] == 0


def test_fsspec_file_and_memory_urls(tmp_path):
    raw = make_tar(tmp_path / "x.tar", samples_members(2))
    file_source = open_source(f"file://{tmp_path}/x.tar")
    assert [s["__key__"] for s in read_all(file_source)] == ["k0", "k1"]

    fs = fsspec.filesystem("memory")
    for n in range(2):
        with fs.open(f"/veiltest/m-{n}.tar", "wb") as fh:
            fh.write(raw)
    try:
        mem = open_source("memory://veiltest/m-{0..1}.tar")
        assert [s.id for s in mem.list_shards()] == ["m-0.tar", "m-1.tar"]
        assert [s["__key__"] for s in read_all(mem)] == ["k0", "k1", "k0", "k1"]
        assert all(s["status"] == PENDING for s in read_all(mem))
    finally:
        fs.rm("/veiltest", recursive=True)


def test_colliding_basenames_get_relative_ids():
    assert shard_ids(["/d/a/x.tar", "/d/b/x.tar"]) == ["a/x.tar", "b/x.tar"]
    assert shard_ids(["s3://bk/p/a/x.tar", "s3://bk/p/b/x.tar"]) == ["a/x.tar", "b/x.tar"]
    assert shard_ids(["/d/a/x.tar", "/d/b/y.tar"]) == ["x.tar", "y.tar"]
    with pytest.raises(ValueError):
        shard_ids(["/d/x.tar", "/d/x.tar"])


def _offsets(raw: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return {m.name: m for m in tf.getmembers()}


def _end_of_members(raw: bytes) -> int:
    last = list(_offsets(raw).values())[-1]
    return last.offset_data + ((last.size + 511) // 512) * 512


def _truncation_cases(raw: bytes) -> list[tuple[str, int, list[tuple[str, str, str]]]]:
    m = _offsets(raw)
    end = _end_of_members(raw)
    T = ("t.tar#truncated", QUARANTINED, "truncated_tar")
    ok = PENDING
    return [
        ("empty file", 0, [T]),
        ("mid first header", 100, [T]),
        ("mid member data", m["k1.jpg"].offset_data + 10,
         [("k0", ok, ""), ("k1", QUARANTINED, "truncated_tar"), T]),
        ("mid header between samples", m["k1.jpg"].offset + 200,
         [("k0", QUARANTINED, "truncated_tar"), T]),
        ("mid header inside a sample", m["k1.json"].offset + 50,
         [("k0", ok, ""), ("k1", QUARANTINED, "truncated_tar"), T]),
        ("in member padding", m["k1.cls"].offset_data + 1 + 3,
         [("k0", ok, ""), ("k1", QUARANTINED, "truncated_tar"), T]),
        ("missing end marker", end,
         [("k0", ok, ""), ("k1", ok, ""), ("k2", QUARANTINED, "truncated_tar"), T]),
        ("partial end marker", end + 100,
         [("k0", ok, ""), ("k1", ok, ""), ("k2", QUARANTINED, "truncated_tar"), T]),
        ("one end block is enough", end + 512, [("k0", ok, ""), ("k1", ok, ""), ("k2", ok, "")]),
    ]


def _raw3(tmp_path: Path) -> bytes:
    return make_tar(tmp_path / "full.tar", samples_members(3))


@pytest.mark.parametrize("case", range(9))
def test_truncated_tar_quarantines_exactly(tmp_path, case):
    raw = _raw3(tmp_path)
    name, cut, expected = _truncation_cases(raw)[case]
    path = tmp_path / "t.tar"
    path.write_bytes(raw[:cut])
    samples = read_all(TarSource([str(path)]))
    assert summary(samples) == expected, name
    assert [s["__index__"] for s in samples] == list(range(len(samples)))
    for s in samples:
        if s["status"] == QUARANTINED:
            # no bytes of a cut or possibly incomplete sample are passed on
            assert not any(isinstance(v, bytes) for v in s.values()), name
    if expected[-1][0] == "t.tar#truncated":
        assert samples[-1]["reason"] == (
            "truncated_tar: shard ends before its end-of-archive marker; members after byte "
            f"{cut} are unknown")


def test_truncated_member_reason_names_member_and_sizes(tmp_path):
    raw = _raw3(tmp_path)
    info = _offsets(raw)["k1.jpg"]
    path = tmp_path / "t.tar"
    path.write_bytes(raw[: info.offset_data + 10])
    samples = read_all(TarSource([str(path)]))
    assert samples[1]["reason"] == f"truncated_tar: member 'k1.jpg' is cut off after 10 of {info.size} bytes"
    assert samples[1]["__fields__"] == ("jpg",)


def test_gzipped_tar_round_trip_and_truncation(tmp_path):
    import random

    rng = random.Random(0)  # incompressible payloads, so half the file holds whole samples
    members = [(f"k{i}.jpg", JPG + rng.randbytes(4000)) for i in range(4)]
    raw = make_tar(tmp_path / "z.tar.gz", members, gz=True)
    samples = read_all(open_source(str(tmp_path / "z.tar.gz")))
    assert [s["__key__"] for s in samples] == ["k0", "k1", "k2", "k3"]
    assert samples[2]["jpg"] == members[2][1]
    (tmp_path / "c.tgz").write_bytes(raw[: len(raw) // 2])
    samples = read_all(open_source(str(tmp_path / "c.tgz")))
    assert samples[-1]["__key__"] == "c.tgz#truncated"
    assert all(s["status"] == QUARANTINED for s in samples[-2:])
    assert samples[0]["status"] == PENDING


def test_corrupt_header_mid_shard(tmp_path):
    raw = bytearray(_raw3(tmp_path))
    off = _offsets(bytes(raw))["k1.jpg"].offset
    raw[off:off + 512] = b"\x07" * 512
    path = tmp_path / "t.tar"
    path.write_bytes(bytes(raw))
    samples = read_all(TarSource([str(path)]))
    assert summary(samples) == [("k0", QUARANTINED, "corrupt_tar"),
                                ("t.tar#corrupt", QUARANTINED, "corrupt_tar")]
    assert samples[-1]["reason"] == (f"corrupt_tar: invalid tar header at byte {off}; members "
                                     f"after it are unknown")


def test_not_a_tar_is_unreadable(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(JPG * 40)
    (s,) = read_all(TarSource([str(path)]))
    assert s["__key__"] == "t.tar#unreadable"
    assert s["reason"].startswith("unreadable_shard: not a readable tar archive")


def test_empty_valid_tar_yields_nothing(tmp_path):
    make_tar(tmp_path / "e.tar", [])
    assert read_all(TarSource([str(tmp_path / "e.tar")])) == []


@pytest.mark.parametrize("members, reason", [
    ([("a.json", b"{}"), ("a.txt", b"t")], "no_image_field: fields: json, txt"),
    ([("a.jpg", JPG), ("a.png", PNG)], "multiple_image_fields: jpg, png (fields: jpg, png)"),
    ([("a.left.jpg", JPG), ("a.right.jpg", JPG)],
     "multiple_image_fields: left.jpg, right.jpg (fields: left.jpg, right.jpg)"),
    ([("a.jpg", JPG), ("a.seg.png", PNG)], "multiple_image_fields: jpg, seg.png (fields: jpg, seg.png)"),
    ([("a.jpg", JPG), ("a.gif", b"GIF89a")], "unsupported_visual_field: gif cannot be anonymized (fields: jpg, gif)"),
    ([("a.jpg", JPG), ("a.width", b"7")], "reserved_field_name: field(s) width clash with pipeline fields (fields: jpg, width)"),
    ([("a.jpg", JPG), ("a.jpg", JPG)], "duplicate_field: member 'a.jpg' appears twice"),
])
def test_field_problems_quarantine_the_sample(tmp_path, members, reason):
    path = tmp_path / "t.tar"
    make_tar(path, members + [("z.jpg", JPG)])
    samples = read_all(TarSource([str(path)]))
    assert [s["__key__"] for s in samples] == ["a", "z"]
    assert samples[0]["status"] == QUARANTINED
    assert samples[0]["reason"] == reason
    assert not any(isinstance(v, bytes) for v in samples[0].values())
    assert samples[1]["status"] == PENDING


def test_repeated_key_is_quarantined_and_keys_stay_unique(tmp_path):
    path = tmp_path / "t.tar"
    make_tar(path, [("a.jpg", JPG), ("b.jpg", JPG), ("a.jpg", JPG + b"2"), ("a.json", b"{}"),
                    ("c.jpg", JPG), ("a.jpg", JPG)])
    samples = read_all(TarSource([str(path)]))
    assert summary(samples) == [
        ("a", PENDING, ""), ("b", PENDING, ""), ("a#duplicate-1", QUARANTINED, "duplicate_key"),
        ("c", PENDING, ""), ("a#duplicate-2", QUARANTINED, "duplicate_key")]
    assert samples[2]["__fields__"] == ("jpg", "json")
    assert "jpg" not in samples[2]
    assert samples[0]["jpg"] == JPG


def test_non_sample_members_are_skipped_and_reported(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, kind in [("d", tarfile.DIRTYPE), ("d/link.jpg", tarfile.SYMTYPE)]:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "a.jpg" if kind == tarfile.SYMTYPE else ""
            tf.addfile(info)
        for name, data in [("d/a.jpg", JPG), ("d/._a.jpg", b"resource fork"), ("d/README", b"r"),
                           ("__meta__", b"m"), ("d/b.jpg", JPG)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    path = tmp_path / "t.tar"
    path.write_bytes(buf.getvalue())
    source = TarSource([str(path)])
    samples = read_all(source)
    # A link named like a sample's image quarantines that sample (tests/test_hostile.py).
    assert summary(samples) == [("d/link", QUARANTINED, "link_member"), ("d/a", PENDING, ""),
                                ("d/b", PENDING, "")]
    assert {(k.path, k.reason.split(":")[0]) for k in source.skipped()} == {
        ("d/._a.jpg", "hidden member or no extension"),
        ("d/README", "hidden member or no extension"),
        ("__meta__", "webdataset metadata member"),
    }


def test_member_size_limit(tmp_path):
    path = tmp_path / "t.tar"
    make_tar(path, [("a.jpg", JPG * 10), ("b.jpg", JPG)])
    samples = read_all(TarSource([str(path)], max_member_bytes=len(JPG) * 2))
    assert summary(samples) == [("a", QUARANTINED, "file_too_large"), ("b", PENDING, "")]
    assert samples[1]["jpg"] == JPG


def test_unicode_member_names(tmp_path):
    path = tmp_path / "t.tar"
    make_tar(path, [("visage-é/ü" + "x" * 120 + ".jpg", JPG)])
    (s,) = read_all(TarSource([str(path)]))
    assert s["__key__"] == "visage-é/ü" + "x" * 120
    assert s["status"] == PENDING


# --- parquet --------------------------------------------------------------------------------


def write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=3)


def test_parquet_bytes_column_with_key_and_other_columns(tmp_path):
    table = pa.table({
        "key": ["a", "b", "c"],
        "image": pa.array([JPG, PNG, None], pa.binary()),
        "caption": ["x", None, "z"],
        "tags": [[1, 2], [], None],
    })
    write_parquet(tmp_path / "part-0.parquet", table)
    source = open_source(str(tmp_path / "part-0.parquet"))
    assert isinstance(source, ParquetSource)
    (shard,) = source.list_shards()
    assert shard.id == "part-0.parquet"
    assert source.approx_num_samples(shard) == 3
    samples = list(source.read_shard(shard))
    assert summary(samples) == [("a", PENDING, ""), ("b", PENDING, ""), ("c", QUARANTINED, "missing_image")]
    assert samples[0]["__image__"] == "jpg" and samples[0]["jpg"] == JPG
    assert samples[1]["__image__"] == "png" and samples[1]["__fields__"] == ("png",)
    assert samples[0]["__row__"] == {"key": "a", "caption": "x", "tags": [1, 2], "image": None}
    assert samples[1]["__source__"] == "row 1"
    assert [s["__index__"] for s in samples] == [0, 1, 2]


def test_parquet_hf_struct_column_without_key(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array([{"bytes": PNG, "path": "x.jpg"}, {"bytes": b"????", "path": "y.JPEG"},
                       {"bytes": b"????", "path": None}, {"bytes": None, "path": "z.jpg"},
                       {"bytes": b"", "path": None}], struct)
    table = pa.table({"image": images, "label": [0, 1, 2, 3, 4]})
    write_parquet(tmp_path / "data" / "train-00000.parquet", table)
    source = open_source(str(tmp_path))
    assert isinstance(source, ParquetSource)
    (shard,) = source.list_shards()
    assert shard.id == "data/train-00000.parquet"
    samples = list(source.read_shard(shard))
    assert [s["__key__"] for s in samples] == [f"data/train-00000-{i:08d}" for i in range(5)]
    # bytes win over the path hint; the hint is used when the bytes are not recognised
    assert [s["__image__"] for s in samples[:3]] == ["png", "jpeg", "bin"]
    assert samples[0]["__row__"] == {"label": 0, "image": {"bytes": None, "path": "x.jpg"}}
    assert summary(samples[3:]) == [("data/train-00000-00000003", QUARANTINED, "missing_image"),
                                    ("data/train-00000-00000004", QUARANTINED, "empty_file")]
    assert "z.jpg" in samples[3]["reason"]


def test_parquet_wrong_image_column_quarantines_every_row(tmp_path):
    write_parquet(tmp_path / "p.parquet", pa.table({"img": [JPG, JPG]}))
    samples = read_all(open_source(str(tmp_path / "p.parquet")))
    assert summary(samples) == [("p-00000000", QUARANTINED, "no_image_column"),
                                ("p-00000001", QUARANTINED, "no_image_column")]
    other = read_all(open_source(str(tmp_path / "p.parquet"), image_column="img"))
    assert [s["status"] for s in other] == [PENDING, PENDING]


def test_parquet_duplicate_keys_and_unreadable_file(tmp_path):
    write_parquet(tmp_path / "a.parquet", pa.table({"__key__": ["x", "x"], "image": [JPG, JPG]}))
    (tmp_path / "b.parquet").write_bytes(b"not parquet at all")
    source = open_source(str(tmp_path / "*.parquet"))
    samples = read_all(source)
    assert summary(samples) == [("x", PENDING, ""), ("x#duplicate-row1", QUARANTINED, "duplicate_key"),
                                ("b.parquet#unreadable", QUARANTINED, "unreadable_shard")]
    assert source.approx_num_samples(source.list_shards()[1]) is None


def test_parquet_schema_keeps_metadata(tmp_path):
    table = pa.table({"image": [JPG]}).replace_schema_metadata({"huggingface": '{"info": 1}'})
    write_parquet(tmp_path / "p.parquet", table)
    source = open_source(str(tmp_path / "p.parquet"))
    schema = source.schema(source.list_shards()[0])
    assert schema.metadata[b"huggingface"] == b'{"info": 1}'
    assert schema.field("image").type == pa.binary()


# --- folders --------------------------------------------------------------------------------


def build_tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "top.jpg").write_bytes(JPG)
    (root / "top.json").write_bytes(b'{"who": "x"}')
    (root / "a" / "Photo.JPG").write_bytes(JPG)
    (root / "a" / "Photo.txt").write_bytes(b"caption")
    (root / "a" / "b" / "c.PNG").write_bytes(PNG)
    (root / "a" / "b" / "d.webp").write_bytes(WEBP)
    (root / "a" / "notes.txt").write_bytes(b"John Smith's phone number")
    (root / "a" / ".DS_Store").write_bytes(b"x")
    (root / "a" / "dup.jpg").write_bytes(JPG)
    (root / "a" / "dup.png").write_bytes(PNG)
    (root / "anim.gif").write_bytes(b"GIF89a")


def test_folder_tree_samples_sidecars_and_skips(tmp_path):
    root = tmp_path / "in"
    build_tree(root)
    source = open_source(str(root), folder_shard_size=100)
    assert isinstance(source, FolderSource)
    (shard,) = source.list_shards()
    assert shard.id == "folder-00000" and shard.kind == "folder"
    assert source.approx_num_samples(shard) == 6
    samples = list(source.read_shard(shard))
    by_key = {s["__key__"]: s for s in samples}
    assert list(by_key) == ["a/Photo", "a/b/c", "a/b/d", "a/dup", "anim", "top"]
    photo = by_key["a/Photo"]
    assert photo["status"] == PENDING
    assert photo["__image__"] == "jpg" and photo["jpg"] == JPG and photo["txt"] == b"caption"
    assert photo["__paths__"] == {"jpg": "a/Photo.JPG", "txt": "a/Photo.txt"}
    assert photo["__source__"] == "a/Photo.JPG"
    assert by_key["a/b/c"]["__image__"] == "png"
    assert by_key["top"]["__fields__"] == ("jpg", "json")
    assert by_key["a/dup"]["reason"].startswith("multiple_image_fields")
    assert by_key["anim"]["reason"].startswith("unsupported_visual_field")
    assert [s["__index__"] for s in samples] == list(range(6))
    assert {(k.path, k.reason) for k in source.skipped()} == {
        ("a/notes.txt", "no image file with the same name"),
        ("a/.DS_Store", "hidden file or no extension"),
    }


def test_folder_shards_chunk_sorted_samples(tmp_path):
    root = tmp_path / "in"
    build_tree(root)
    source = FolderSource(root, shard_size=4)
    shards = source.list_shards()
    assert [s.id for s in shards] == ["folder-00000", "folder-00001"]
    assert [source.approx_num_samples(s) for s in shards] == [4, 2]
    assert shards[1].members == ("anim.gif", "top.jpg", "top.json")
    keys = [s["__key__"] for sh in shards for s in source.read_shard(sh)]
    assert keys == ["a/Photo", "a/b/c", "a/b/d", "a/dup", "anim", "top"]
    assert shards[0].digest() != shards[1].digest()
    assert source.list_shards() == shards  # listing is cached and stable


def test_folder_unreadable_entries_do_not_stop_or_hang(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "ok.jpg").write_bytes(JPG)
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    os.mkfifo(root / "pipe.jpg")
    (root / "dir.jpg").mkdir()  # a directory named like an image is walked, not read
    (root / "dir.jpg" / "inner.png").write_bytes(PNG)
    os.symlink(root, root / "sub" / "loop")  # a symlink loop
    os.symlink(root / "ok.jpg", root / "alias.jpg")
    source = FolderSource(root, follow_symlinks=True)  # links inside: tests/test_hostile.py
    samples = read_all(source)
    assert summary(samples) == [
        ("alias", PENDING, ""),
        ("dangling", QUARANTINED, "unreadable_path"),
        ("dir.jpg/inner", PENDING, ""),
        ("ok", PENDING, ""),
        ("pipe", QUARANTINED, "unreadable_path"),
    ]
    assert "FileNotFoundError" in samples[1]["reason"]
    assert "not a regular file" in samples[4]["reason"]
    assert ("sub/loop", "symlinked directory not followed") in {(k.path, k.reason) for k in source.skipped()}


def test_folder_size_limit(tmp_path):
    (tmp_path / "big.jpg").write_bytes(JPG * 10)
    (tmp_path / "small.jpg").write_bytes(JPG)
    samples = read_all(FolderSource(tmp_path, max_member_bytes=len(JPG) + 1))
    assert summary(samples) == [("big", QUARANTINED, "file_too_large"), ("small", PENDING, "")]


def test_open_source_classifies_directories_and_rejects_nonsense(tmp_path):
    (tmp_path / "tars").mkdir()
    make_tar(tmp_path / "tars" / "s-0.tar", samples_members(1))
    assert isinstance(open_source(str(tmp_path / "tars")), TarSource)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image, tar or Parquet"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a directory"):
        open_source(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="matches no file"):
        open_source(str(tmp_path / "tars" / "*.tar.gz"))
    with pytest.raises(ValueError, match="only .tar"):
        open_source(str(tmp_path / "{a.tar,b.parquet}"))
