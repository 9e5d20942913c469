"""Large images (issue 12, scope 2): small faces in 48 MP photos, time and peak memory.

Builds an 8000x6000 JPEG (a phone camera's 48 MP): an upscaled real photo without faces as the
background, real face photos (../shared/data/faces) pasted with faces of ~35 px (the user's
case) and larger ones (~120 px, ~600 px), one small face straddling a detection tile border.
Then measures, each in its own subprocess so peak RSS is clean:

  detect   Veil's DetectStage on the decoded image (default DetectConfig)
  run      ``veil run --runner local`` on a folder of 2 such images (decode, detect, blur,
           encode, re-scan, manifests)
  deface   the ``deface`` command line on the same file

and reports wall and CPU time, peak RSS (``/usr/bin/time -v`` "Maximum resident set size"; for the
in-process detect stage ``resource.getrusage``), which planted faces each tool found, and,
for ``run``, how much the released pixels in each planted face box changed.

    python benchmarks/bench_large_images.py                 # 8000x6000, all modes
    python benchmarks/bench_large_images.py --size 4000x3000 --modes detect,deface

Results are printed as JSON and appended to bench-out/large_images.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces"
PYTHON = sys.executable
BIN = Path(sys.executable).parent

#: Face boxes (x0, y0, x1, y1) in the original photos (tests/test_detect.py REF_BOXES).
REF_BOXES = {
    "astronaut.png": (181, 58, 269, 177),
    "grace_hopper.jpg": (173, 127, 358, 334),
    "obama.jpg": (374, 107, 602, 417),
    "biden.jpg": (431, 171, 698, 550),
}


def paste_face(canvas: np.ndarray, photo: str, face_px: float, centre: tuple[float, float]) -> list[float]:
    """Paste a head-and-shoulders crop of ``photo`` into ``canvas`` (in place) so its face box
    is ``face_px`` wide and centred at ``centre``; returns the face box in canvas pixels."""
    import cv2
    from PIL import Image

    rgb = np.asarray(Image.open(FACES / photo).convert("RGB"))
    x0, y0, x1, y1 = REF_BOXES[photo]
    k = face_px / (x1 - x0)
    # Crop 1.6 face widths around the face (hair, shoulders), clipped to the photo.
    w, h = (x1 - x0) * 1.6, (y1 - y0) * 1.6
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    c0, r0 = max(0, int(cx - w / 2)), max(0, int(cy - h / 2))
    c1, r1 = min(rgb.shape[1], int(cx + w / 2)), min(rgb.shape[0], int(cy + h / 2))
    crop = cv2.resize(rgb[r0:r1, c0:c1], None, fx=k, fy=k, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    ox = int(round(centre[0] - (cx - c0) * k))
    oy = int(round(centre[1] - (cy - r0) * k))
    ch, cw = crop.shape[:2]
    canvas[oy : oy + ch, ox : ox + cw] = crop
    return [ox + (x0 - c0) * k, oy + (y0 - r0) * k, ox + (x1 - c0) * k, oy + (y1 - r0) * k]


def make_large_image(width: int, height: int) -> tuple[np.ndarray, list[dict]]:
    """The benchmark image and its planted faces ({"photo", "face_px", "box"})."""
    import cv2
    import skimage.data

    background = cv2.resize(skimage.data.coffee(), (width, height), interpolation=cv2.INTER_CUBIC)
    # Sensor-like noise so the JPEG has the size and texture of a real 48 MP photo.
    rng = np.random.default_rng(0)
    canvas = np.clip(background.astype(np.int16) + rng.integers(-6, 7, background.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    del background
    sx, sy = width / 8000, height / 6000
    plan = [
        ("astronaut.png", 35, (1200, 1000)),
        ("grace_hopper.jpg", 35, (5200, 4300)),
        # Straddles two tile borders: at 8000x6000 the tiles (1920 x 1792 px, 384 px overlap
        # at least) start at x = 0, 1520, 3040, 4560, 6080 and y = 0, 1402, 2805, 4208.
        ("obama.jpg", 35, (3040, 1792)),
        ("biden.jpg", 120, (6800, 1500)),
        ("obama.jpg", 600, (3000, 4200)),
    ]
    faces = []
    for photo, px, (cx, cy) in plan:
        box = paste_face(canvas, photo, px * sx, (cx * sx, cy * sy))
        faces.append({"photo": photo, "face_px": round(px * sx), "box": [round(v, 1) for v in box]})
    return canvas, faces


def _covered(box: list[float], regions: list[list[float]]) -> bool:
    """True when some region covers at least half of the planted face box."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    for r in regions:
        ix = max(0.0, min(box[2], r[2]) - max(box[0], r[0]))
        iy = max(0.0, min(box[3], r[3]) - max(box[1], r[1]))
        if ix * iy >= 0.5 * area:
            return True
    return False


# ------------------------------------------------------------------------------ modes (child side)


def child_detect(image: Path) -> dict:
    """DetectStage on the decoded image, in this process; peak RSS from getrusage."""
    from veil.config import DetectConfig, ImageIOConfig
    from veil.transforms.detect import DetectStage
    from veil.transforms.imageio import decode_image

    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stage = DetectStage(DetectConfig(), models={})
    stage.setup()
    io_cfg = ImageIOConfig()
    data = image.read_bytes()
    t0 = time.perf_counter()
    decoded = decode_image(data, ext="jpg", max_pixels=io_cfg.max_pixels, max_bytes=io_cfg.max_bytes)
    t_decode = time.perf_counter() - t0
    rss_decoded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    sample = stage.process_sample({"__key__": "x", "__image__": "jpg", "_pixels": decoded.rgb})
    t_detect, c_detect = time.perf_counter() - t0, time.process_time() - c0
    return {
        "decode_s": round(t_decode, 2),
        "detect_s": round(t_detect, 2),
        "detect_cpu_s": round(c_detect, 2),
        "regions": [r["box"] for r in sample["regions"]],
        "scores": [round(r["score"], 3) for r in sample["regions"]],
        "peak_rss_mb_before_detect": round(rss_decoded / 1024),
        "peak_rss_mb_at_start": round(rss_start / 1024),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


# ------------------------------------------------------------------------------ parent side


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd under /usr/bin/time -v: wall time and the peak RSS of its largest process."""
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    # CPU seconds (user + sys) say more than wall time on a machine shared with other jobs.
    cpu = sum(float(v) for v in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
            "peak_rss_mb": round(int(match.group(1)) / 1024) if match else None, "stdout": proc.stdout}


def _changes(path: Path, original: np.ndarray, faces: list[dict]) -> list[float]:
    """Mean absolute pixel change inside each planted face box of an output image (JPEG
    re-encoding alone changes ~1-2 levels; an anonymized face tens)."""
    from PIL import Image

    released = np.asarray(Image.open(path).convert("RGB"))
    changes = []
    for f in faces:
        x0, y0, x1, y1 = (int(round(v)) for v in f["box"])
        diff = np.abs(released[y0:y1, x0:x1].astype(np.int16) - original[y0:y1, x0:x1].astype(np.int16))
        changes.append(round(float(diff.mean()), 1))
    return changes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="8000x6000")
    parser.add_argument("--modes", default="detect,run,deface")
    parser.add_argument("--child-detect", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_detect:
        print(json.dumps(child_detect(Path(args.child_detect))))
        return

    from PIL import Image

    width, height = (int(v) for v in args.size.lower().split("x"))
    work = Path(tempfile.mkdtemp(prefix="veil-large-"))
    rgb, faces = make_large_image(width, height)
    folder = work / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.fromarray(rgb).save(folder / name, quality=92)
    image = folder / "a.jpg"
    result: dict = {"size": args.size, "jpeg_mb": round(image.stat().st_size / 2**20, 1), "faces": faces}
    env = {**os.environ}
    env.setdefault("VEIL_MODELS", str(ROOT.parent / "shared" / "models"))
    env["PYTHONPATH"] = str(ROOT.parent) + os.pathsep + env.get("PYTHONPATH", "")
    modes = args.modes.split(",")

    if "detect" in modes:
        out = timed([PYTHON, __file__, "--child-detect", str(image)], env=env)
        det = json.loads(out["stdout"].strip().splitlines()[-1])
        det["process_peak_rss_mb"] = out["peak_rss_mb"]
        det["process_cpu_s"] = out["cpu_s"]
        det["found"] = [_covered(f["box"], det["regions"]) for f in faces]
        result["veil_detect"] = det
    if "run" in modes:
        out_dir = work / "out"
        cmd = [str(BIN / "veil"), "run", "--runner", "local", "--input", str(folder), "--output", str(out_dir),
               "--no-progress"]
        out = timed(cmd, env=env)
        changes = _changes(out_dir / "data" / "a.jpg", rgb, faces)
        result["veil_run"] = {"wall_s": out["wall_s"], "cpu_s": out["cpu_s"], "peak_rss_mb": out["peak_rss_mb"], "images": 2,
                              "mean_abs_change_in_face_box": changes}
    if "deface" in modes:
        out = timed([str(BIN / "deface"), str(image), "-o", str(work / "deface.jpg")], env=env)
        result["deface"] = {"wall_s": out["wall_s"], "cpu_s": out["cpu_s"], "peak_rss_mb": out["peak_rss_mb"],
                            "mean_abs_change_in_face_box": _changes(work / "deface.jpg", rgb, faces)}
    print(json.dumps(result, indent=1))
    (ROOT / "bench-out").mkdir(exist_ok=True)
    with open(ROOT / "bench-out" / "large_images.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
