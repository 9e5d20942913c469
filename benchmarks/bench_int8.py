"""int8 CenterFace against the float network (issue 11): faces found, faces lost, CPU cost.

Both detectors (``detect.precision: fp32`` and ``int8``, same pyramid, thresholds and
settings as a default run) scan every image in turn, one onnxruntime thread each. Image sets:

  scene     bench_pipeline's generated images (90 % scenes of 640x480 with 1-3 real faces
            pasted at 10-420 px, some cut by the frame; 10 % close-ups of 1280x960), seed
            away from the calibration images (which are made from scikit-image pictures only)
  photo     the shared face photos, whole, and each also shrunk so its face is 14-40 px
  released  the same scenes with every ground-truth face lightly blurred (sigma 6 % of the
            face height): half-hidden faces like those a first blur round leaves, which the
            re-scan must still flag

Printed per set: ground-truth faces found by each (a detection with IoU >= 0.3), the sizes of
faces either one misses, float detections with no int8 detection of IoU >= 0.5 (and the other
way round) with their scores, and CPU ms per image (median and mean).

    VEIL_MODELS=../shared/models python benchmarks/bench_int8.py --images 300
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
FACES = ROOT.parent / "shared" / "data" / "faces"


def _iou(a, b) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detectors(int8_margin: float | None) -> dict:
    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    registry = ModelRegistry()
    int8 = build_detector(DetectConfig(precision="int8"), registry)
    if int8_margin is not None:
        int8.INT8_SCORE_MARGIN = int8_margin
    return {"fp32": build_detector(DetectConfig(precision="fp32"), registry), "int8": int8}


def scene_images(work: Path, n: int, seed: int) -> list[tuple[str, np.ndarray, list]]:
    from bench_pipeline import build_dataset

    folder = work / f"scenes-{n}-{seed}"
    if not (folder / "truth.json").is_file():
        build_dataset(folder, n, per_shard=max(n, 1), seed=seed)
    truth = json.loads((folder / "truth.json").read_text())
    out = []
    for key, row in sorted(truth.items()):
        rgb = cv2.cvtColor(cv2.imread(str(folder / "jpg" / f"{key}.jpg")), cv2.COLOR_BGR2RGB)
        out.append((key, rgb, row["faces"]))
    return out


def photo_images() -> list[tuple[str, np.ndarray, list]]:
    """The shared photos whole, and shrunk so the face (found by the float network on the
    whole photo) is 14-40 px tall, pasted on a grey 640x480 canvas."""
    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    reference = build_detector(DetectConfig(precision="fp32"), ModelRegistry())
    out = []
    for path in sorted(FACES.iterdir()):
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        faces = [list(r.box) for r in reference.detect(rgb)]
        out.append((path.stem, rgb, faces))
        if not faces:
            continue
        box = max(faces, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
        for target in (14, 18, 24, 32, 40):
            k = target / (box[3] - box[1])
            small = cv2.resize(rgb, (max(1, int(rgb.shape[1] * k)), max(1, int(rgb.shape[0] * k))),
                               interpolation=cv2.INTER_AREA)
            canvas = np.full((480, 640, 3), 120, np.uint8)
            h, w = min(480, small.shape[0]), min(640, small.shape[1])
            canvas[:h, :w] = small[:h, :w]
            out.append((f"{path.stem}@{target}px", canvas, [[v * k for v in box]]))
    return out


def released_images(scenes: list[tuple[str, np.ndarray, list]]) -> list[tuple[str, np.ndarray, list]]:
    """Each ground-truth face box blurred at half the default blur's strength: faces a first
    round leaves half-visible, which the re-scan must still flag."""
    out = []
    for key, rgb, faces in scenes:
        img = rgb.copy()
        for x0, y0, x1, y1 in faces:
            x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            sigma = max(1.0, 0.06 * (y1 - y0))
            img[y0:y1, x0:x1] = cv2.GaussianBlur(img[y0:y1, x0:x1], (0, 0), sigma)
        out.append((key, img, faces))
    return out


def compare(name: str, images: list, dets: dict) -> dict:
    found = {p: 0 for p in dets}
    missed_sizes = {p: [] for p in dets}
    seconds = {p: [] for p in dets}
    lost, extra = [], []
    total = 0
    for index, (key, rgb, faces) in enumerate(images):
        order = list(dets) if index % 2 == 0 else list(reversed(list(dets)))
        result = {}
        for p in order:
            start = time.process_time()
            result[p] = [r for r in dets[p].detect(rgb)]
            seconds[p].append(time.process_time() - start)
        for face in faces:
            total += 1
            for p in dets:
                if any(_iou(face, r.box) >= 0.3 for r in result[p]):
                    found[p] += 1
                else:
                    missed_sizes[p].append(round(face[3] - face[1]))
        for r in result["fp32"]:
            if not any(_iou(r.box, q.box) >= 0.5 for q in result["int8"]):
                lost.append((key, round(r.score, 3), round(r.box[3] - r.box[1])))
        for q in result["int8"]:
            if not any(_iou(q.box, r.box) >= 0.5 for r in result["fp32"]):
                extra.append((key, round(q.score, 3), round(q.box[3] - q.box[1])))
    row = {"set": name, "images": len(images), "faces": total,
           "found": found, "missed_sizes": {p: sorted(v) for p, v in missed_sizes.items()},
           "fp32_not_in_int8": lost, "int8_not_in_fp32": extra,
           "ms_median": {p: round(1000 * float(np.median(v)), 1) for p, v in seconds.items()},
           "ms_mean": {p: round(1000 * float(np.mean(v)), 1) for p, v in seconds.items()}}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--int8-margin", type=float, default=None,
                    help="how far below the float threshold the int8 level's threshold sits "
                         "(default: CenterFaceDetector.INT8_SCORE_MARGIN)")
    ap.add_argument("--sets", default="scene,photo,released")
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "int8"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    dets = detectors(args.int8_margin)
    scenes = scene_images(work, args.images, args.seed)
    sets = {"scene": lambda: scenes, "photo": photo_images, "released": lambda: released_images(scenes)}
    rows = [compare(name, sets[name](), dets) for name in args.sets.split(",")]
    print("| set | images | ground-truth faces | found fp32 | found int8 | missed fp32 (px) | missed int8 (px) "
          "| fp32 dets lost by int8 (score) | int8 dets not in fp32 | CPU ms fp32 median (mean) | int8 |")
    print("|---|---:|---:|---:|---:|---|---|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['set']} | {r['images']} | {r['faces']} | {r['found']['fp32']} | {r['found']['int8']} "
              f"| {r['missed_sizes']['fp32'] or '-'} | {r['missed_sizes']['int8'] or '-'} "
              f"| {len(r['fp32_not_in_int8'])} {sorted(s for _, s, _ in r['fp32_not_in_int8']) or ''} "
              f"| {len(r['int8_not_in_fp32'])} | {r['ms_median']['fp32']} ({r['ms_mean']['fp32']}) "
              f"| {r['ms_median']['int8']} ({r['ms_mean']['int8']}) |")
    with open(work / "results.jsonl", "a") as fh:
        for r in rows:
            fh.write(json.dumps({**r, "int8_margin": args.int8_margin,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


if __name__ == "__main__":
    main()
