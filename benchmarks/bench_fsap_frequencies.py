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
    from veil.transforms.fsap import certifier_verdict
    from veil.transforms.models import ModelNotFoundError, ModelRegistry
    from veil.transforms.recognizers import build_recognizer
    from veil.validators.quality import color_shift, face_crop

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
        for region in (r.to_dict() for r in detector.detect(original) if r.score >= 0.5):
            # One split per face: sigma follows that face's size.
            width = region["box"][2] - region["box"][0]
            images = [released[key]]
            for s in sigmas:
                images.extend(split_change(original, released[key], s * width))
            crop_o = face_crop(original, region["box"])
            age_o = float(age.ages(age.chips(original, [region]))[0])
            for part, image in zip(parts, images, strict=True):
                row = []
                for rec in recognizers.values():
                    e_o, e_a = rec.embed_pair(original, image, [region])
                    row.append(certifier_verdict(rec, e_o[0], e_a[0])[0])
                row.append(color_shift(crop_o, face_crop(image, region["box"]))[0])
                row.append(abs(float(age.ages(age.chips(image, [region]))[0]) - age_o))
                rows[part].append(row)

    header = ["part of the change", "faces",
              *(f"{n} {'distance' if rec.metric == 'euclidean' else 'similarity'}" for n, rec in recognizers.items()),
              "colour shift (CIE76)", "Cydral age change (years)"]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for part, values in rows.items():
        v = np.asarray(values)
        print("| " + " | ".join([part, str(len(v)), *(f"{m:.2f}" for m in v.mean(0))]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
