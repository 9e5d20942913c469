"""The Ray driver's memory against dataset size: flat, since the workers write the shards.

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_driver_memory.py \
        --sizes 40,160 --work /tmp/bench-driver-memory

For each size, ``build_dataset`` (bench_pipeline: 640x480 scenes with 1-3 faces, 10 %
close-ups of 1280x960) writes tar shards of 20 images, and ``veil run --runner ray`` (the
defaults otherwise) runs on them. The driver process (the ``veil`` command alone, not the Ray
workers it starts) is sampled every 0.1 s from /proc: its peak RSS, its peak Python heap is not
visible from outside, so RSS is what is reported. Before the workers wrote the shards, every
released byte streamed back to this process; now it receives each sample's key and status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_driver(cmd: list[str]) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_bytes(proc.pid))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    _out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-3000:]}")
    return {"peak_rss_mib": peak / 2**20, "wall_s": wall}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="40,160")
    parser.add_argument("--per-shard", type=int, default=20)
    parser.add_argument("--work", default="/tmp/bench-driver-memory")
    args = parser.parse_args()
    from bench_pipeline import build_dataset

    work = Path(args.work)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        folder = work / f"data-{n}"
        data = build_dataset(folder, n, per_shard=args.per_shard)
        out = work / f"out-{n}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "veil.cli", "run", "--input", data["pattern"], "--output", str(out),
               "--runner", "ray", "--no-progress"]
        result = run_driver(cmd)
        rows.append((n, data["pattern"], result))
        print(f"{n} images: driver peak RSS {result['peak_rss_mib']:.0f} MiB, wall {result['wall_s']:.1f} s",
              flush=True)
    print("\n| images | shards | driver peak RSS (MiB) | wall s |\n|---:|---:|---:|---:|")
    for n, _pattern, result in rows:
        print(f"| {n} | {-(-n // args.per_shard)} | {result['peak_rss_mib']:.0f} | {result['wall_s']:.1f} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    raise SystemExit(main())
