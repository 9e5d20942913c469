"""Beam with SDK workers in processes of their own, the way Flink and Spark run it.

Two distributed paths, offline, against ``veil run --runner local`` (the reference):

* ``FnApiRunner`` in ``multi_processing`` mode (``DirectRunner``, 2 worker processes);
* Beam's portable path: its Python job service (``local_job_service_main``) and an SDK worker
  pool (``worker_pool_main``, ``--environment_type=EXTERNAL``), both started here as separate
  processes on free localhost ports, each in a process group of its own that is killed
  afterwards, however the tests end.

The worker pool runs in a folder of its own and without ``$VEIL_MODELS``: paths and the models
folder reach the workers because Veil passes them (absolute paths, ``--models-dir``), not
because the workers inherit the driver's working directory or environment.

Release files and manifests must be byte-identical to the local runner's (timings aside), and
``veil validate`` on the portable path must give the local runner's metrics. The Beam
failure-ratio guard, applied from the manifests after the pipeline, must still stop the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import face_photo, jpeg_bytes, write_tar

#: Longest a Beam command may take here; a portable job whose SDK worker cannot start waits
#: for it for minutes before Beam gives up, and a test must fail sooner than that.
COMMAND_TIMEOUT = 300
#: Longest the job service or the worker pool may take to listen.
SERVICE_TIMEOUT = 60
#: Cheap validation (one recognizer, one detector, gated metrics) that still covers identity,
#: detection, background and leakage metrics merged from per-shard states.
VALIDATE_ARGS = ["--recognizers", "dlib-resnet", "--detectors", "centerface", "--measure", "gated"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, faces_dir) -> Path:
    """A folder with two tiny tar shards: faces, a face-free image, a truncated JPEG."""
    import skimage.data

    root = tmp_path_factory.mktemp("beam-data")
    faces = {n: jpeg_bytes(face_photo(faces_dir, n, max_side=320))
             for n in ("obama.jpg", "biden.jpg", "grace_hopper.jpg")}
    coffee = jpeg_bytes(skimage.data.coffee()[::2, ::2])
    shards = [[("a-obama", faces["obama.jpg"]), ("a-coffee", coffee),
               ("a-corrupt", faces["biden.jpg"][:1500])],
              [("b-biden", faces["biden.jpg"]), ("b-hopper", faces["grace_hopper.jpg"])]]
    (root / "in").mkdir()
    for i, samples in enumerate(shards):
        write_tar(root / "in" / f"shard-{i:03d}.tar",
                  [(k, {"jpg": b, "json": json.dumps({"k": k}).encode()}) for k, b in samples])
    return root


INPUT = "in/shard-{000..001}.tar"  # relative to the dataset folder, on purpose


def veil(args: list[str], *, cwd: Path, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess:
    """``veil ARGS`` as its own process in ``cwd``, bounded in time."""
    proc = subprocess.run([sys.executable, "-m", "veil.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=COMMAND_TIMEOUT,
                          env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode in ok, (f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n"
                                   f"{proc.stderr[-4000:]}")
    return proc


def veil_here(args: list[str], ok: tuple[int, ...] = (0,)) -> None:
    """``veil ARGS`` in this process (the local references: no Beam, no imports to pay again)."""
    from veil.cli import main

    assert main(args) in ok


def run_args(inp: str, output: str, models_dir: Path) -> list[str]:
    return ["run", "--input", inp, "--output", output, "--batch-size", "2", "--no-progress",
            "--models-dir", str(models_dir)]


def tree_digest(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "data").rglob("*")) if p.is_file()}


def manifest_rows(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = [r for p in sorted((out / "manifest").rglob("*.parquet"))
            for r in pq.read_table(p).to_pylist()]
    for r in rows:  # wall-clock timings differ run to run by nature
        r.pop("timings", None)
        r.pop("seconds", None)
    return sorted(rows, key=lambda r: (r["shard"], r["index"]))


def assert_same_release(out: Path, reference: Path) -> None:
    assert sorted((out / "manifest").rglob("*.parquet")), f"no manifest in {out}"
    assert tree_digest(out) == tree_digest(reference)
    assert manifest_rows(out) == manifest_rows(reference)


@pytest.fixture(scope="module")
def local_run(dataset, models_dir) -> Path:
    out = dataset / "out-local"
    veil_here([*run_args(str(dataset / INPUT), str(out), models_dir), "--runner", "local"])
    statuses = sorted(r["status"] for r in manifest_rows(out))
    assert statuses == ["anonymized"] * 3 + ["clean", "quarantined"]
    return out


# ------------------------------------------------------------------ job service + worker pool


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on the loopback interface."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def start_service(cmd: list[str], *, log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A service in a session (and process group) of its own: the SDK workers it forks are
    in that group too, so killing the group stops all of them."""
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVICE_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{proc.args} did not listen on port {port} within {SERVICE_TIMEOUT} s:\n"
                f"{log.read_text()[-3000:]}")


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM the service's process group, then SIGKILL what is left of it (SDK workers may
    outlive the pool that started them)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> dict:
    """Beam's job service and an EXTERNAL SDK worker pool, with the options that use them."""
    home = tmp_path_factory.mktemp("beam-services")
    # The pool starts each SDK worker as `python` from its PATH: this interpreter, which has
    # Veil installed, as a worker image's would. No VEIL_MODELS: Veil passes --models-dir.
    env = {k: v for k, v in os.environ.items() if k != "VEIL_MODELS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    job_port, pool_port = free_ports(2)
    services = [
        ([sys.executable, "-m", "apache_beam.runners.portability.local_job_service_main",
          "--port", str(job_port)], job_port, home / "job_service.log"),
        ([sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main",
          "--service_port", str(pool_port)], pool_port, home / "worker_pool.log"),
    ]
    procs: list[subprocess.Popen] = []
    try:
        for cmd, port, log in services:
            procs.append(start_service(cmd, log=log, cwd=home, env=env))
            wait_listening(port, procs[-1], log)
        yield {"options": [f"--beam-option={o}" for o in (
                   "--runner=PortableRunner", f"--job_endpoint=localhost:{job_port}",
                   "--environment_type=EXTERNAL", f"--environment_config=localhost:{pool_port}")],
               "pool_log": home / "worker_pool.log"}
    finally:
        for proc in reversed(procs):
            stop_service(proc)


MULTI_PROCESSING = [f"--beam-option={o}" for o in (
    "--runner=DirectRunner", "--direct_running_mode=multi_processing", "--direct_num_workers=2")]


# ------------------------------------------------------------------------------------- tests


@pytest.mark.slow
def test_multi_processing_run_equals_local_and_guard_holds(dataset, local_run, models_dir):
    """1 of 5 samples quarantined is above a 10% limit: every shard is committed (Beam commits
    inside the pipeline), then the run ends aborted (exit 3)."""
    (dataset / "guard.yaml").write_text("max_failure_ratio: 0.1\nmin_samples_for_abort: 1\n")
    proc = veil([*run_args(INPUT, "out-mp", models_dir), "--config", "guard.yaml",
                 "--runner", "beam", *MULTI_PROCESSING], cwd=dataset, ok=(3,))
    assert "max_failure_ratio=10%" in proc.stderr
    assert_same_release(dataset / "out-mp", local_run)


@pytest.mark.slow
def test_portable_run_equals_local(dataset, local_run, models_dir, portable):
    veil([*run_args(INPUT, "out-portable", models_dir), "--runner", "beam", *portable["options"]],
         cwd=dataset)
    assert_same_release(dataset / "out-portable", local_run)
    # The work ran in SDK worker processes that the pool started, not in the job service.
    assert "Starting worker with command" in portable["pool_log"].read_text()


@pytest.mark.slow
def test_portable_validation_equals_local(dataset, local_run, models_dir, portable):
    common = ["--models-dir", str(models_dir), "--no-progress", *VALIDATE_ARGS]
    verdict = (0, 4)  # 4: a gate failed, a verdict all the same
    veil_here(["validate", "--original", str(dataset / INPUT), "--anonymized", str(local_run),
               "--output", str(dataset / "val-local"), *common, "--runner", "local"], ok=verdict)
    veil(["validate", "--original", INPUT, "--anonymized", "out-local", "--output", "val-portable",
          *common, "--runner", "beam", *portable["options"]], cwd=dataset, ok=verdict)
    local, beam = (json.loads((dataset / f"val-{name}" / "validation" / "summary.json").read_text())
                   for name in ("local", "portable"))
    assert local["metrics"]["pairs"] == 4 and local["metrics"]["faces_original"] >= 3
    assert beam["metrics"] == local["metrics"]
    assert beam["status"] == local["status"]
    assert sorted((dataset / "val-portable" / "validation" / "state").glob("*.json"))


def test_portable_runs_get_a_job_server_timeout_that_outlasts_the_run():
    """Beam's default (300 s) is also the deadline of a portable job's state stream."""
    from veil.pipelines.runners import BEAM_JOB_SERVER_TIMEOUT_S, beam_pipeline_options

    args = beam_pipeline_options(["--runner=PortableRunner", "--job_endpoint=localhost:1"])
    assert f"--job_server_timeout={BEAM_JOB_SERVER_TIMEOUT_S}" in args
    assert BEAM_JOB_SERVER_TIMEOUT_S >= 24 * 3600
    given = beam_pipeline_options(["--runner=FlinkRunner", "--job_server_timeout=60"])
    assert [a for a in given if "job_server_timeout" in a] == ["--job_server_timeout=60"]


def test_an_unreachable_job_service_is_a_clear_error():
    from apache_beam.options.pipeline_options import PipelineOptions

    from veil.config import ConfigError
    from veil.pipelines.runners import check_beam_job_endpoint

    (port,) = free_ports(1)  # nothing listens there
    options = PipelineOptions(["--runner=PortableRunner", f"--job_endpoint=localhost:{port}"])
    with pytest.raises(ConfigError, match=f"no Beam job service answers at localhost:{port}"):
        check_beam_job_endpoint(options, timeout=1)
    check_beam_job_endpoint(PipelineOptions(["--runner=DirectRunner"]))  # no endpoint: no check
