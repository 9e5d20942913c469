"""Throughput and memory benchmark for the core pipeline (issue: core pipeline, item 13).

Builds a dataset of ~640x480 JPEGs with real faces (from ../shared/data/faces, public-domain
photos), then measures images/s and peak RSS of the whole process tree for:

  loop   a plain Python loop: decode -> detect -> blur -> encode with the same models
  local  Veil's local runner
  ray    Veil's Ray runner (embedded 2-CPU Ray; start-up excluded)
  beam   Veil's Beam runner (BundleBasedDirectRunner)
  deface the `deface` command line on the same JPEG files

and checks recall against deface: every face deface finds must be inside a region Veil
anonymized, and the close-ups deface misses must be anonymized by Veil.

    python benchmarks/bench_pipeline.py --images 1000 --modes loop,local,ray,beam,deface
    python benchmarks/bench_pipeline.py --rss-scaling 500,5000 --modes ray

Each mode runs in its own subprocess so peak RSS is measured cleanly (sum of RSS over the
process tree, sampled every 50 ms from /proc). Results are printed as JSON and appended to
bench-out/results.jsonl; copy the figures into BENCHMARKS.md with the command used.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces"


# ------------------------------------------------------------------------------ dataset


def _face_boxes(rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    det = build_detector(DetectConfig(detectors=["centerface", "mtcnn"]), ModelRegistry())
    return [tuple(r.box) for r in det.detect(rgb)]


def build_dataset(folder: Path, n: int, *, per_shard: int = 100, seed: int = 0) -> dict:
    """n JPEGs of 640x480: portraits pasted on scenes at random scales (faces ~20-200 px),
    10% close-ups where one face fills the frame. Written both as files and as tar shards."""
    import webdataset as wds
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    photos = []
    for p in sorted(FACES.iterdir()):
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        img.thumbnail((900, 900))
        rgb = np.asarray(img)
        photos.append((img, _face_boxes(rgb)))
    import skimage.data

    scenes = [skimage.data.coffee(), skimage.data.rocket(), skimage.data.chelsea(),
              skimage.data.hubble_deep_field(), skimage.data.immunohistochemistry()]
    jpg_dir = folder / "jpg"
    shard_dir = folder / "shards"
    jpg_dir.mkdir(parents=True, exist_ok=True)
    shard_dir.mkdir(parents=True, exist_ok=True)
    kinds = {}
    writer = None
    for i in range(n):
        if i % per_shard == 0:
            if writer:
                writer.close()
            writer = wds.TarWriter(str(shard_dir / f"bench-{i // per_shard:04d}.tar"))
        img, boxes = photos[rng.integers(len(photos))]
        if rng.random() < 0.1 and boxes:
            x0, y0, x1, y1 = boxes[0]
            cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * rng.uniform(0.9, 1.15)
            canvas = img.crop((int(cx - s * 0.66), int(cy - s * 0.5), int(cx + s * 0.66), int(cy + s * 0.5)))
            canvas = canvas.resize((640, 480), Image.Resampling.BICUBIC)
            kinds[f"img{i:06d}"] = "closeup"
        else:
            scene = scenes[rng.integers(len(scenes))]
            sh, sw = scene.shape[:2]
            y, x = rng.integers(0, max(1, sh - 240)), rng.integers(0, max(1, sw - 320))
            canvas = Image.fromarray(scene[y:y + 240, x:x + 320]).resize((640, 480))
            for _ in range(int(rng.integers(1, 4))):
                ph, _b = photos[rng.integers(len(photos))]
                height = int(rng.uniform(60, 420))
                tile = ph.resize((max(8, int(ph.width * height / ph.height)), height))
                if rng.random() < 0.5:
                    tile = ImageOps.mirror(tile)
                canvas.paste(tile, (int(rng.integers(-tile.width // 3, 640 - tile.width // 2)),
                                    int(rng.integers(-tile.height // 4, 480 - tile.height // 2))))
            kinds[f"img{i:06d}"] = "scene"
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        (jpg_dir / f"img{i:06d}.jpg").write_bytes(buf.getvalue())
        writer.write({"__key__": f"img{i:06d}", "jpg": buf.getvalue()})
    writer.close()
    n_shards = (n + per_shard - 1) // per_shard
    (folder / "kinds.json").write_text(json.dumps(kinds))
    return {"pattern": str(shard_dir / f"bench-{{0000..{n_shards - 1:04d}}}.tar"), "jpg": str(jpg_dir)}


# ------------------------------------------------------------------------------ measuring


def tree_rss_bytes(pid: int) -> int:
    """Sum of RSS of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(ppid, []).append(int(entry))
    total, stack = 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd, sampling the process tree's RSS; the child prints a JSON line last."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(proc.pid))
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    start = time.perf_counter()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-3000:]}")
    lines = [ln for ln in out.strip().splitlines() if ln.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    result.update(peak_rss_mb=round(peak / 2**20, 1), process_wall_s=round(wall, 2))
    return result


# ------------------------------------------------------------------------------ modes (child side)


def mode_loop(data: dict, n: int) -> dict:
    """decode -> detect -> blur -> encode, no framework, Veil's default models and settings."""
    from veil.config import RunConfig
    from veil.pipelines.execution import limit_threads
    from veil.transforms.anonymize import Anonymizer, sample_rng
    from veil.transforms.detect import build_detector
    from veil.transforms.imageio import decode_image, encode_image
    from veil.transforms.models import ModelRegistry

    cfg = RunConfig()
    limit_threads(1)
    detector = build_detector(cfg.detect, ModelRegistry())
    anonymizer = Anonymizer(cfg.anonymize, expand=cfg.detect.expand)
    files = sorted(Path(data["jpg"]).iterdir())[:n]
    out_dir = Path(data["work"]) / "loop-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in files:
        raw = path.read_bytes()
        dec = decode_image(raw, ext="jpg", max_pixels=cfg.io.max_pixels, max_bytes=cfg.io.max_bytes)
        regions = [r.to_dict() for r in detector.detect(dec.rgb)]
        res = anonymizer.apply(dec.rgb, regions, rng=sample_rng(0, path.stem))
        (out_dir / path.name).write_bytes(encode_image(dec, res.pixels, mask=res.mask, ext="jpg",
                                                       jpeg_quality=cfg.io.jpeg_quality))
    seconds = time.perf_counter() - start
    return {"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds}


def mode_veil(data: dict, runner: str, workers: int | None) -> dict:
    from veil.config import RunConfig
    from veil.pipelines.driver import run

    out = Path(data["work"]) / f"{runner}-out"
    shutil.rmtree(out, ignore_errors=True)
    if runner == "ray":
        from veil.pipelines.runners import init_ray

        init_ray(None)  # cluster start-up is excluded from the timing
    cfg = RunConfig(input=data["pattern"], output=str(out), runner=runner, progress=False, workers=workers)
    start = time.perf_counter()
    summary = run(cfg)
    seconds = time.perf_counter() - start
    return {"images": summary.samples, "seconds": seconds, "images_per_s": summary.samples / seconds,
            "counts": summary.counts, "faces": summary.faces, "output": str(out)}


def mode_deface(data: dict) -> dict:
    work = Path(data["work"]) / "deface-in"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(data["jpg"], work)
    n = len(list(work.iterdir()))
    exe = Path(sys.executable).with_name("deface")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")}
    start = time.perf_counter()
    subprocess.run([str(exe), str(work), "--backend", "onnxrt", "--ep", "CPUExecutionProvider"],
                   check=True, capture_output=True, env={k: v for k, v in env.items() if v})
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "images_per_s": n / seconds}


# ------------------------------------------------------------------------------ recall vs deface


def recall_vs_deface(data: dict, veil_out: str) -> dict:
    """Faces deface's detector finds (its defaults: CenterFace at full resolution, threshold 0.2)
    must all lie in regions Veil anonymized; count close-ups Veil anonymized and deface missed."""
    import cv2
    from deface.centerface import CenterFace

    from veil.pipelines.manifest import read_manifests

    rows = {r["key"]: r for r in read_manifests(Path(veil_out)).to_pylist()}
    kinds = json.loads((Path(data["work"]) / "kinds.json").read_text())
    cf = CenterFace(in_shape=None, backend="onnxrt")
    deface_faces = covered = 0
    closeups = closeups_deface = closeups_veil = 0
    for path in sorted(Path(data["jpg"]).iterdir()):
        bgr = cv2.imread(str(path))
        dets, _ = cf(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), threshold=0.2)
        row = rows[path.stem]
        boxes = [r["box"] for r in json.loads(row["regions"] or "[]")]
        for d in dets:
            x0, y0, x1, y1 = d[:4]
            deface_faces += 1
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes) or row["status"] == "quarantined":
                covered += 1
        if kinds[path.stem] == "closeup":
            closeups += 1
            closeups_deface += int(len(dets) > 0)
            closeups_veil += int(len(boxes) > 0 or row["status"] == "quarantined")
    return {"deface_faces": deface_faces, "deface_faces_covered_by_veil": covered,
            "closeups": closeups, "closeups_found_by_deface": closeups_deface,
            "closeups_anonymized_by_veil": closeups_veil}


# ------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--modes", default="loop,local,ray,beam,deface")
    ap.add_argument("--work", default=str(ROOT / "bench-out"))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rss-scaling", default=None, help="e.g. 500,5000: peak RSS of each mode at these sizes")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)

    if args.child:
        data = json.loads(args.child)
        mode = data["mode"]
        if mode == "loop":
            res = mode_loop(data, data["n"])
        elif mode == "deface":
            res = mode_deface(data)
        else:
            res = mode_veil(data, mode, data.get("workers"))
        print(json.dumps(res))
        return

    sizes = [int(s) for s in args.rss_scaling.split(",")] if args.rss_scaling else [args.images]
    results = []
    for n in sizes:
        data_dir = work / f"data-{n}"
        if not (data_dir / "kinds.json").exists():
            print(f"building {n} images in {data_dir} ...", file=sys.stderr)
            shutil.rmtree(data_dir, ignore_errors=True)
            build_dataset(data_dir, n)
        n_shards = len(list((data_dir / "shards").glob("*.tar")))
        data = {"pattern": str(data_dir / "shards" / f"bench-{{0000..{n_shards - 1:04d}}}.tar"),
                "jpg": str(data_dir / "jpg"), "work": str(data_dir), "n": n, "workers": args.workers}
        for mode in args.modes.split(","):
            print(f"[{n} images] {mode} ...", file=sys.stderr)
            res = run_measured([sys.executable, __file__, "--child", json.dumps({**data, "mode": mode})])
            res.update(mode=mode, n=n)
            if mode in ("local", "ray", "beam") and "output" in res and "deface" in args.modes:
                res["recall_vs_deface"] = recall_vs_deface(data, res["output"])
            results.append(res)
            print(json.dumps(res), file=sys.stderr)
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "results.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
