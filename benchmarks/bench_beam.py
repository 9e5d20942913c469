"""Beam runners on one machine: the in-process BundleBasedDirectRunner (Veil's default for
``--runner beam``), FnApiRunner ``multi_processing`` with 2 SDK worker processes, and the
portable path (Beam's job service + an EXTERNAL SDK worker pool, as Flink and Spark run it).

Each configuration anonymizes the same shards of bench_pipeline.py's dataset with
``veil run --runner beam`` in a fresh process, ``--repeats`` times, in alternating order
(A B C, then C B A, ...) so that a machine shared with other jobs drifts evenly. Printed per
configuration: median wall seconds and median CPU seconds. CPU is user + system time of every
process involved, reaped children included (getrusage RUSAGE_CHILDREN): the ``veil`` process
and its multi_processing workers, and, for the portable path, the job service and the worker
pool with its SDK workers, which are started for each run and stopped (SIGINT) after it, so
their start-up is included (``services_cpu_s`` is that start-up and shutdown alone, measured
once with no job). Every release is checked byte-identical to the first configuration's.

    VEIL_MODELS=../shared/models python benchmarks/bench_beam.py --images 24 --per-shard 6

Results are printed as JSON and appended to bench-out/beam.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

CONFIGS = {
    "bundle": [],  # Veil's default: BundleBasedDirectRunner, in the veil process
    "multi_processing": ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                         "--direct_num_workers=2"],
    "portable": None,  # filled in with the ports of the services started for the run
}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with socket.create_connection(("localhost", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{proc.args} did not listen on {port} within {timeout} s")


class PortableServices:
    """Job service + EXTERNAL worker pool, each in a process group of its own."""

    def __init__(self, logs: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "VEIL_MODELS"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        self.job_port, self.pool_port = free_port(), free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.procs = []
        for name, cmd, port in (
            ("job_service", ["apache_beam.runners.portability.local_job_service_main", "--port",
                             str(self.job_port)], self.job_port),
            ("worker_pool", ["apache_beam.runners.worker.worker_pool_main", "--service_port",
                             str(self.pool_port)], self.pool_port),
        ):
            with open(logs / f"{name}.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", *cmd], cwd=logs, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            self.procs.append(proc)
            wait_listening(port, proc)

    def options(self) -> list[str]:
        return ["--runner=PortableRunner", f"--job_endpoint=localhost:{self.job_port}",
                "--environment_type=EXTERNAL", f"--environment_config=localhost:{self.pool_port}"]

    def stop(self) -> None:
        # SIGINT: the pool's atexit handler stops (and reaps) its SDK workers, so their CPU
        # time reaches this process through the pool.
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGINT)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def release_digest(out: Path) -> str:
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for p in sorted((out / "data").rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    for p in sorted((out / "manifest").rglob("*.parquet")):
        table = pq.read_table(p)
        table = table.drop_columns([c for c in ("seconds", "timings") if c in table.column_names])
        h.update(json.dumps(table.to_pylist(), sort_keys=True, default=str).encode())
    return h.hexdigest()


def run_once(name: str, pattern: str, out: Path, models: str, logs: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cpu0, wall0 = children_cpu(), time.perf_counter()
    services = PortableServices(logs) if name == "portable" else None
    try:
        options = services.options() if services else CONFIGS[name]
        cmd = [sys.executable, "-m", "veil.cli", "run", "--input", pattern, "--output", str(out),
               "--runner", "beam", "--models-dir", models, "--no-progress",
               *[f"--beam-option={o}" for o in options]]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    finally:
        if services:
            services.stop()
    return {"wall_s": time.perf_counter() - wall0, "cpu_s": children_cpu() - cpu0,
            "digest": release_digest(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--per-shard", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "beam"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    args = ap.parse_args()
    models = os.environ.get("VEIL_MODELS") or str(ROOT.parent / "shared" / "models")

    from bench_pipeline import build_dataset

    work = Path(args.work)
    data = work / f"n{args.images}-s{args.per_shard}"
    if not (data / "truth.json").exists():
        build_dataset(data, args.images, per_shard=args.per_shard)
    pattern = str(data / "shards" / "*.tar")
    names = args.configs.split(",")

    cpu0 = children_cpu()
    PortableServices(work / "logs").stop()
    services_cpu = children_cpu() - cpu0

    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in (names if rep % 2 == 0 else names[::-1]):
            r = run_once(name, pattern, work / f"out-{name}", models, work / "logs")
            runs[name].append(r)
            print(f"  {name:17s} rep {rep}: wall {r['wall_s']:6.1f} s  cpu {r['cpu_s']:6.1f} s",
                  flush=True)
    digests = {r["digest"] for rs in runs.values() for r in rs}
    result = {
        "images": args.images, "per_shard": args.per_shard, "repeats": args.repeats,
        "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
        "services_cpu_s": round(services_cpu, 2),
        "identical_bytes": len(digests) == 1,
        "configs": {n: {"wall_s_median": round(statistics.median(r["wall_s"] for r in rs), 2),
                        "cpu_s_median": round(statistics.median(r["cpu_s"] for r in rs), 2),
                        "wall_s": [round(r["wall_s"], 2) for r in rs],
                        "cpu_s": [round(r["cpu_s"], 2) for r in rs]}
                    for n, rs in runs.items()},
    }
    print(json.dumps(result, indent=2))
    with open(work / "beam.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result) + "\n")
    if len(digests) != 1:
        raise SystemExit("releases differ between Beam runners")


if __name__ == "__main__":
    main()
