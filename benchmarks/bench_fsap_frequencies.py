"""Where in a released face's change do identity, colour and age sit: coarse or fine?

For each released Veil output, faces are detected on the original images (the default
detector, score >= 0.5, as validation does). The change a release made to the image,
``released - original``, is split by a Gaussian of sigma ``f`` times the face box's width into
its low-pass part (tone, lighting, skin colour) and the rest (structure: edges, wrinkles, the
shapes of eyes, nose and mouth). The original plus only one part is then judged like the
release itself:

* identity: cosine similarity to the original under MobileFaceNet and FaceNet-MS-Celeb (the
  latter when its file resolves), Euclidean distance under dlib's ResNet (same person <= 0.6);
* colour: the face centre's CIE76 colour shift (validation's ``face.color_shift_mean``);
* age: the absolute change of Cydral's age reading (the network of the ``age-mae`` gate).

Usage::

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap_frequencies.py \\
        --original data/photos-0000.tar --released out/photos-fsap [--sigmas 0.04,0.08,0.15]

Prints a markdown table with one row per part: means over faces.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from bench_age_judges import load_tar_images

RECOGNIZERS = ("mobilefacenet", "dlib-resnet", "facenet-msceleb")


def split_change(original: np.ndarray, released: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(original + low-pass of the change, original + the rest), both uint8."""
    import cv2

    change = released.astype(np.float32) - original.astype(np.float32)
    low = cv2.GaussianBlur(change, (0, 0), sigma)

    def image(part: np.ndarray) -> np.ndarray:
        return np.clip(original.astype(np.float32) + part, 0, 255).round().astype(np.uint8)

    return image(low), image(change - low)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="original WebDataset tar")
    parser.add_argument("--released", required=True, type=Path, help="a Veil output folder (its data/*.tar)")
    parser.add_argument("--sigmas", default="0.04,0.08,0.15",
                        help="Gaussian sigmas as fractions of the face box width, comma-separated")
    args = parser.parse_args(argv)
    sigmas = [float(s) for s in args.sigmas.split(",") if s.strip()]

    from veil.config import DetectConfig
    from veil.transforms.attributes import AGE_MODEL, AgeNetwork
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelNotFoundError, ModelRegistry
    from veil.transforms.recognizers import build_recognizer
    from veil.validators.quality import color_shift

    registry = ModelRegistry()
    detector = build_detector(DetectConfig(), registry)
    age = AgeNetwork(registry.resolve(AGE_MODEL))
    recognizers = {}
    for name in RECOGNIZERS:
        try:
            recognizers[name] = build_recognizer(name, registry)
        except ModelNotFoundError as exc:
            print(f"{name}: not available ({exc}); left out", file=sys.stderr)
    originals = load_tar_images(args.original)
    released: dict[str, np.ndarray] = {}
    for tar in sorted(args.released.glob("data/*.tar")):
        released.update(load_tar_images(tar))
    if not released:
        raise SystemExit(f"no released images under {args.released}/data/*.tar")

    parts = ["as released"] + [f"{kind}, sigma {s:g}" for s in sigmas for kind in ("low-pass part", "the rest")]
    rows: dict[str, list[list[float]]] = {p: [] for p in parts}
    for key, original in sorted(originals.items()):
        if key not in released:
            continue
        regions = [r.to_dict() for r in detector.detect(original) if r.score >= 0.5]
        if not regions:
            continue
        variants = {"as released": released[key]}
        for s in sigmas:
            for region in regions:
                # One split per face: sigma follows that face's size.
                width = region["box"][2] - region["box"][0]
                low, rest = split_change(original, released[key], s * width)
                variants.setdefault(f"low-pass part, sigma {s:g}", []).append(low)
                variants.setdefault(f"the rest, sigma {s:g}", []).append(rest)
        for part in parts:
            images = variants[part] if isinstance(variants[part], list) else [variants[part]] * len(regions)
            for region, image in zip(regions, images, strict=True):
                x0, y0, x1, y1 = (int(round(v)) for v in region["box"])
                x0, y0 = max(0, x0), max(0, y0)
                row = []
                for name, rec in recognizers.items():
                    e0, e1 = rec.embed_pair(original, image, [region])
                    if name == "dlib-resnet":
                        row.append(float(np.linalg.norm(e0[0] - e1[0])))
                    else:
                        row.append(float(e0[0] @ e1[0] / (np.linalg.norm(e0[0]) * np.linalg.norm(e1[0]))))
                row.append(color_shift(original[y0:y1, x0:x1], image[y0:y1, x0:x1])[0])
                ages = age.ages(age.chips(original, [region]) + age.chips(image, [region]))
                row.append(abs(float(ages[1] - ages[0])))
                rows[part].append(row)

    names = list(recognizers)
    header = ["part of the change", "faces",
              *(f"{n} {'distance' if n == 'dlib-resnet' else 'similarity'}" for n in names),
              "colour shift (CIE76)", "Cydral age change (years)"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for part, values in rows.items():
        v = np.asarray(values)
        print("| " + " | ".join([part, str(len(v)), *(f"{m:.2f}" for m in v.mean(0))]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
