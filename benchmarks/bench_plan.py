"""Planning cost of a very large run: listing, fingerprints and the resume check.

    .venv/bin/python benchmarks/bench_plan.py --shards 100000 --done 1000 --work /tmp/bench-plan
    .venv/bin/python benchmarks/bench_plan.py --shards 100000 --done 1000 --s3   # moto S3 output

For a brace pattern of ``--shards`` tar shards (no shard file needs to exist: the pattern is
expanded, not listed) and an output where ``--done`` shards are already committed (real
manifests with this fingerprint, and their data files), it measures, in one process:

1. **list**: ``open_source(pattern).list_shards()``;
2. **plan**: ``shards_to_do`` (one listing of ``OUT/manifest/``, then a metadata read of each
   finished shard's manifest);
3. **peak memory** of both (``tracemalloc``), and CPU and wall seconds of each.

With ``--s3`` the output is on a moto S3 server on loopback (a process of its own, so the CPU
column is the planner's alone), so the plan's requests are real HTTP requests (a real object store adds network latency per request: the listing is paged,
1000 keys per request, and each finished shard costs one read).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):  # noqa: ANN001, ANN201 - a tiny helper
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def moto_output() -> tuple[str, subprocess.Popen]:
    """A moto S3 server in a process of its own (so its CPU is not this process's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    import boto3

    client = boto3.client("s3")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="veil-bench")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            time.sleep(0.2)
    return "s3://veil-bench/out", server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=100_000)
    parser.add_argument("--done", type=int, default=1000)
    parser.add_argument("--work", default=None, help="folder for the output (default: a temp dir)")
    parser.add_argument("--s3", action="store_true", help="put the output on a moto S3 server")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT.parent))
    from veil.pipelines.driver import shards_to_do
    from veil.pipelines.manifest import write_manifest
    from veil.pipelines.sources import open_source
    from veil.pipelines.storage import as_store

    server = None
    if args.s3:
        location, server = moto_output()
    else:
        location = str(Path(args.work or tempfile.mkdtemp(prefix="bench-plan-")) / "out")
    out = as_store(location)
    width = len(str(args.shards - 1))
    pattern = f"/nonexistent/raw/shard-{{{0:0{width}d}..{args.shards - 1:0{width}d}}}.tar"
    fingerprint = "f" * 64
    step = max(1, args.shards // max(1, args.done))
    done = [f"shard-{i:0{width}d}.tar" for i in range(0, args.shards, step)][:args.done]
    print(f"writing {len(done)} finished shards to {out.url} ...", flush=True)
    for shard_id in done:
        out.write_bytes(f"data/{shard_id}", b"x")
        write_manifest(out, shard_id, [], run_fingerprint=fingerprint, extra={"outputs": f"data/{shard_id}"})

    tracemalloc.start()
    shards, list_wall, list_cpu = timed(lambda: open_source(pattern).list_shards())
    todo, plan_wall, plan_cpu = timed(lambda: shards_to_do(shards, out, fingerprint))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(todo) == args.shards - len(done), (len(todo), args.shards, len(done))

    print("\n| step | shards | wall s | CPU s |\n|---|---:|---:|---:|")
    print(f"| list (brace pattern) | {len(shards):,} | {list_wall:.2f} | {list_cpu:.2f} |")
    print(f"| plan ({len(done):,} finished, {'S3' if args.s3 else 'local'}) | {len(todo):,} to do | "
          f"{plan_wall:.2f} | {plan_cpu:.2f} |")
    print(f"\npeak traced memory of list + plan: {peak / 2**20:.1f} MiB "
          f"({peak / len(shards):.0f} bytes per shard)")
    if server is not None:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
