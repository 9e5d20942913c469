"""Scaling from one to two Ray nodes (issue 9): the same dataset through `veil run
--ray-address` on a one-node cluster (1 CPU) and on a two-node cluster (1 CPU per node).

The clusters are real (`ray start --head` plus `ray start --address=...`, separate processes)
and run in a network namespace of their own, as in the tests (tests/raycluster.py); each run
gets a fresh cluster, runs alternate 1, 2, 1, 2, ... and the median per cluster size is printed.
Needs root (network namespaces).

    python benchmarks/bench_cluster.py --images 48 --per-shard 12 --reps 2

Figures per run:
  wall    the whole `veil run` process, start to exit (Ray connect, actor start-up with model
          loading, processing, commits), seconds
  img/s   images / wall
  cpu     CPU seconds of the driver process tree plus every process of the cluster's nodes
          (raylets, agents, Ray workers; workers that exit are counted through their parent's
          cumulative child times), from /proc and getrusage
On a machine whose cores are shared with other work the wall times are noisy and two 1-CPU
nodes on 2 cores cannot show more than the cores give; the CPU time says whether the second
node added work (overhead) rather than throughput. Results are appended to
bench-out/results.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bench_pipeline import build_dataset  # noqa: E402
from raycluster import RayTestCluster  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


def netns_cpu_seconds(netns: str) -> float:
    """User + system CPU of every live process in the namespace, with the cumulative times of
    the children each has reaped (Ray workers that already exited)."""
    import subprocess

    pids = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout.split()
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        # utime, stime, cutime, cstime are fields 14-17 (1-based) of /proc/PID/stat.
        total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def release_digest(out: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((out / "data").rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def one_run(pattern: str, n_images: int, nodes: int, out: Path, batch_size: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    with RayTestCluster(nodes=nodes, cpus_per_node=1, dashboard=False) as cluster:
        cluster_cpu0, driver_cpu0 = netns_cpu_seconds(cluster.netns), children_cpu_seconds()
        start = time.perf_counter()
        proc = cluster.run(["veil", "run", "--runner", "ray", "--ray-address", cluster.address,
                            "--input", pattern, "--output", str(out), "--no-progress",
                            "--batch-size", str(batch_size)], timeout=3600)
        wall = time.perf_counter() - start
        cpu = (netns_cpu_seconds(cluster.netns) - cluster_cpu0) + (children_cpu_seconds() - driver_cpu0)
    if proc.returncode != 0:
        raise SystemExit(f"veil run on {nodes} node(s) failed:\n{proc.stdout[-4000:]}")
    return {"nodes": nodes, "wall_s": round(wall, 2), "images_per_s": round(n_images / wall, 3),
            "cpu_s": round(cpu, 1), "release_sha256": release_digest(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--per-shard", type=int, default=12)
    parser.add_argument("--reps", type=int, default=2, help="runs per cluster size, alternated")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--work", default=str(ROOT / "bench-out" / "cluster"))
    args = parser.parse_args()

    os.environ.setdefault("VEIL_MODELS", str(ROOT.parent / "shared" / "models"))
    work = Path(args.work)
    data_dir = work / f"data-{args.images}-{args.per_shard}"
    if not (data_dir / "truth.json").exists():
        shutil.rmtree(data_dir, ignore_errors=True)
        build_dataset(data_dir, args.images, per_shard=args.per_shard)
    n_shards = -(-args.images // args.per_shard)
    pattern = str(data_dir / "shards" / f"bench-{{0000..{n_shards - 1:04d}}}.tar")

    runs = []
    for rep in range(args.reps):
        for nodes in (1, 2):
            r = one_run(pattern, args.images, nodes, work / f"out-{nodes}", args.batch_size)
            r["rep"] = rep
            runs.append(r)
            print(json.dumps(r), flush=True)
    digests = {r["release_sha256"] for r in runs}
    if len(digests) != 1:
        raise SystemExit(f"runs released different bytes: {digests}")

    print(f"\n{args.images} images in {n_shards} shards, median of {args.reps} alternated runs, "
          "1 CPU per node")
    print(f"{'nodes':>5} {'wall s':>8} {'img/s':>7} {'cpu s':>7}")
    table = []
    for nodes in (1, 2):
        mine = [r for r in runs if r["nodes"] == nodes]
        row = {"nodes": nodes, "wall_s": statistics.median(r["wall_s"] for r in mine),
               "images_per_s": statistics.median(r["images_per_s"] for r in mine),
               "cpu_s": statistics.median(r["cpu_s"] for r in mine)}
        table.append(row)
        print(f"{nodes:>5} {row['wall_s']:>8.1f} {row['images_per_s']:>7.3f} {row['cpu_s']:>7.1f}")
    print(f"speed-up 2 nodes / 1 node (wall): {table[0]['wall_s'] / table[1]['wall_s']:.2f}x; "
          "identical release bytes in every run")
    results = work.parent / "results.jsonl"
    with open(results, "a") as f:
        f.write(json.dumps({"bench": "cluster", "images": args.images, "shards": n_shards,
                            "runs": runs, "median": table}) + "\n")


if __name__ == "__main__":
    main()
