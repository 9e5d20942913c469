"""How much does the age network of the ``age-mae`` gate move under ordinary image changes?

The synthesis gates bound the mean absolute difference of predicted age between an original
face and its anonymized version (``age-mae``, 8 years). This measures the predictor's own
noise floor: on each shared photo (``../shared/data/faces``) the largest face the default
detector finds is scored on the original and on mild, identity-free changes of the whole
image (JPEG re-encoding, a slight blur, a 2-pixel shift, a brightness offset), always at the
original's face box and landmarks, as validation does. Prints one row per photo and the MAE
and maximum per change.

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_age_noise.py
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(sigma)))


CHANGES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "JPEG q90": lambda rgb: _jpeg(rgb, 90),
    "JPEG q75": lambda rgb: _jpeg(rgb, 75),
    "JPEG q50": lambda rgb: _jpeg(rgb, 50),
    "Gaussian blur sigma 0.7": lambda rgb: _blur(rgb, 0.7),
    "Gaussian blur sigma 1.5": lambda rgb: _blur(rgb, 1.5),
    "shift by 2 px": lambda rgb: np.roll(rgb, 2, axis=1),
    "brightness +8": lambda rgb: np.clip(rgb.astype(np.int16) + 8, 0, 255).astype(np.uint8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", default=str(ROOT.parent / "shared" / "data" / "faces"))
    args = ap.parse_args()

    from veil.config import DetectConfig
    from veil.transforms.attributes import AttributeModels
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    registry = ModelRegistry()
    ages = AttributeModels.from_registry(registry, names=("age",))
    if "age" not in ages.available:
        raise SystemExit(f"the age model is not available: {ages.unavailable.get('age')}")
    detector = build_detector(DetectConfig(), registry)
    errors: dict[str, list[float]] = {name: [] for name in CHANGES}
    print("photo", "original", *CHANGES, sep=" | ")
    for path in sorted(Path(args.faces).iterdir()):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        rgb = np.asarray(Image.open(path).convert("RGB"))
        found = detector.detect(rgb)
        if not found:
            print(f"{path.name}: no face found, skipped")
            continue
        best = max(found, key=lambda r: (r.box[2] - r.box[0]) * (r.box[3] - r.box[1]))
        face = {"box": [float(v) for v in best.box],
                "landmarks": None if best.landmarks is None else np.asarray(best.landmarks).tolist()}
        base = ages.predict(rgb, [face])[0]["age"]
        row = [path.name, f"{base:.1f}"]
        for name, change in CHANGES.items():
            age = ages.predict(np.ascontiguousarray(change(rgb)), [face])[0]["age"]
            errors[name].append(abs(age - base))
            row.append(f"{age:.1f}")
        print(*row, sep=" | ")
    print("\n| change | age MAE, years | max | faces |\n|---|---:|---:|---:|")
    for name, err in errors.items():
        if err:
            print(f"| {name} | {np.mean(err):.2f} | {np.max(err):.2f} | {len(err)} |")


if __name__ == "__main__":
    main()
