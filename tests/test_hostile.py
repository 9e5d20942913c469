"""Hostile inputs: archives and trees built to hurt whoever extracts the release.

Member names that escape (``../``, absolute, drive letters), act on terminals (control
characters, overrides), are not UTF-8 or too long; links, devices and FIFOs; names that
collide after normalisation; symlinks out of a folder input; outputs nested in inputs. The
release must hold only safe names, every input key must be in the manifest, and the hostile
ones must be quarantined or skipped with their reason, escaped.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from helpers import face_photo, jpeg_bytes

from veil.pipelines.sources import (
    FolderSource,
    ParquetSource,
    TarSource,
    UnsafeNameError,
    check_release_name,
    name_problem,
    safe_relative_name,
)
from veil.transforms.stage import PENDING, QUARANTINED

ESC = "\x1b[31m"
LONG = "x" * 300


# --- names ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, expected", [
    ("a.jpg", "a.jpg"),
    ("./a.jpg", "a.jpg"),
    ("a/./b.jpg", "a/b.jpg"),
    ("a//b.jpg", "a/b.jpg"),
    ("visage-é/ü.jpg", "visage-é/ü.jpg"),
    ("a..b/c...jpg", "a..b/c...jpg"),  # dots inside a component are not '..'
    ("2020-01-01T10:00:00.jpg", "2020-01-01T10:00:00.jpg"),  # a colon is not a drive letter
])
def test_safe_names_are_normalised(name, expected):
    assert safe_relative_name(name) == expected


@pytest.mark.parametrize("name, why", [
    ("../../../escaped.jpg", "'..' component"),
    ("a/../../b.jpg", "'..' component"),
    ("..", "'..' component"),
    ("/abs/abs.jpg", "absolute path"),
    ("C:/x.jpg", "Windows drive letter"),
    ("c:x.jpg", "Windows drive letter"),
    ("win\\evil.jpg", "backslash"),
    ("nul\x00.jpg", "control"),
    (f"ctrl{ESC}.jpg", "control"),
    ("new\nline.jpg", "control"),
    ("del\x7f.jpg", "control"),
    ("c1\x9b.jpg", "control"),
    ("sep\u2028.jpg", "control"),
    ("gpj.\u202eexe.jpg", "bidirectional"),
    ("bad\udcff.jpg", "UTF-8"),
    (LONG + ".jpg", "255 bytes"),
    ("é" * 130 + ".jpg", "255 bytes"),  # 260 bytes in 134 characters
    ("/".join(["d" * 200] * 6) + ".jpg", "1024 bytes"),
    ("./", "empty"),
    ("", "empty"),
])
def test_unsafe_names_are_refused(name, why):
    with pytest.raises(UnsafeNameError, match=why):
        safe_relative_name(name)
    with pytest.raises(ValueError, match="refusing to release"):
        check_release_name(name)


def test_release_names_must_already_be_normalised():
    check_release_name("a/b.jpg")
    with pytest.raises(ValueError, match="not normalised"):
        check_release_name("a/./b.jpg")


# --- hostile tar ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(faces_dir) -> dict[str, bytes]:
    import skimage.data

    out = {n: jpeg_bytes(face_photo(faces_dir, f"{n}.jpg", max_side=192))
           for n in ("obama", "biden", "grace_hopper")}
    out["coffee"] = jpeg_bytes(skimage.data.coffee()[::4, ::4])
    return out


def _add(tf: tarfile.TarFile, name: str, data: bytes = b"", *, kind: bytes = tarfile.REGTYPE,
         linkname: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3  # /dev/null
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


#: (key in the manifest, status, reason code) for every sample of the hostile shard.
EXPECTED_TAR = [
    ("ok", PENDING, ""),
    (repr("../../../escaped"), QUARANTINED, "unsafe_name"),
    (repr("/abs/abs"), QUARANTINED, "unsafe_name"),
    (repr(f"ctrl{ESC}red"), QUARANTINED, "unsafe_name"),
    (repr("new\nline"), QUARANTINED, "unsafe_name"),
    (repr("win\\evil"), QUARANTINED, "unsafe_name"),
    (repr("C:/drive"), QUARANTINED, "unsafe_name"),
    (repr("bad\udcff"), QUARANTINED, "unsafe_name"),
    (repr("long/" + LONG), QUARANTINED, "unsafe_name"),
    ("a/b", QUARANTINED, "duplicate_field"),
    ("dot", PENDING, ""),
    ("link", QUARANTINED, "link_member"),
    ("hard", QUARANTINED, "link_member"),
    ("fifo", QUARANTINED, "special_member"),
    ("dev", QUARANTINED, "special_member"),
    ("c/d", PENDING, ""),
    ("e", PENDING, ""),
    ("c/d#duplicate-1", QUARANTINED, "duplicate_key"),
]


@pytest.fixture(scope="module")
def hostile_tar(tmp_path_factory, photos) -> Path:
    path = tmp_path_factory.mktemp("hostile-in") / "shard-000.tar"
    face = photos["obama"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        _add(tf, "ok.jpg", photos["biden"])
        _add(tf, "ok.json", b'{"caption": "fine"}')
        _add(tf, "../../../escaped.jpg", face)
        _add(tf, "/abs/abs.jpg", face)
        _add(tf, f"ctrl{ESC}red.jpg", face)
        _add(tf, "new\nline.jpg", face)
        _add(tf, "win\\evil.jpg", face)
        _add(tf, "C:/drive.jpg", face)
        _add(tf, "bad\udcff.jpg", face)  # not UTF-8: PAX stores the raw byte
        _add(tf, "long/" + LONG + ".jpg", face)
        _add(tf, "a/./b.jpg", face)  # the same file as the next one after normalisation
        _add(tf, "a/b.jpg", photos["grace_hopper"])
        _add(tf, "./dot.jpg", photos["grace_hopper"])
        _add(tf, "link.jpg", kind=tarfile.SYMTYPE, linkname="/etc/passwd")
        _add(tf, "hard.jpg", kind=tarfile.LNKTYPE, linkname="ok.jpg")
        _add(tf, "fifo.jpg", kind=tarfile.FIFOTYPE)
        _add(tf, "dev.jpg", kind=tarfile.CHRTYPE)
        _add(tf, "notes", kind=tarfile.SYMTYPE, linkname="/etc/shadow")
        _add(tf, "c/./d.jpg", face)
        _add(tf, "e.jpg", photos["coffee"])
        _add(tf, "c/d.jpg", face)  # the key c/d again, after another sample
    return path


def test_hostile_tar_members_are_quarantined_or_skipped(hostile_tar):
    source = TarSource([str(hostile_tar)])
    (shard,) = source.list_shards()
    samples = list(source.read_shard(shard))
    assert [(s["__key__"], s["status"], s["reason"].split(":", 1)[0]) for s in samples] == EXPECTED_TAR
    by_key = {s["__key__"]: s for s in samples}
    # Released names are the normalised ones; quarantined samples hold no bytes.
    assert by_key["dot"]["__paths__"] == {"jpg": "dot.jpg"}
    assert by_key["c/d"]["__paths__"] == {"jpg": "c/d.jpg"}
    for s in samples:
        if s["status"] == QUARANTINED:
            assert not any(isinstance(v, bytes) for v in s.values()), s["__key__"]
    escaped = by_key[repr("../../../escaped")]
    assert escaped["reason"] == "unsafe_name: member '../../../escaped.jpg': '..' component"
    assert escaped["__source__"] == repr("../../../escaped.jpg")
    assert by_key["a/b"]["reason"] == ("duplicate_field: members 'a/./b.jpg' and 'a/b.jpg' both "
                                       "name 'a/b.jpg' after normalisation")
    assert "symbolic link to '/etc/passwd'" in by_key["link"]["reason"]
    assert "hard link to 'ok.jpg'" in by_key["hard"]["reason"]
    assert "FIFO" in by_key["fifo"]["reason"] and "character device" in by_key["dev"]["reason"]
    # Nothing shown to a person carries a raw control character or a surrogate.
    for s in samples:
        for text in (s["__key__"], s["reason"], s["__source__"]):
            assert name_problem(text or "-", path=False) is None, text
    assert [(k.path, k.reason) for k in source.skipped()] == [
        ("notes", "not a regular file: symbolic link to '/etc/shadow'")]


def _release_names(tar_path: Path, dest: Path) -> list[str]:
    """Extract with the 'data' filter (refuses escaping names and links) and check that
    everything landed inside ``dest``."""
    dest.mkdir()
    with tarfile.open(tar_path) as tf:
        names = tf.getnames()
        assert all(m.isreg() for m in tf.getmembers())
        tf.extractall(dest, filter="data")
    real = dest.resolve()
    for path in dest.rglob("*"):
        assert path.resolve().is_relative_to(real) and not path.is_symlink(), path
    return sorted(names)


def _manifest(out: Path) -> list[dict]:
    from veil.pipelines.manifest import read_manifests

    rows = read_manifests(out).to_pylist()
    for r in rows:
        r.pop("timings")
        r.pop("seconds")
    return sorted(rows, key=lambda r: r["index"])


@pytest.fixture(scope="module")
def hostile_local_run(hostile_tar, tmp_path_factory, models_dir):
    from veil.config import RunConfig
    from veil.orchestrate import run  # the release and its report

    out = tmp_path_factory.mktemp("hostile-out") / "out"
    summary = run(RunConfig(input=str(hostile_tar), output=str(out), runner="local",
                            progress=False, batch_size=4, max_failure_ratio=1.0))
    return out, summary


def test_hostile_tar_release_holds_only_safe_names(hostile_local_run, tmp_path):
    out, summary = hostile_local_run
    names = _release_names(out / "data" / "shard-000.tar", tmp_path / "x")
    assert names == ["c/d.jpg", "dot.jpg", "e.jpg", "ok.jpg", "ok.json"]
    assert (tmp_path / "x" / "ok.json").read_bytes() == b'{"caption": "fine"}'
    assert not (tmp_path / "escaped.jpg").exists() and not Path("/abs/abs.jpg").exists()

    rows = _manifest(out)
    # Every input key is accounted for exactly once, with the expected reason.
    assert [(r["key"], r["reason"].split(":", 1)[0]) for r in rows] == [
        (k, reason) for k, _status, reason in EXPECTED_TAR]
    for r in rows:
        expected = dict((k, st) for k, st, _ in EXPECTED_TAR)[r["key"]]
        if expected == QUARANTINED:
            assert r["status"] == QUARANTINED and r["output_path"] is None, r
        else:
            assert r["status"] in ("anonymized", "clean"), r
        for col in ("key", "source", "reason"):
            assert name_problem(r[col] or "x", path=False) is None, r[col]
    status = {r["key"]: r["status"] for r in rows}
    assert [status[k] for k in ("ok", "dot", "c/d", "e")] == ["anonymized"] * 3 + ["clean"]
    assert summary.counts[QUARANTINED] == sum(st == QUARANTINED for _, st, _ in EXPECTED_TAR)
    assert summary.skipped_files == [{"shard": "shard-000.tar", "path": "notes",
                                      "reason": "not a regular file: symbolic link to '/etc/shadow'"}]
    # The report shows the quarantined keys escaped, never a raw escape sequence.
    html = (out / "report" / "index.html").read_text()
    assert "\x1b" not in html and "\udcff" not in html
    assert not (out / ".veil.lock").exists()


@pytest.mark.slow
def test_hostile_tar_through_ray_matches_local(hostile_tar, hostile_local_run, tmp_path, ray_local):
    from veil.config import RunConfig
    from veil.pipelines.driver import run

    out = tmp_path / "ray"
    run(RunConfig(input=str(hostile_tar), output=str(out), runner="ray", progress=False,
                  batch_size=4, workers=1, max_failure_ratio=1.0))
    local_out, _ = hostile_local_run
    assert _release_names(out / "data" / "shard-000.tar", tmp_path / "x") == [
        "c/d.jpg", "dot.jpg", "e.jpg", "ok.jpg", "ok.json"]
    assert (out / "data" / "shard-000.tar").read_bytes() == (
        local_out / "data" / "shard-000.tar").read_bytes()
    assert _manifest(out) == _manifest(local_out)


def test_writers_refuse_unsafe_names_before_writing_any_field(tmp_path):
    from veil.pipelines.sinks import FolderShardWriter, TarShardWriter
    from veil.pipelines.sources import Shard
    from veil.transforms.stage import CLEAN

    sample = {"__key__": "k", "__image__": "jpg", "__fields__": ("jpg", "json"), "status": CLEAN,
              "jpg": b"\xff\xd8\xff", "json": b"{}",
              "__paths__": {"jpg": "k.jpg", "json": "../../k.json"}}
    tar_writer = TarShardWriter(Shard(id="s.tar", url="", kind="tar"), tmp_path / "t")
    with pytest.raises(ValueError, match="refusing to release"):
        tar_writer.write(dict(sample))
    tar_writer.commit()
    with tarfile.open(tmp_path / "t" / "data" / "s.tar") as tf:
        assert tf.getnames() == []  # not even the safe first field
    folder_writer = FolderShardWriter(Shard(id="folder-00000", url="", kind="folder"), tmp_path / "f")
    with pytest.raises(ValueError, match="refusing to release"):
        folder_writer.write(dict(sample, __paths__={"jpg": f"k{ESC}.jpg", "json": "k.json"}))
    folder_writer.commit()
    assert [p for p in (tmp_path / "f").rglob("*") if p.is_file()] == []


def test_parquet_keys_from_data_are_checked_as_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jpg = b"\xff\xd8\xff\xe0" + bytes(64)
    keys = ["fine", f"evil{ESC}", "http://example.org/a.jpg", "C:\\data\\b.jpg", "fine"]
    pq.write_table(pa.table({"key": keys, "image": [jpg] * 5}), tmp_path / "p.parquet")
    source = ParquetSource([str(tmp_path / "p.parquet")])
    samples = list(source.read_shard(source.list_shards()[0]))
    # Keys are identifiers here (never file names): only text rules apply.
    assert [(s["__key__"], s["status"], s["reason"].split(":", 1)[0]) for s in samples] == [
        ("fine", PENDING, ""), (repr(f"evil{ESC}"), QUARANTINED, "unsafe_name"),
        ("http://example.org/a.jpg", PENDING, ""), ("C:\\data\\b.jpg", PENDING, ""),
        ("fine#duplicate-row4", QUARANTINED, "duplicate_key")]
    assert "\x1b" not in samples[1]["reason"]


# --- hostile folder trees -------------------------------------------------------------------


@pytest.fixture()
def hostile_tree(tmp_path, photos) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(photos["obama"])
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "real.jpg").write_bytes(photos["biden"])
    (root / "sub" / "real2.jpg").write_bytes(photos["grace_hopper"])
    os.symlink(outside / "secret.jpg", root / "secret.jpg")  # absolute, leads outside
    os.symlink("../../outside/secret.jpg", root / "sub" / "rel.jpg")  # relative, outside
    os.symlink("/etc/passwd", root / "passwd.jpg")
    os.symlink("real.jpg", root / "alias.jpg")  # stays inside
    os.symlink("../real.jpg", root / "sub" / "up.jpg")  # stays inside, via '..'
    os.symlink(outside, root / "outdir")  # a directory link: never walked
    os.link(root / "real.jpg", root / "hard.jpg")  # a hard link is a plain file
    os.mkfifo(root / "pipe.jpg")
    (root / f"evil{ESC}.jpg").write_bytes(photos["obama"])
    (root / "back\\slash.jpg").write_bytes(photos["obama"])
    with open(os.path.join(os.fsencode(root), b"bad\xff.jpg"), "wb") as fh:  # not UTF-8
        fh.write(photos["obama"])
    return root


def _folder_summary(source: FolderSource) -> dict[str, tuple[str, str]]:
    samples = [s for sh in source.list_shards() for s in source.read_shard(sh)]
    return {s["__key__"]: (s["status"], s["reason"].split(":", 1)[0]) for s in samples}


FOLDER_COMMON = {
    "real": (PENDING, ""),
    "sub/real2": (PENDING, ""),
    "hard": (PENDING, ""),
    "secret": (QUARANTINED, "symlink_outside_input"),
    "sub/rel": (QUARANTINED, "symlink_outside_input"),
    "passwd": (QUARANTINED, "symlink_outside_input"),
    "pipe": (QUARANTINED, "unreadable_path"),
    repr(f"evil{ESC}"): (QUARANTINED, "unsafe_name"),
    repr("back\\slash"): (QUARANTINED, "unsafe_name"),
    repr("bad\udcff"): (QUARANTINED, "unsafe_name"),
}


def test_folder_links_are_refused_by_default(hostile_tree):
    source = FolderSource(hostile_tree)
    assert _folder_summary(source) == {**FOLDER_COMMON,
                                       "alias": (QUARANTINED, "symlink_not_followed"),
                                       "sub/up": (QUARANTINED, "symlink_not_followed")}
    assert ("outdir", "symlinked directory not followed") in {
        (k.path, k.reason) for k in source.skipped()}


def test_folder_links_inside_are_read_with_follow_symlinks(hostile_tree):
    source = FolderSource(hostile_tree, follow_symlinks=True)
    assert _folder_summary(source) == {**FOLDER_COMMON, "alias": (PENDING, ""),
                                       "sub/up": (PENDING, "")}
    samples = {s["__key__"]: s for sh in source.list_shards() for s in source.read_shard(sh)}
    assert samples["alias"]["jpg"] == (hostile_tree / "real.jpg").read_bytes()
    # The outside target is never named: it is a path on this machine, not in the dataset.
    assert str(hostile_tree.parent / "outside") not in samples["secret"]["reason"]
    assert "/etc" not in samples["passwd"]["reason"]


def test_folder_run_releases_no_link_and_no_outside_file(hostile_tree, tmp_path, models_dir):
    from veil.config import RunConfig
    from veil.pipelines.driver import run

    out = tmp_path / "out"
    summary = run(RunConfig(input=str(hostile_tree), output=str(out), runner="local",
                            progress=False, batch_size=4, max_failure_ratio=1.0,
                            io={"follow_symlinks": True}))
    released = sorted(p.relative_to(out / "data").as_posix()
                      for p in (out / "data").rglob("*") if p.is_file())
    assert released == ["alias.jpg", "hard.jpg", "real.jpg", "sub/real2.jpg", "sub/up.jpg"]
    assert not any(p.is_symlink() for p in (out / "data").rglob("*"))
    rows = {r["key"]: r for r in _manifest(out)}
    assert set(rows) == set(FOLDER_COMMON) | {"alias", "sub/up"}
    assert rows["secret"]["status"] == QUARANTINED
    assert rows["secret"]["reason"].startswith("symlink_outside_input: secret.jpg")
    assert summary.samples == len(rows)


def test_validation_reads_the_originals_the_run_read(hostile_tree, tmp_path):
    """With --follow-symlinks the run released linked files; validation must pair them with
    the same originals, not count the originals as unreadable."""
    from veil.validators.pairing import open_pairing

    anonymized = tmp_path / "anon"
    anonymized.mkdir()
    (anonymized / "alias.jpg").write_bytes((hostile_tree / "real.jpg").read_bytes())
    for follow, status in ((False, QUARANTINED), (True, PENDING)):
        pairing, _ = open_pairing(str(hostile_tree), str(anonymized), follow_symlinks=follow)
        originals = {s["__key__"]: s["status"] for sh in pairing.original.list_shards()
                     for s in pairing.original.read_shard(sh)}
        assert originals["alias"] == status
        assert originals["secret"] == QUARANTINED  # outside the tree: never, whatever the flag


def test_follow_symlinks_flag_and_config(tmp_path):
    from veil.cli import build_parser, config_from_args
    from veil.config import RunConfig

    base = ["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")]
    assert config_from_args(build_parser().parse_args(base)).io.follow_symlinks is False
    assert config_from_args(build_parser().parse_args(base + ["--follow-symlinks"])).io.follow_symlinks
    assert RunConfig.from_dict({"io": {"follow_symlinks": True}}).io.follow_symlinks
    # It changes which samples are released, so it is part of the run fingerprint.
    from veil.pipelines.driver import fingerprint_of

    assert fingerprint_of(RunConfig()) != fingerprint_of(RunConfig(io={"follow_symlinks": True}))


# --- output vs input ------------------------------------------------------------------------


def _paths_error(inp: str, out: str) -> str | None:
    from veil.config import ConfigError, RunConfig

    try:
        RunConfig(input=inp, output=out).validate_paths()
    except ConfigError as exc:
        return str(exc)
    return None


def test_output_inside_input_and_input_inside_output_are_refused(tmp_path, monkeypatch):
    inp = tmp_path / "in"
    (inp / "sub").mkdir(parents=True)
    (tmp_path / "shards").mkdir()
    assert "inside the input" in _paths_error(str(inp), str(inp / "out"))
    assert "is the input folder" in _paths_error(str(inp), str(inp))
    assert "inside the output" in _paths_error(str(inp / "sub"), str(inp))
    assert "inside the output" in _paths_error(str(inp / "sub" / "a.tar"), str(inp))
    # A pattern is refused when it could match what the run writes (OUT/data/<shard>), so a
    # rerun never reads the release; explicit files and shallow globs next to it are fine.
    shards = tmp_path / "shards"
    assert "inside the input" in _paths_error(f"{shards}/**/*.tar", f"{shards}/anon")
    assert "inside the input" in _paths_error(f"{shards}/*/*/*.tar", f"{shards}/anon")
    assert "inside the input" in _paths_error(f"{shards}/{{x,y}}/*/*/*.tar", f"{shards}/x/anon")
    assert "is the input folder" in _paths_error(f"{shards}/*.tar", str(shards))
    assert _paths_error(f"{shards}/s-{{000..009}}.tar", f"{shards}/anon") is None
    assert _paths_error(f"{shards}/*.tar", f"{shards}/anon") is None
    assert _paths_error(f"{shards}/*/*.tar", f"{shards}/anon") is None
    assert "inside the output" in _paths_error(f"{shards}/anon/s-{{000..009}}.tar", str(shards))
    # Relative paths and symlinks are resolved before comparing.
    monkeypatch.chdir(inp)
    assert "inside the input" in _paths_error(".", "out")
    assert "inside the input" in _paths_error("sub/../", "./o2")
    os.symlink(inp / "sub", tmp_path / "looks-elsewhere")
    assert "inside the input" in _paths_error(str(inp), str(tmp_path / "looks-elsewhere" / "o"))
    # Siblings are fine; so is an output next to a single input file; a local input and a
    # remote output (or the reverse) cannot nest; two URLs are compared as paths.
    assert _paths_error(str(inp), str(tmp_path / "out")) is None
    assert _paths_error(str(inp / "sub" / "a.tar"), str(inp / "anon")) is None
    assert _paths_error("s3://bucket/shards/{000..009}.tar", str(tmp_path / "out")) is None
    assert _paths_error(str(inp), "s3://bucket/out") is None
    assert "inside the input" in _paths_error("s3://bucket/raw/{000..009}.tar", "s3://bucket/raw/anon")
    assert "inside the output" in _paths_error("s3://bucket/out/raw/{000..009}.tar", "s3://bucket/out/")
    assert _paths_error("s3://bucket/raw/{000..009}.tar", "s3://bucket/release") is None
    assert _paths_error("s3://bucket/raw/{000..009}.tar", "gs://bucket/raw/anon") is None


def test_cli_refuses_nested_output_with_exit_2(tmp_path, capsys):
    from veil.cli import main

    (tmp_path / "in").mkdir()
    code = main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "in" / "o"),
                 "--runner", "local", "--no-progress"])
    assert code == 2
    assert "inside the input" in capsys.readouterr().err
    assert not (tmp_path / "in" / "o").exists()


def test_manifest_json_of_skipped_files_is_escaped(tmp_path):
    """run.json lists skipped files; their names are escaped before they get there."""
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"\xff\xd8\xff")
    (root / f"notes{ESC}").write_bytes(b"x")
    source = FolderSource(root)
    source.list_shards()
    (skipped,) = source.skipped()
    assert skipped.path == repr(f"notes{ESC}")
    assert "\\x1b" in json.dumps(skipped.path) and "\x1b" not in skipped.path
