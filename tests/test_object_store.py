"""Inputs and outputs on a real S3-compatible object store (moto's server, on loopback).

The release written to ``s3://`` must be the bytes of a local release, on the local and the
Ray runner (whose workers write the shards); a run killed mid-commit resumes there; the
output is locked against a second writer with a conditional PUT.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import face_photo, jpeg_bytes, write_tar

pytest.importorskip("moto.server")
pytest.importorskip("s3fs")

BUCKET_IN = "veil-in"
BUCKET_OUT = "veil-out"
PHOTOS = ["obama.jpg", "biden.jpg", "grace_hopper.jpg"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server for this module, and the environment that points clients at it."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "veil-test",
           "AWS_SECRET_ACCESS_KEY": "veil-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"])
    for bucket in (BUCKET_IN, BUCKET_OUT):
        client.create_bucket(Bucket=bucket)
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def dataset(s3_env, faces_dir, tmp_path_factory):
    """Two small tar shards, locally and at s3://veil-in/raw/, and a local reference release."""
    import fsspec

    root = tmp_path_factory.mktemp("s3data")
    local = root / "raw"
    local.mkdir()
    for shard, names in enumerate([PHOTOS[:2], PHOTOS[2:] + PHOTOS[:1]]):
        samples = [(f"s{shard}-{i}", {"jpg": jpeg_bytes(face_photo(faces_dir, name, max_side=320))})
                   for i, name in enumerate(names)]
        write_tar(local / f"shard-{shard:03d}.tar", samples)
    fs = fsspec.filesystem("s3")
    for path in sorted(local.iterdir()):
        fs.put_file(str(path), f"{BUCKET_IN}/raw/{path.name}")
    reference = root / "reference"
    done = veil("run", "--input", str(local / "shard-{000..001}.tar"), "--output", str(reference))
    assert done.returncode == 0, done.stderr[-3000:]
    return {"local": str(local / "shard-{000..001}.tar"),
            "s3": f"s3://{BUCKET_IN}/raw/shard-{{000..001}}.tar", "reference": reference}


def veil(*args: str, env: dict[str, str] | None = None, runner: str = "local",
         timeout: int = 600) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "veil.cli", *args, "--no-progress", "--batch-size", "2"]
    if args[0] == "run":
        command += ["--runner", runner]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def release_files(location: str | Path) -> dict[str, bytes]:
    from veil.pipelines.storage import as_store

    store = as_store(location)
    return {name: store.read_bytes(name) for name in store.list_files("data")}


def manifest_rows(location: str | Path) -> list[dict]:
    """Manifest rows minus what differs between any two runs (timings) and between these
    inputs (the source URL)."""
    from veil.pipelines.manifest import read_manifests

    drop = ("seconds", "timings", "source")
    return [{k: v for k, v in row.items() if k not in drop}
            for row in read_manifests(location).to_pylist()]


def test_store_round_trip_on_s3(s3_env):
    from veil.pipelines.storage import FsspecStore, as_store

    store = as_store(f"s3://{BUCKET_OUT}/unit")
    assert isinstance(store, FsspecStore) and not store.is_local
    store.write_bytes("a/b.txt", b"one")
    staged = store.staging_file("a/c.bin")
    staged.write_bytes(b"two")
    assert not store.exists("a/c.bin")  # nothing is visible before publish
    store.publish(staged, "a/c.bin")
    assert not staged.exists()
    assert store.list_files("a") == ["a/b.txt", "a/c.bin"]
    assert store.read_bytes("a/c.bin") == b"two" and store.exists("a/b.txt")
    assert store.delete("a/b.txt") and not store.delete("a/b.txt")
    store.delete_tree("a")
    assert store.list_files("a") == [] and store.list_files("never") == []
    with pytest.raises(ValueError, match="escapes"):
        store.write_bytes("../outside", b"x")
    # Workers rebuild the store from its URL.
    import pickle

    assert pickle.loads(pickle.dumps(store)).url == store.url


def test_lock_on_s3_admits_one_writer(s3_env):
    from veil.pipelines.lock import ObjectStoreLock, OutputLockedError, output_lock

    url = f"s3://{BUCKET_OUT}/locked"
    first = output_lock(url, command="veil run first")
    assert isinstance(first, ObjectStoreLock)
    with first:
        with pytest.raises(OutputLockedError, match=r"veil run first.*delete 's3://veil-out/locked/\.veil\.lock'"):
            output_lock(url, command="veil run second").acquire()
    with output_lock(url):  # released: the next writer gets it
        pass


@pytest.mark.slow
def test_s3_to_s3_run_releases_the_local_bytes(s3_env, dataset):
    """Local runner: input and output on S3, report and run.json written there, no lock or
    temporary object left behind."""
    from veil.pipelines.storage import as_store

    url = f"s3://{BUCKET_OUT}/local-runner"
    done = veil("run", "--input", dataset["s3"], "--output", url)
    assert done.returncode == 0, done.stderr[-3000:]
    assert release_files(url) == release_files(dataset["reference"])
    assert manifest_rows(url) == manifest_rows(dataset["reference"])
    store = as_store(url)
    names = set(store.list_files(""))
    assert {"run.json", "report/index.html", "report/report.json"} <= names
    assert ".veil.lock" not in names and not any(".veil-tmp-" in n for n in names)
    assert b"<html" in store.read_bytes("report/index.html")[:2000].lower()
    again = veil("run", "--input", dataset["s3"], "--output", url)
    assert again.returncode == 0 and "(2 already done, skipped)" in again.stdout + again.stderr


@pytest.mark.slow
def test_ray_workers_write_s3_shards_with_the_local_bytes(s3_env, dataset):
    """The Ray runner's workers write parts and commit the shards on S3; the driver only
    counts. Same bytes as the local release, and no part left behind."""
    from veil.pipelines.runners import PARTS_DIR
    from veil.pipelines.storage import as_store

    url = f"s3://{BUCKET_OUT}/ray-runner"
    done = veil("run", "--input", dataset["s3"], "--output", url, "--workers", "1", runner="ray",
                env={"RAY_AUTH_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert release_files(url) == release_files(dataset["reference"])
    assert manifest_rows(url) == manifest_rows(dataset["reference"])
    assert as_store(url).list_files(PARTS_DIR) == []


@pytest.mark.slow
def test_beam_commits_s3_shards_with_the_local_bytes(s3_env, dataset):
    """Beam's commit DoFn writes the shards on S3 through the same store; the driver reads the
    per-shard results back from the manifests there."""
    url = f"s3://{BUCKET_OUT}/beam-runner"
    done = veil("run", "--input", dataset["s3"], "--output", url, runner="beam")
    assert done.returncode == 0, done.stderr[-3000:]
    assert release_files(url) == release_files(dataset["reference"])
    assert manifest_rows(url) == manifest_rows(dataset["reference"])


@pytest.mark.slow
def test_killed_s3_run_is_locked_then_resumes_to_the_local_bytes(s3_env, dataset):
    """Killed after its second shard's data were published and before their manifest: the
    lock object stays (a remote holder cannot be checked), the rerun refuses with the
    object to delete, and after deleting it the rerun redoes only the torn shard."""
    from veil.pipelines.storage import as_store

    url = f"s3://{BUCKET_OUT}/killed"
    args = ("run", "--input", dataset["s3"], "--output", url)
    killed = veil(*args, env={"VEIL_FAULT_AT": "manifest:tmp:2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    store = as_store(url)
    assert len([n for n in store.list_files("manifest") if n.endswith(".parquet")]) == 1
    refused = veil(*args)
    assert refused.returncode == 2 and f"delete '{url}/.veil.lock'" in refused.stderr
    store.delete(".veil.lock")
    done = veil(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1 already done, skipped)" in done.stdout + done.stderr
    assert release_files(url) == release_files(dataset["reference"])
    assert manifest_rows(url) == manifest_rows(dataset["reference"])


@pytest.mark.slow
def test_gates_on_an_s3_release_give_the_local_verdict(s3_env, dataset, tmp_path):
    """``--gates`` on an object-store output: validated in a local scratch folder, then the
    tables, the report (run and validation together) and the verdict are published next to
    the release; the verdict and metrics are those of the same run on local disk."""
    import json

    from veil.pipelines.storage import as_store

    local = tmp_path / "gated"
    ref = veil("run", "--input", dataset["local"], "--output", str(local), "--gates")
    assert ref.returncode in (0, 4), ref.stderr[-3000:]
    url = f"s3://{BUCKET_OUT}/gated"
    done = veil("run", "--input", dataset["s3"], "--output", url, "--gates")
    assert done.returncode == ref.returncode, done.stderr[-3000:]
    store = as_store(url)
    remote = json.loads(store.read_bytes("validation/summary.json"))
    expected = json.loads((local / "validation" / "summary.json").read_text())
    assert remote["status"] == expected["status"]
    assert remote["metrics"] == expected["metrics"]
    assert [g["status"] for g in remote["gates"]] == [g["status"] for g in expected["gates"]]
    assert store.exists("RELEASE.json") == (local / "RELEASE.json").is_file()
    report = json.loads(store.read_bytes("report/report.json"))
    assert report["contents"] == ["run", "validation"]
    assert {n for n in store.list_files("validation")} >= {"validation/summary.json"}


def test_a_retried_commit_task_leaves_one_identical_copy(tmp_path, faces_dir):
    """Ray's commit task (``commit_parts``) run twice for one shard, as a retry after a lost
    worker would: the second run publishes the same bytes under the same names."""
    from veil.pipelines.runners import PARTS_DIR, commit_parts, part_name
    from veil.pipelines.sinks import store_write_bytes
    from veil.pipelines.sources import open_source
    from veil.pipelines.storage import as_store
    from veil.transforms.stage import CLEAN

    write_tar(tmp_path / "s.tar", [(f"k{i}", {"jpg": jpeg_bytes(face_photo(faces_dir, name, max_side=64))})
                                   for i, name in enumerate(PHOTOS)])
    source = open_source(str(tmp_path / "s.tar"))
    (shard,) = source.list_shards()
    samples = [dict(s, status=CLEAN) for s in source.read_shard(shard)]
    store = as_store(tmp_path / "out")
    import pickle

    def write_parts() -> list[str]:
        # Two batches, named by their place in the input; written out of order.
        names = [part_name(shard.id, 0, 1), part_name(shard.id, 0, 0)]
        store_write_bytes(store, names[0], pickle.dumps(samples[2:]))
        store_write_bytes(store, names[1], pickle.dumps(samples[:2]))
        return names

    first = commit_parts(store.url, shard, source, "f" * 64, write_parts())
    released = store.read_bytes("data/s.tar")
    manifest = store.read_bytes("manifest/s.tar.parquet")
    second = commit_parts(store.url, shard, source, "f" * 64, write_parts())
    assert store.read_bytes("data/s.tar") == released and store.read_bytes("manifest/s.tar.parquet") == manifest
    assert first.counts == second.counts == {CLEAN: 3}
    assert store.list_files("data") == ["data/s.tar"] and store.list_files(PARTS_DIR) == []
    # A retry of a commit that finished but died while removing its parts: the shard is
    # committed, so the retry reports it instead of failing on the missing parts.
    names = write_parts()
    store.delete(names[1])
    third = commit_parts(store.url, shard, source, "f" * 64, names)
    assert third.counts == {CLEAN: 3} and store.read_bytes("data/s.tar") == released
    store.delete(names[0])
    import tarfile

    with tarfile.open(tmp_path / "out" / "data" / "s.tar") as tf:
        assert tf.getnames() == ["k0.jpg", "k1.jpg", "k2.jpg"]  # input order, not arrival order
