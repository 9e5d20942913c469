"""Veil against deface, side by side, as a new user runs them (issue 11).

Builds bench_pipeline's dataset (photos of scenes with real faces of many sizes pasted in, 10%
close-ups of 1280x960; the face boxes are known by construction) as a folder of JPEGs and as
WebDataset shards, then runs, in one sitting and alternated (the order is reversed every
other repeat so that drift in the machine's load hits every command alike):

  deface      ``deface DIR`` (its defaults) on a fresh copy of the folder
  ray         ``veil run --input IN --output OUT`` (defaults: Ray runner, blur, re-scan,
              ``--pii faces,plates,text,metadata``)
  ray-faces   the same with ``--pii faces`` (the face pipeline alone)
  ray-faces-int8  the same with ``--detect-precision int8`` (CenterFace's finest level in int8)
  local       the same with ``--runner local``
  beam        the same with ``--runner beam``
  ray-gates   the defaults with ``--gates`` (run, then validation with the default gates)

each as a whole process, start-up included: wall time, CPU time of the process tree (user +
system of every process, Ray's workers included, sampled from /proc every 0.1 s) and peak
RSS/PSS of the tree. It prints the median over the repeats, the throughput ratio against
deface (deface reads files only, so both inputs compare with deface on the folder), the cost
of ``--gates`` relative to the run, and a privacy table for the same outputs: ground-truth
faces left recognisable (a face box whose 64x64 greyscale crop still has SSIM >= 0.6 with the
original; re-encoding alone scores ~0.95, blurred faces < 0.5).

    python benchmarks/bench_speed.py --images 200 --repeats 2
    python benchmarks/bench_speed.py --images 60 --repeats 1 --modes deface,ray --inputs folder

``--compare-with DIR`` adds, for every Veil command, a row ``COMMAND@other`` that runs the
Veil package found in DIR (a folder holding ``veil/``, e.g. an export of an earlier commit)
through ``PYTHONPATH``, alternated with the current code in the same sitting.

Results are appended as JSON lines to WORK/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import build_dataset, face_ssims, tree_rss_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: ``ray-faces``: the default run with the face class alone (``--pii faces``), i.e. without the
#: text, plate and metadata classes of the default ``--pii`` set: what they cost.
MODES = ("deface", "ray", "ray-faces", "ray-faces-int8", "local", "beam", "ray-gates")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ measuring


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        stack.extend(children.get(pid, []))
    return pids


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU of one process so far (its own, not its children's)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _process_name(pid: int) -> str:
    """A short name for a process: Ray's ``ray::Name`` titles, else the script it runs."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split(".", 1)[0].split()[0]
    script = next((a for a in argv[1:] if not a.startswith("-")), "")
    return " ".join(p for p in (Path(argv[0]).name, Path(script).name) if p)


def measure(cmd: list[str], *, pythonpath: str | None = None, ok: tuple[int, ...] = (0,)) -> dict:
    """Run ``cmd`` as a whole process; wall time, CPU time and peak memory of its tree.

    CPU is the sum over every process seen in the tree of its own user + system time (not its
    children's: Ray's processes wait for one another, so rusage of the children would count
    them twice), last sampled while it ran; the command's own process is read once more as a
    zombie, before it is reaped, so its figure is exact."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    cpu: dict[int, float] = {}
    names: dict[int, str] = {}
    peak_rss = peak_pss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        while not stop.is_set():
            pids = _tree_pids(proc.pid)
            for pid in pids:
                seconds = _cpu_seconds(pid)
                if seconds is not None:
                    cpu[pid] = max(cpu.get(pid, 0.0), seconds)
                    if pid not in names or names[pid] == "?":
                        names[pid] = _process_name(pid)
            peak_rss = max(peak_rss, tree_rss_bytes(proc.pid))
            peak_pss = max(peak_pss, tree_rss_bytes(proc.pid, "Pss"))
            stop.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read() if proc.stdout else ""
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    final = _cpu_seconds(proc.pid)
    _pid, status, _usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stop.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in ok:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    if final is not None:
        cpu[proc.pid] = final
    by_name: dict[str, float] = {}
    for pid, seconds in cpu.items():
        name = "main" if pid == proc.pid else names.get(pid, "?")
        by_name[name] = round(by_name.get(name, 0.0) + seconds, 2)
    return {"wall_s": wall, "cpu_s": sum(cpu.values()), "exit": proc.returncode, "peak_rss_mb": peak_rss / 2**20,
            "peak_pss_mb": peak_pss / 2**20, "processes": len(cpu),
            "cpu_by_process": dict(sorted(by_name.items(), key=lambda kv: -kv[1]))}


# ------------------------------------------------------------------------------ commands


def command(mode: str, inp: str, out: Path, workers: int | None) -> list[str]:
    if mode == "deface":
        return [str(BIN / "deface"), inp]
    cmd = [str(BIN / "veil"), "run", "--input", inp, "--output", str(out), "--no-progress"]
    if mode in ("local", "beam"):
        cmd += ["--runner", mode]
    if mode == "ray-gates":
        cmd += ["--gates"]
    if mode in ("ray-faces", "ray-faces-int8"):
        cmd += ["--pii", "faces"]
    if mode == "ray-faces-int8":
        cmd += ["--detect-precision", "int8"]
    if workers:
        cmd += ["--workers", str(workers)]
    return cmd


def prepare(mode: str, kind: str, data: dict, work: Path, label: str) -> tuple[str, Path]:
    """The input to pass and the output to read back; outputs from earlier repeats are
    removed first, so every run starts from nothing (no resume)."""
    out = work / "runs" / f"{label}-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    if mode == "deface":
        # deface writes NAME_anonymized.jpg next to its inputs: a fresh copy every time.
        shutil.copytree(data["jpg"], out)
        return str(out), out
    return data[kind], out


# ------------------------------------------------------------------------------ privacy


def released_images(mode: str, kind: str, out: Path) -> dict[str, np.ndarray]:
    """key -> released RGB pixels (quarantined samples are absent: never released)."""
    import tarfile

    from PIL import Image

    images: dict[str, np.ndarray] = {}
    if mode == "deface":
        for p in out.glob("*_anonymized.jpg"):
            images[p.name.removesuffix("_anonymized.jpg")] = np.asarray(Image.open(p).convert("RGB"))
    elif kind == "folder":
        for p in (out / "data").rglob("*.jpg"):
            images[p.stem] = np.asarray(Image.open(p).convert("RGB"))
    else:
        for tar_path in sorted((out / "data").glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".jpg"):
                        images[m.name[:-4]] = np.asarray(Image.open(tar.extractfile(m)).convert("RGB"))
    return images


def exposed_faces(data: dict, released: dict[str, np.ndarray], *, threshold: float = 0.6) -> dict:
    """Ground-truth faces still recognisable in a release, by kind (bench_pipeline's
    definition: SSIM of 64x64 greyscale crops of the face box, original vs released)."""
    total, scores = face_ssims(data, released)
    exposed = {kind: sum(1 for k, v in scores if k == kind and v >= threshold) for kind in total}
    return {"scene_exposed": f"{exposed['scene']}/{total['scene']}",
            "closeup_exposed": f"{exposed['closeup']}/{total['closeup']}",
            "released": len(released),
            "images": len(json.loads((Path(data["work"]) / "truth.json").read_text()))}


# ------------------------------------------------------------------------------ report


def tables(rows: list[dict], images: int) -> str:
    by: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r["mode"], r["input"]), []).append(r)
    med = {k: {f: statistics.median(x[f] for x in v) for f in ("wall_s", "cpu_s", "peak_rss_mb",
                                                            "peak_pss_mb")} | {"n": len(v)}
           for k, v in by.items()}
    deface = med.get(("deface", "folder"))
    lines = [f"## Throughput ({images} images, median of repeats, whole process)", "",
             "| command | input | runs | wall s | img/s | x deface | CPU s (tree) | x deface (CPU) | "
             "peak RSS MB | peak PSS MB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (mode, kind), m in med.items():
        ips = images / m["wall_s"]
        ratio = f"{deface['wall_s'] / m['wall_s']:.2f}" if deface else "-"
        # On a machine shared with other work, wall time follows the load; CPU time does not.
        cpu_ratio = f"{deface['cpu_s'] / m['cpu_s']:.2f}" if deface else "-"
        lines.append(f"| {mode} | {kind} | {m['n']} | {m['wall_s']:.1f} | {ips:.2f} | {ratio} | "
                     f"{m['cpu_s']:.1f} | {cpu_ratio} | {m['peak_rss_mb']:.0f} | "
                     f"{m['peak_pss_mb']:.0f} |")
    gates = [(k, f, med[("ray-gates", k)][f] / med[("ray", k)][f] - 1)
             for k in ("folder", "tar") for f in ("wall_s", "cpu_s")
             if ("ray-gates", k) in med and ("ray", k) in med]
    if gates:
        lines += ["", "Validation cost (`--gates` run minus run, over run): " + ", ".join(
            f"{k} {f.removesuffix('_s')} {v:.2f}x" for k, f, v in gates)]
    lines += ["", "## Privacy (same outputs, last repeat): ground-truth faces left recognisable",
              "", "| command | input | scene faces exposed | close-up faces exposed | released |",
              "|---|---|---:|---:|---:|"]
    for (mode, kind), v in by.items():
        p = v[-1]["privacy"]
        lines.append(f"| {mode} | {kind} | {p['scene_exposed']} | {p['closeup_exposed']} | "
                     f"{p['released']}/{p['images']} |")
    verdicts = [(mode, kind, v[-1]["gates_failed"]) for (mode, kind), v in by.items() if "gates_failed" in v[-1]]
    if verdicts:
        lines += ["", "Gates (last repeat): " + "; ".join(
            f"{mode} on {kind}: " + (f"failed {', '.join(f)}" if f else "all passed") for mode, kind, f in verdicts)]
    return "\n".join(lines)


def failed_gates(out: Path) -> list[str]:
    """The gates a ``--gates`` run failed (its validation summary), with their values."""
    summary = json.loads((out / "validation" / "summary.json").read_text())
    return [f"{g['name']} = {g.get('value')}" for g in summary.get("gates", []) if g.get("status") == "failed"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--per-shard", type=int, default=100, help="samples per WebDataset shard")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--inputs", default="folder,tar")
    ap.add_argument("--workers", type=int, default=None, help="--workers for veil (default: its own)")
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "speed"))
    ap.add_argument("--compare-with", default=None,
                    help="a folder holding another veil/ package: its rows are MODE@other")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        ap.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    kinds = [k for k in args.inputs.split(",") if k]

    work = Path(args.work)
    data_dir = work / f"data-{args.images}-{args.per_shard}"
    if not (data_dir / "truth.json").exists():
        print(f"building {args.images} images in {data_dir} ...", file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)
        build_dataset(data_dir, args.images, per_shard=args.per_shard)
    n_shards = len(list((data_dir / "shards").glob("*.tar")))
    data = {"folder": str(data_dir / "jpg"), "jpg": str(data_dir / "jpg"), "work": str(data_dir),
            "tar": str(data_dir / "shards" / f"bench-{{0000..{n_shards - 1:04d}}}.tar")}

    other = str(Path(args.compare_with).resolve()) if args.compare_with else None
    plan: list[tuple[str, str, str | None]] = []
    for kind in kinds:
        for mode in modes:
            if mode == "deface" and kind != "folder":
                continue
            plan.append((mode, kind, None))
            if other and mode != "deface":
                plan.append((mode, kind, other))
    if "deface" in modes and "folder" not in kinds:
        plan.insert(0, ("deface", "folder", None))  # the baseline of every ratio
    rows: list[dict] = []
    for repeat in range(args.repeats):
        for mode, kind, pythonpath in plan if repeat % 2 == 0 else plan[::-1]:
            label = f"{mode}@other" if pythonpath else mode
            inp, out = prepare(mode, kind, data, work, label)
            print(f"[repeat {repeat + 1}/{args.repeats}] {label} on {kind} ...", file=sys.stderr)
            # --gates exits 4 when the release fails a gate: a result to report, not a crash.
            res = measure(command(mode, inp, out, args.workers), pythonpath=pythonpath,
                          ok=(0, 4) if mode == "ray-gates" else (0,))
            res.update(mode=label, input=kind, repeat=repeat, images=args.images,
                       privacy=exposed_faces(data, released_images(mode, kind, out)))
            if mode == "ray-gates":
                res["gates_failed"] = failed_gates(out)
            print(json.dumps(res), file=sys.stderr)
            rows.append(res)
    with open(work / "results.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(tables(rows, args.images))


if __name__ == "__main__":
    main()
