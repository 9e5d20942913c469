"""A real two-node Ray cluster (head + worker node, separate processes, in a network namespace
of their own, see raycluster.py): `veil run --ray-address`, `veil validate --ray-address` and
`veil submit` on it give what the local runner gives, byte for byte; killing the worker node
mid-run still ends in the local run's bytes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import face_photo, jpeg_bytes, write_tar
from raycluster import ClusterUnavailable, RayTestCluster, is_running

pytestmark = pytest.mark.slow

# Three shards of real faces (one sample corrupt, quarantined); small images keep it cheap.
SHARDS = [
    [("a-obama", "obama.jpg"), ("a-biden", "biden.jpg")],
    [("b-hopper", "grace_hopper.jpg"), ("b-corrupt", None), ("b-astro", "astronaut.png")],
    [("c-obama2", "obama2.jpg"), ("c-obama3", "obama3.jpg")],
]
RUN_FLAGS = ["--no-progress", "--batch-size", "1"]
VALIDATE_FLAGS = ["--no-progress", "--recognizers", "dlib-resnet", "--detectors", "centerface",
                  "--measure", "gated"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, faces_dir) -> str:
    root = tmp_path_factory.mktemp("cluster-in")
    corrupt = jpeg_bytes(face_photo(faces_dir, "obama.jpg", max_side=320))[:900]
    for i, shard in enumerate(SHARDS):
        samples = []
        for key, name in shard:
            image = corrupt if name is None else jpeg_bytes(face_photo(faces_dir, name, max_side=320))
            samples.append((key, {"jpg": image, "json": json.dumps({"k": key}).encode()}))
        write_tar(root / f"shard-{i:03d}.tar", samples)
    return str(root / "shard-{000..002}.tar")


@pytest.fixture(scope="module")
def cluster(dataset):
    """One head and one worker node, 1 CPU each, with the dashboard (Jobs API)."""
    c = RayTestCluster(nodes=2, cpus_per_node=1, dashboard=True)
    try:
        c.start()  # stops whatever it started when it fails
    except ClusterUnavailable as exc:
        pytest.skip(f"no two-node Ray cluster on this machine: {exc}")
    started = c.pids()
    try:
        yield c
    finally:
        c.close()
    # Teardown stopped every node process (by PID, not `ray stop`) and removed the namespace.
    assert not {p for p in started if is_running(p)}
    assert not c.root.exists()
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert c.netns not in {line.split()[0] for line in listing.splitlines() if line.strip()}


def veil(argv: list[str]) -> int:
    """A Veil command in this process (the local runner needs no cluster)."""
    from veil.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def local_run(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cluster-local")
    assert veil(["run", "--runner", "local", "--input", dataset, "--output", str(out), *RUN_FLAGS]) == 0
    return out


def release_digest(out: Path) -> dict[str, str]:
    """sha256 of every released file, by relative path."""
    files = sorted(p for p in (out / "data").rglob("*") if p.is_file())
    assert files, f"nothing released under {out}/data"
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def manifest_rows(out: Path) -> list[dict]:
    """Every manifest row, without the wall-clock columns (they differ run to run by nature)."""
    import pyarrow.parquet as pq

    rows = []
    for path in sorted((out / "manifest").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            row.pop("seconds", None)
            row.pop("timings", None)
            rows.append(row)
    assert rows, f"no manifests under {out}/manifest"
    return sorted(rows, key=lambda r: (r["shard"], r["key"]))


def assert_same_release(out: Path, expected: Path) -> None:
    assert release_digest(out) == release_digest(expected)
    assert manifest_rows(out) == manifest_rows(expected)


def cluster_run(cluster: RayTestCluster, dataset: str, out: Path, timeout: float = 420):
    return cluster.run(["veil", "run", "--runner", "ray", "--ray-address", cluster.address,
                        "--input", dataset, "--output", str(out), *RUN_FLAGS], timeout=timeout)


def test_two_node_run_equals_local_run(cluster, dataset, local_run, tmp_path):
    out = tmp_path / "out"
    proc = cluster_run(cluster, dataset, out)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert_same_release(out, local_run)
    rows = manifest_rows(out)
    assert {r["key"] for r in rows} == {k for shard in SHARDS for k, _ in shard}
    assert {r["key"] for r in rows if r["status"] == "quarantined"} == {"b-corrupt"}
    # The driver's tasks and its actors' calls, by node: the worker node took part.
    nodes = cluster.work_nodes(str(out))
    assert len(nodes) == 1, nodes
    assert len(next(iter(nodes.values()))) == 2, f"work ran on one node only: {nodes}"


def test_two_node_validation_equals_local_validation(cluster, dataset, local_run, tmp_path):
    def summary(out: Path) -> dict:
        return json.loads((out / "validation" / "summary.json").read_text())

    local_out, ray_out = tmp_path / "v-local", tmp_path / "v-ray"
    args = ["validate", "--original", dataset, "--anonymized", str(local_run), *VALIDATE_FLAGS]
    local_rc = veil([*args, "--output", str(local_out), "--runner", "local"])
    proc = cluster.run(["veil", *args, "--output", str(ray_out), "--runner", "ray",
                        "--ray-address", cluster.address], timeout=420)
    assert proc.returncode == local_rc, proc.stdout[-4000:]
    local, ray = summary(local_out), summary(ray_out)
    assert local["metrics"], "no metrics measured"
    assert ray["metrics"] == local["metrics"]
    assert ray["status"] == local["status"]
    assert ray["shards"] == local["shards"] == {"total": 3, "done": 3, "skipped": 0}


def test_submit_runs_veil_as_a_ray_job_and_streams_its_logs(cluster, dataset, local_run, tmp_path):
    out = tmp_path / "out"
    proc = cluster.run(["veil", "submit", "--address", cluster.dashboard_url,
                        "--env", "VEIL_SUBMIT_TEST=1", "--",
                        # No --ray-address: a job's driver finds its cluster in RAY_ADDRESS.
                        "run", "--input", dataset, "--output", str(out),
                        *RUN_FLAGS], timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:]
    # The job's own output, streamed back: the run's summary.
    assert "Veil run finished" in proc.stdout and "anonymized" in proc.stdout
    assert "succeeded" in proc.stdout
    assert_same_release(out, local_run)


def test_submit_of_a_failing_command_exits_with_its_status_and_error(cluster, tmp_path):
    missing = tmp_path / "no-such-dir"
    proc = cluster.run(["veil", "submit", "--address", cluster.dashboard_url, "--",
                        "run", "--ray-address", "auto", "--input", str(missing),
                        "--output", str(tmp_path / "out"), "--no-progress"], timeout=300)
    # Veil's own exit status (1: error) and message, from the job's streamed logs.
    assert proc.returncode == 1, proc.stdout[-4000:]
    assert f"input '{missing}': not a directory" in proc.stdout
    assert "failed" in proc.stdout and "ray job logs" in proc.stdout
    assert not (tmp_path / "out" / "data").exists()


def test_submit_to_an_unreachable_address_says_so(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "veil.cli", "submit", "--address", "http://127.0.0.1:9",
                "--", "run", "--input", "x", "--output", str(tmp_path / "o")],
               capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "cannot reach the Ray Jobs API at http://127.0.0.1:9" in proc.stderr


def test_killing_the_worker_node_mid_run_still_ends_in_the_local_bytes(cluster, dataset, local_run,
                                                                       tmp_path):
    """Runs last: the cluster loses its worker node. Either Ray moves the work to the head
    and the run finishes, or the run fails and a rerun resumes; the bytes are the same."""
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    proc = cluster.popen(["veil", "run", "--runner", "ray", "--ray-address", cluster.address,
                          "--input", dataset, "--output", str(out), *RUN_FLAGS], log=log)
    deadline = time.monotonic() + 300
    while not list((out / "manifest").glob("*.parquet")):
        assert proc.poll() is None, f"run ended before any shard was committed:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no shard committed in 300 s:\n{log.read_text()}"
        time.sleep(0.2)
    killed = cluster.kill_worker_node()
    assert killed and not any(is_running(p) for p in killed)
    committed_at_kill = len(list((out / "manifest").glob("*.parquet")))
    try:
        rc = proc.wait(timeout=420)
    except subprocess.TimeoutExpired:
        pytest.fail(f"run hung after the worker node was killed:\n{log.read_text()[-4000:]}")
    first = log.read_text(errors="replace")
    if rc != 0:
        # Resumed by a rerun on what is left of the cluster (the head).
        rerun = cluster_run(cluster, dataset, out)
        assert rerun.returncode == 0, f"first run:\n{first[-3000:]}\nrerun:\n{rerun.stdout[-3000:]}"
    print(f"worker node killed after {committed_at_kill} shard(s); first run exit {rc}")
    assert_same_release(out, local_run)

