"""Throughput and memory benchmark for the core pipeline (issue: core pipeline, item 13).

Builds a dataset of ~640x480 JPEGs with real faces (from ../shared/data/faces, public-domain
photos), then measures images/s and peak RSS of the whole process tree for:

  loop   a plain Python loop: decode -> detect -> blur -> encode with the same models
  loop-stages  the same stage objects as a Veil run (re-scan included) in a plain loop
  local  Veil's local runner
  ray    Veil's Ray runner (embedded 2-CPU Ray; start-up excluded)
  beam   Veil's Beam runner (BundleBasedDirectRunner)
  deface the `deface` command line on the same JPEG files

and checks privacy on every output: the share of known face boxes (built into the data)
whose pixels were actually changed, for scenes and for 1280x960 close-ups, and that every
face deface's detector finds lies inside a region Veil anonymized.

    python benchmarks/bench_pipeline.py --images 1000 --modes loop,local,ray,beam,deface
    python benchmarks/bench_pipeline.py --rss-scaling 500,5000 --modes ray

Each mode runs in its own subprocess so peak memory is measured cleanly: the sum over the
process tree of RSS and of PSS (shared pages divided among the processes that map them),
sampled every 100 ms from /proc. Results are printed as JSON and appended to
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
    """n JPEGs: 90% scenes of 640x480 with 1-3 portraits pasted at random scales (faces about
    10-200 px, some cut by the frame), 10% close-ups of 1280x960 where one face fills most
    of the frame, as phone photos do. The face boxes are known by construction and saved in
    truth.json (occluded faces are dropped). Written both as files and as tar shards."""
    import webdataset as wds
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    photos = []
    for p in sorted(FACES.iterdir()):
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        img.thumbnail((900, 900))
        boxes = _face_boxes(np.asarray(img))
        if boxes:
            photos.append((img, max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))))
    import skimage.data

    scenes = [skimage.data.coffee(), skimage.data.rocket(), skimage.data.chelsea(),
              skimage.data.hubble_deep_field(), skimage.data.immunohistochemistry()]
    jpg_dir = folder / "jpg"
    shard_dir = folder / "shards"
    jpg_dir.mkdir(parents=True, exist_ok=True)
    shard_dir.mkdir(parents=True, exist_ok=True)
    truth: dict[str, dict] = {}
    writer = None
    for i in range(n):
        key = f"img{i:06d}"
        if i % per_shard == 0:
            if writer:
                writer.close()
            writer = wds.TarWriter(str(shard_dir / f"bench-{i // per_shard:04d}.tar"))
        if rng.random() < 0.1:
            img, (x0, y0, x1, y1) = photos[rng.integers(len(photos))]
            cx, cy, s = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0) * rng.uniform(0.8, 1.05)
            crop = (cx - s * 0.66, cy - s * 0.5, cx + s * 0.66, cy + s * 0.5)
            canvas = img.crop(tuple(int(v) for v in crop)).resize((1280, 960), Image.Resampling.BICUBIC)
            fx, fy = 1280 / (int(crop[2]) - int(crop[0])), 960 / (int(crop[3]) - int(crop[1]))
            face = [(x0 - int(crop[0])) * fx, (y0 - int(crop[1])) * fy, (x1 - int(crop[0])) * fx, (y1 - int(crop[1])) * fy]
            faces = [[max(0, face[0]), max(0, face[1]), min(1280, face[2]), min(960, face[3])]]
            truth[key] = {"kind": "closeup", "faces": faces}
        else:
            scene = scenes[rng.integers(len(scenes))]
            sh, sw = scene.shape[:2]
            y, x = rng.integers(0, max(1, sh - 240)), rng.integers(0, max(1, sw - 320))
            canvas = Image.fromarray(scene[y:y + 240, x:x + 320]).resize((640, 480))
            faces = []
            for _ in range(int(rng.integers(1, 4))):
                ph, (x0, y0, x1, y1) = photos[rng.integers(len(photos))]
                height = int(rng.uniform(60, 420))
                k = height / ph.height
                tile = ph.resize((max(8, int(ph.width * k)), height))
                flip = rng.random() < 0.5
                if flip:
                    tile = ImageOps.mirror(tile)
                    x0, x1 = ph.width - x1, ph.width - x0
                px = int(rng.integers(-tile.width // 3, 640 - tile.width // 2))
                py = int(rng.integers(-tile.height // 4, 480 - tile.height // 2))
                canvas.paste(tile, (px, py))
                tile_box = (px, py, px + tile.width, py + tile.height)
                # A later tile hides what it covers: drop faces it overlaps.
                faces = [f for f in faces if not _intersects(f, tile_box)]
                face = [px + x0 * k, py + y0 * k, px + x1 * k, py + y1 * k]
                clipped = [max(0, face[0]), max(0, face[1]), min(640, face[2]), min(480, face[3])]
                visible = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
                if visible > 0.5 * (face[2] - face[0]) * (face[3] - face[1]):
                    faces.append(clipped)
            truth[key] = {"kind": "scene", "faces": faces}
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=90)
        (jpg_dir / f"{key}.jpg").write_bytes(buf.getvalue())
        writer.write({"__key__": key, "jpg": buf.getvalue()})
    writer.close()
    n_shards = (n + per_shard - 1) // per_shard
    (folder / "truth.json").write_text(json.dumps(truth))
    return {"pattern": str(shard_dir / f"bench-{{0000..{n_shards - 1:04d}}}.tar"), "jpg": str(jpg_dir)}


def _intersects(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------ measuring


def tree_rss_bytes(pid: int, field: str = "Rss") -> int:
    """Sum of RSS (or PSS, which shares shared pages out fairly instead of counting them in
    every process) of a process and all its descendants, from /proc."""
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
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        stack.extend(children.get(p, []))
    return total


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd, sampling the process tree's RSS; the child prints a JSON line last."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = peak_pss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, peak_pss
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(proc.pid))
            peak_pss = max(peak_pss, tree_rss_bytes(proc.pid, "Pss"))
            time.sleep(0.1)

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
    result.update(peak_rss_mb=round(peak / 2**20, 1), peak_pss_mb=round(peak_pss / 2**20, 1),
                  process_wall_s=round(wall, 2))
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


def mode_loop_stages(data: dict, n: int) -> dict:
    """The same stage objects Veil runs (decode, detect, anonymize, encode, re-scan), called
    in a plain loop: the same work as a Veil run without runner, sinks or manifests."""
    from veil.config import RunConfig
    from veil.pipelines.driver import build_stages
    from veil.pipelines.execution import StageChain

    chain = StageChain(build_stages(RunConfig()))
    chain.setup()
    files = sorted(Path(data["jpg"]).iterdir())[:n]
    out_dir = Path(data["work"]) / "loop-stages-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for path in files:
        sample = {"__key__": path.stem, "__shard__": "s", "__index__": 0, "__image__": "jpg",
                  "jpg": path.read_bytes(), "status": "pending", "reason": ""}
        [sample] = chain([sample])
        if sample["status"] != "quarantined":
            (out_dir / path.name).write_bytes(sample["jpg"])
    seconds = time.perf_counter() - start
    return {"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds}


def mode_veil(data: dict, runner: str, workers: int | None) -> dict:
    from veil.config import RunConfig
    from veil.orchestrate import run

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


def _released_images(mode: str, data: dict) -> dict[str, np.ndarray]:
    """key -> released RGB pixels of a mode's output (quarantined samples are absent)."""
    import tarfile

    from PIL import Image

    work = Path(data["work"])
    out: dict[str, np.ndarray] = {}
    if mode == "deface":
        for p in (work / "deface-in").glob("*_anonymized.jpg"):
            out[p.name.removesuffix("_anonymized.jpg")] = np.asarray(Image.open(p).convert("RGB"))
    elif mode in ("loop", "loop-stages"):
        for p in (work / f"{mode}-out").glob("*.jpg"):
            out[p.stem] = np.asarray(Image.open(p).convert("RGB"))
    else:
        for tar_path in sorted((work / f"{mode}-out" / "data").glob("*.tar")):
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".jpg"):
                        out[m.name[:-4]] = np.asarray(Image.open(tar.extractfile(m)).convert("RGB"))
    return out


def face_ssims(data: dict, released: dict[str, np.ndarray]) -> tuple[dict[str, int], list[tuple[str, float]]]:
    """Ground-truth face counts by kind, and (kind, SSIM) for every face of a released image.

    Each face box is cut from the original and the released image, both resized to 64x64
    greyscale (so the comparison works at face scale whatever the resolution) and compared by
    SSIM. Re-encoding alone scores ~0.95; blurred, pixelated or filled faces score <0.5.
    Quarantined samples are not released, so their faces are protected (no SSIM)."""
    import cv2
    from PIL import Image
    from skimage.metrics import structural_similarity

    truth = json.loads((Path(data["work"]) / "truth.json").read_text())
    total = {"scene": 0, "closeup": 0}
    scores: list[tuple[str, float]] = []
    for key, t in truth.items():
        total[t["kind"]] += len(t["faces"])
        out = released.get(key)
        if out is None:
            continue
        orig = np.asarray(Image.open(Path(data["jpg"]) / f"{key}.jpg").convert("L"))
        anon = np.asarray(Image.fromarray(out).convert("L"))
        for x0, y0, x1, y1 in t["faces"]:
            sl = (slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1))))
            if orig[sl].size == 0:
                continue
            a = cv2.resize(orig[sl], (64, 64), interpolation=cv2.INTER_AREA)
            b = cv2.resize(anon[sl], (64, 64), interpolation=cv2.INTER_AREA)
            scores.append((t["kind"], float(structural_similarity(a, b, data_range=255))))
    return total, scores


def face_coverage(data: dict, mode: str, *, exposed_ssim: float = 0.6) -> dict:
    """Tool-agnostic privacy check against the known face boxes (:func:`face_ssims`): a face
    with SSIM >= ``exposed_ssim`` counts as exposed."""
    total, scores = face_ssims(data, _released_images(mode, data))
    exposed = {kind: sum(1 for k, v in scores if k == kind and v >= exposed_ssim) for kind in total}
    closeup_ssim = [v for k, v in scores if k == "closeup"]
    return {"scene_faces_exposed": f"{exposed['scene']}/{total['scene']}",
            "closeup_faces_exposed": f"{exposed['closeup']}/{total['closeup']}",
            "closeup_median_ssim": round(float(np.median(closeup_ssim)), 3) if closeup_ssim else None}


def recall_vs_deface(data: dict, veil_out: str) -> dict:
    """Every face deface's detector finds (its defaults: CenterFace at input resolution,
    threshold 0.2) must have its centre inside a region Veil anonymized (or the sample is
    quarantined)."""
    import cv2
    from deface.centerface import CenterFace

    from veil.pipelines.manifest import read_manifests

    rows = {r["key"]: r for r in read_manifests(Path(veil_out)).to_pylist()}
    cf = CenterFace(in_shape=None, backend="onnxrt")
    deface_faces = covered = 0
    for path in sorted(Path(data["jpg"]).iterdir()):
        bgr = cv2.imread(str(path))
        dets, _ = cf(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), threshold=0.2)
        row = rows[path.stem]
        boxes = [r["box"] for r in json.loads(row["regions"] or "[]")]
        for d in dets:
            x0, y0, x1, y1 = d[:4]
            deface_faces += 1
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            if row["status"] == "quarantined" or any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in boxes):
                covered += 1
    return {"deface_detections": deface_faces, "inside_veil_regions": covered}


# ------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--modes", default="loop,loop-stages,local,ray,beam,deface")
    ap.add_argument("--work", default=str(ROOT / "bench-out"))
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rss-scaling", default=None, help="e.g. 500,5000: peak RSS of each mode at these sizes")
    ap.add_argument("--no-quality", action="store_true", help="skip the face-coverage checks")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)

    if args.child:
        data = json.loads(args.child)
        mode = data["mode"]
        if mode == "loop":
            res = mode_loop(data, data["n"])
        elif mode == "loop-stages":
            res = mode_loop_stages(data, data["n"])
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
        if not (data_dir / "truth.json").exists():
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
            if not args.no_quality:
                res["coverage"] = face_coverage(data, mode)
                if mode in ("local", "ray", "beam"):
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
