"""The OCR pre-scan against reading every image whole (issue 11): lines missed and CPU cost.

For each image three engines read it in turn (``prescan 0``: the native pass over the whole
image; ``prescan SCALE``: the detector at SCALE of the size picks the windows read at native
resolution, as configured by default (int8 pre-scan, a place read only where its probability
reaches ``prescan_peak``), and the same with every place the pre-scan marks read
(``prescan_peak 0``, the rule before)). A line of the native pass counts as missed when no line of the pre-scan covers
half of its box. Image sets:

  sign, plate, benign, blank  tests/pii_images.py generators (seeds from 3000, away from the tests')
  tiny                        3 lines of 6-9 px characters on small boards (names, e-mails, phone numbers)
  scene                       bench_pipeline's scenes (faces of many sizes, 10 % close-ups of 1280x960)
  photo                       the shared face photos (../shared/data/faces), whole
  skimage                     scikit-image's sample images (a scanned page, text on a sign, photos)

Printed per set: CPU ms per image (time.process_time, median and mean) of the engines, the
lines the native pass read, and the missed lines (text, score, box: generated or public
images only). ``--thresholds`` also counts misses on the tiny set at other pre-scan
probability thresholds.

``--places`` instead reads every place the pre-scan marks (probability above the threshold)
in its own window and prints how its peak probability relates to what the window holds: the
evidence for ``prescan_peak``.

    OMP_NUM_THREADS=1 VEIL_MODELS=../shared/models python benchmarks/bench_ocr_prescan.py
    OMP_NUM_THREADS=1 VEIL_MODELS=../shared/models python benchmarks/bench_ocr_prescan.py --places
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
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TINY_LINES = ("Tel 0734567826", "anna.berg@mail.se", "Peter Novak", "ID 88231-X")


def tiny_scene(seed: int) -> np.ndarray:
    """Three short lines of 6-9 px characters, light on dark or dark on light boards."""
    import pii_images as P

    rng = np.random.default_rng(seed)
    img = P.background(rng)
    for _ in range(3):
        scale = float(rng.uniform(0.28, 0.45))
        text = TINY_LINES[int(rng.integers(0, len(TINY_LINES)))]
        x, y = int(rng.integers(10, 400)), int(rng.integers(30, 450))
        light = rng.random() < 0.5
        (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(img, (x - 3, y - h - 3), (x + w + 3, y + 4), (20, 20, 20) if light else (235, 235, 235), -1)
        cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (250, 250, 250) if light else (10, 10, 10),
                    1, cv2.LINE_AA)
    return img


def image_sets(scenes: int, work: Path, generated: int = 25):
    import pii_images as P

    for s in range(generated):
        yield "sign", P.sign_scene(3000 + s)[0]
        yield "plate", P.plate_scene(3100 + s)[0]
        yield "benign", P.benign_scene(3200 + s)[0]
        yield "blank", P.blank_scene(3300 + s)[0]
        yield "tiny", tiny_scene(3400 + s)
    if scenes:
        from bench_pipeline import build_dataset

        data = work / f"scenes-{scenes}"
        if not (data / "truth.json").exists():
            build_dataset(data, scenes, per_shard=scenes, seed=3)
        for f in sorted((data / "jpg").glob("*.jpg")):
            yield "scene", cv2.imread(str(f))[:, :, ::-1]
    for f in sorted((ROOT.parent / "shared" / "data" / "faces").glob("*")):
        im = cv2.imread(str(f))
        if im is not None:
            yield "photo", im[:, :, ::-1]
    import skimage.data

    for name in ("page", "text", "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field"):
        try:
            im = getattr(skimage.data, name)()
        except Exception:  # noqa: BLE001 - an image this scikit-image does not ship offline
            continue
        if im.ndim == 2:
            im = np.stack([im] * 3, -1)
        yield "skimage", im[:, :, :3]


def covered(line, lines) -> bool:
    x0, y0, x1, y1 = line.box
    area = max(1.0, (x1 - x0) * (y1 - y0))
    for o in lines:
        iw = max(0.0, min(x1, o.box[2]) - max(x0, o.box[0]))
        ih = max(0.0, min(y1, o.box[3]) - max(y0, o.box[1]))
        if iw * ih >= 0.5 * area:
            return True
    return False


def places(scenes: int, work: Path, generated: int) -> None:
    """Every pre-scan place read alone: its peak probability against the lines in it."""
    import veil.transforms.ocr as ocr

    engine = ocr.OCREngine(prescan=ocr.DEFAULT_PRESCAN, prescan_peak=0.0)
    engine.setup()
    rows = []
    for kind, rgb in image_sets(scenes, work, generated):
        rgb = np.ascontiguousarray(rgb)
        height, width = rgb.shape[:2]
        if min(height, width) < 4 * ocr.DET_GRID:
            continue
        prob, scale_xy = ocr._det_probability(engine._prescan_session, rgb, engine.prescan)
        for (wx0, wy0, wx1, wy1), (x0, y0, x1, y1), peak in ocr.prescan_places(prob, scale_xy, width, height):
            lines = engine._read_native(rgb[wy0:wy1, wx0:wx1], wx0, wy0)
            # What the place itself holds: lines centred on it (the window's context may
            # reach a neighbouring place's text).
            own = [ln.text for ln in lines if x0 - 8 <= (ln.box[0] + ln.box[2]) / 2 <= x1 + 8
                   and y0 - 8 <= (ln.box[1] + ln.box[3]) / 2 <= y1 + 8]
            rows.append((kind, peak, own))
    words = [r for r in rows if any(sum(ch.isalnum() for ch in t) >= 3 for t in r[2])]
    print(f"places marked above {ocr.PRESCAN_THRESHOLD}: {len(rows)}; by set: "
          + ", ".join(f"{k} {sum(r[0] == k for r in rows)}" for k in dict.fromkeys(r[0] for r in rows)))
    for peak in (0.2, 0.3):
        below = [r for r in rows if r[1] < peak]
        print(f"peaking below {peak}: {len(below)}; what they hold: {[t for r in below for t in r[2]]}")
    print(f"places holding a line of 3+ letters or digits: {len(words)}; lowest peak among them: "
          f"{min((r[1] for r in words), default=float('nan')):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=None, help="pre-scan scale (default: the engine's)")
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--generated", type=int, default=25, help="images per generated set (sign, plate, ...)")
    ap.add_argument("--thresholds", default="0.1,0.2,0.3,0.5")
    ap.add_argument("--tiny-seeds", type=int, default=60)
    ap.add_argument("--work", default=str(ROOT / "bench-out" / "ocr-prescan"))
    ap.add_argument("--places", action="store_true", help="the per-place evidence for prescan_peak, then stop")
    args = ap.parse_args()
    import veil.transforms.ocr as ocr

    if args.places:
        places(args.scenes, Path(args.work), args.generated)
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    scale = ocr.DEFAULT_PRESCAN if args.scale is None else args.scale
    native = ocr.OCREngine(prescan=0)
    every = ocr.OCREngine(prescan=scale, prescan_peak=0.0)
    pre = ocr.OCREngine(prescan=scale)
    for engine in (native, every, pre):
        engine.setup()
    stats: dict[str, dict] = {}
    for kind, rgb in image_sets(args.scenes, work, args.generated):
        rgb = np.ascontiguousarray(rgb)
        t = time.process_time()
        whole = native.read(rgb)
        t_native = time.process_time() - t
        t = time.process_time()
        windowed_every = every.read(rgb)
        t_every = time.process_time() - t
        t = time.process_time()
        windowed = pre.read(rgb)
        t_pre = time.process_time() - t
        s = stats.setdefault(kind, {"images": 0, "native_ms": [], "every_place_ms": [], "prescan_ms": [],
                                    "lines": 0, "missed_every_place": [], "missed": []})
        s["images"] += 1
        s["native_ms"].append(1000 * t_native)
        s["every_place_ms"].append(1000 * t_every)
        s["prescan_ms"].append(1000 * t_pre)
        s["lines"] += len(whole)
        s["missed_every_place"] += [(ln.text, round(ln.score, 2), [int(v) for v in ln.box]) for ln in whole
                                    if not covered(ln, windowed_every)]
        s["missed"] += [(ln.text, round(ln.score, 2), [int(v) for v in ln.box]) for ln in whole
                        if not covered(ln, windowed)]
    print(f"pre-scan scale {scale}, threshold {ocr.PRESCAN_THRESHOLD}, peak {pre.prescan_peak}; CPU ms per image")
    print("| set | images | native median (mean) | every place median (mean) | peak rule median (mean) "
          "| lines read natively | missed, every place | missed, peak rule |")
    print("|---|---:|---:|---:|---:|---:|---|---|")

    def _ms(values: list[float]) -> str:
        return f"{np.median(values):.0f} ({np.mean(values):.0f})"

    for kind, s in stats.items():
        missed_every = ", ".join(f"'{t}' {sc}" for t, sc, _ in s["missed_every_place"]) or "0"
        missed = ", ".join(f"'{t}' {sc}" for t, sc, _ in s["missed"]) or "0"
        print(f"| {kind} | {s['images']} | {_ms(s['native_ms'])} | {_ms(s['every_place_ms'])} | "
              f"{_ms(s['prescan_ms'])} | {s['lines']} | {missed_every} | {missed} |")
    sensitivity = {}
    base = ocr.PRESCAN_THRESHOLD
    try:
        for thr in [float(v) for v in args.thresholds.split(",") if v]:
            ocr.PRESCAN_THRESHOLD = thr
            missed = []
            for seed in range(3400, 3400 + args.tiny_seeds):
                rgb = tiny_scene(seed)
                whole = native.read(rgb)
                missed += [ln.text for ln in whole if not covered(ln, pre.read(rgb))]
            sensitivity[thr] = missed
    finally:
        ocr.PRESCAN_THRESHOLD = base
    print(f"\nTiny-text lines missed by threshold ({args.tiny_seeds} scenes of 3 lines): "
          + "; ".join(f"{thr}: {len(m)} {m}" for thr, m in sensitivity.items()))
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "scale": scale,
                            "threshold": base, "sets": stats, "tiny_sensitivity": sensitivity}) + "\n")


if __name__ == "__main__":
    main()
