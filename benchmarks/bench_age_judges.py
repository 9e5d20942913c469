"""Two age networks judge the same releases: is an age change one network's reading, or robust?

For each released Veil output directory, faces are detected on the original images (the
default detector, score >= 0.5, as validation does) and their ages read on the original and
the released image at the same place by

* Cydral's dlib age predictor, the network of validation's ``age-mae`` gate, on its dlib chip,
  on the pixels as released and after benign changes applied to *both* images (Gaussian blur,
  JPEG q75, down- and up-scaling x0.5): a change that survives them is in the face's coarse
  structure, not a fragile pixel pattern;
* yu4u's WideResNet (IMDB-WIKI; the network of FSAP's optional age term ``fsap.weight_age``) on
  its own crop (the box grown by 40 % each side, square, 64x64 BGR).

Usage::

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_age_judges.py \\
        --original data/photos-0000.tar --released fsap=out/photos-fsap --released blur=out/photos-blur

Prints a markdown table: mean absolute age change per judge, and the correlation of the two
networks' per-face changes.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def load_tar_images(path: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    out = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                data = tar.extractfile(member).read()
                out[member.name.rsplit(".", 1)[0]] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    return out


def benign_changes() -> dict[str, object]:
    import cv2

    def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
        ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]

    def rescale(rgb: np.ndarray, factor: float) -> np.ndarray:
        small = cv2.resize(rgb, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        return cv2.resize(small, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)

    return {
        "as released": lambda x: x,
        "blur 0.7": lambda x: cv2.GaussianBlur(x, (0, 0), 0.7),
        "blur 1.5": lambda x: cv2.GaussianBlur(x, (0, 0), 1.5),
        "JPEG q75": lambda x: jpeg(x, 75),
        "x0.5 and back": lambda x: rescale(x, 0.5),
    }


def wrn_crop(rgb: np.ndarray, box, margin: float) -> np.ndarray:
    """yu4u's crop, square: the box grown by ``margin`` of its larger side each side."""
    import cv2

    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    scale = 64 / side
    m = np.array([[scale, 0, 32 - scale * (x0 + x1) / 2], [0, scale, 32 - scale * (y0 + y1) / 2]])
    crop = cv2.warpAffine(rgb, m, (64, 64), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
    return crop[:, :, ::-1].astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", required=True, type=Path, help="original WebDataset tar")
    parser.add_argument("--released", required=True, action="append",
                        help="NAME=DIR of a Veil output (its data/*.tar); repeat for several")
    args = parser.parse_args(argv)

    import torch

    from veil.config import DetectConfig
    from veil.transforms.attributes import AGE_MODEL, AgeNetwork
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry
    from veil.transforms.wide_resnet import (
        WIDE_RESNET_AGE_MODEL,
        WIDE_RESNET_MARGIN,
        expected_age,
        load_wide_resnet,
    )

    torch.set_num_threads(1)  # as one validation worker
    registry = ModelRegistry()
    detector = build_detector(DetectConfig(), registry)
    cydral = AgeNetwork(registry.resolve(AGE_MODEL))
    wrn = load_wide_resnet(registry.resolve(WIDE_RESNET_AGE_MODEL))
    changes = benign_changes()
    originals = load_tar_images(args.original)
    faces = {key: [r.to_dict() for r in detector.detect(rgb) if r.score >= 0.5] for key, rgb in originals.items()}

    timing = {"seconds": 0.0, "crops": 0}

    def wrn_ages(rgb: np.ndarray, regions: list[dict]) -> np.ndarray:
        x = torch.from_numpy(np.stack([wrn_crop(rgb, r["box"], WIDE_RESNET_MARGIN) for r in regions]))
        start = time.perf_counter()
        with torch.no_grad():
            ages = expected_age(wrn(x.permute(0, 3, 1, 2).contiguous())[1]).numpy()
        timing["seconds"] += time.perf_counter() - start
        timing["crops"] += len(regions)
        return ages

    header = ["release", "faces", *(f"Cydral, {name}" for name in changes), "WideResNet", "corr of changes"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for spec in args.released:
        name, _, folder = spec.partition("=")
        released: dict[str, np.ndarray] = {}
        for tar in sorted(Path(folder).glob("data/*.tar")):
            released.update(load_tar_images(tar))
        per_change: dict[str, list[float]] = {c: [] for c in changes}
        cydral_signed: list[float] = []
        wrn_signed: list[float] = []
        for key, regions in sorted(faces.items()):
            if not regions or key not in released:
                continue
            for change, fn in changes.items():
                a0 = cydral.ages(cydral.chips(fn(originals[key]), regions))
                a1 = cydral.ages(cydral.chips(fn(released[key]), regions))
                per_change[change] += list(np.abs(a1 - a0))
                if change == "as released":
                    cydral_signed += list(a1 - a0)
            wrn_signed += list(wrn_ages(released[key], regions) - wrn_ages(originals[key], regions))
        n = len(wrn_signed)
        corr = float(np.corrcoef(cydral_signed, wrn_signed)[0, 1]) if n > 2 else float("nan")
        cells = [name, str(n), *(f"{np.mean(v):.1f}" for v in per_change.values()),
                 f"{np.mean(np.abs(wrn_signed)):.1f}", f"{corr:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print(f"\nWideResNet forward pass, one thread: {1000 * timing['seconds'] / max(1, timing['crops']):.0f} ms "
          f"per face crop ({timing['crops']} crops, batched per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
