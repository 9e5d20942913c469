"""Age and identity along FSAP's path: when does the age reading move?

Each face of a WebDataset shard (the largest detected face per image) is optimised by FSAP
with the run's defaults, except that it never stops early (``tau`` -0.99), for each number
of iterations in ``--ladder``. Sign-gradient steps are deterministic, so each is the
first part of the next path. Each result is blended into the image as a release is, and
read by Cydral's age network (the ``age-mae`` gate's), dlib's ResNet (which certifies) and
FaceNet-MS-Celeb (which no method sees). No certification or re-optimisation round: this is
the plain path.

Prints one table row per face and iteration count and writes ``--plot`` (age change against
dlib distance, one line per face; dlib's 0.6 threshold and the release's 0.7 drawn), and a
summary: the mean absolute age change of the path points in three bands of dlib distance.

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap_path.py --input data/photos-0000.tar --ladder 1,3,6,12,24,40 --plot fsap_path.png
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from bench_age_judges import load_tar_images

#: dlib's same-person threshold, and the release's (plus ``fsap.certify_margin``).
DLIB_THRESHOLD, DLIB_RELEASE = 0.6, 0.7
#: dlib distance bands of the summary: still clearly the person, in between, released.
BANDS = ((0.0, 0.45), (0.45, DLIB_RELEASE), (DLIB_RELEASE, 2.0))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, type=Path, help="a WebDataset tar of images")
    ap.add_argument("--ladder", default="1,3,6,12,24,40", help="iteration counts, comma-separated")
    ap.add_argument("--plot", type=Path, help="write the figure here (PNG)")
    args = ap.parse_args(argv)
    ladder = sorted({int(n) for n in args.ladder.split(",") if n.strip()})
    if not ladder or ladder[0] < 0:
        ap.error("--ladder: non-negative iteration counts")

    from veil.config import AnonymizeConfig, DetectConfig, FSAPConfig
    from veil.transforms.attributes import AGE_MODEL, AgeNetwork
    from veil.transforms.detect import build_detector
    from veil.transforms.fsap import (
        FSAPStage,
        blend_change,
        certifier_verdict,
        extract_crop,
        face_box_in_crop,
        face_crop_matrix,
    )
    from veil.transforms.models import ModelRegistry
    from veil.transforms.recognizers import build_recognizer

    registry = ModelRegistry()
    detector = build_detector(DetectConfig(), registry)
    age = AgeNetwork(registry.resolve(AGE_MODEL))
    judges = {name: build_recognizer(name, registry) for name in ("dlib-resnet", "facenet-msceleb")}
    config = FSAPConfig(tau=-0.99)
    stage = FSAPStage(config, anonymize=AnonymizeConfig(), expand=0.2, seed=0, models={})
    stage.setup()
    print("| face | Cydral age, original | iterations | MobileFaceNet similarity | dlib distance | "
          "MS-Celeb similarity | age change (years) | CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    paths: dict[str, list[tuple[float, float]]] = {}
    for key, original in sorted(load_tar_images(args.input).items()):
        faces = detector.detect(original)
        if not faces:
            continue
        region = max(faces, key=lambda r: r.score).to_dict()
        matrix = face_crop_matrix(region, config.crop_size)
        crop = extract_crop(original, matrix, config.crop_size)[None]
        box = face_box_in_crop(region, matrix)
        age0 = float(age.ages(age.chips(original, [region]))[0])
        paths[key] = [(0.0, 0.0)]
        for n in ladder:
            start = time.process_time()
            result = stage._optimizer.optimise(crop, steps=n, boxes=[box])
            seconds = time.process_time() - start
            image = original.copy()
            blend_change(image, result.crops[0], matrix, stage._crop_mask)
            change = float(age.ages(age.chips(image, [region]))[0]) - age0
            scores = {}
            for name, judge in judges.items():
                e_o, e_a = judge.embed_pair(original, image, [region])
                scores[name] = certifier_verdict(judge, e_o[0], e_a[0])[0]
            paths[key].append((scores["dlib-resnet"], change))
            print(f"| {key} | {age0:.1f} | {n} | {result.faces[0].similarity:+.2f} | {scores['dlib-resnet']:.2f} "
                  f"| {scores['facenet-msceleb']:+.2f} | {change:+.1f} | {seconds:.0f} |", flush=True)

    print("\n| dlib distance | path points | mean / median absolute age change (years) |")
    print("|---|---:|---:|")
    for lo, hi in BANDS:
        changes = [abs(c) for pts in paths.values() for d, c in pts[1:] if lo <= d < hi]
        if changes:
            print(f"| {lo:.2f}-{hi:.2f} | {len(changes)} | {statistics.mean(changes):.1f} / "
                  f"{statistics.median(changes):.1f} |")

    if args.plot and paths:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key, pts in paths.items():
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=key)
        ax.axvline(DLIB_THRESHOLD, color="grey", ls=":", lw=1)
        ax.axvline(DLIB_RELEASE, color="grey", ls="--", lw=1)
        for y in (-8, 8):
            ax.axhline(y, color="red", ls=":", lw=0.8)
        ax.set_xlabel("dlib distance to the original (dotted: same-person threshold; dashed: released)")
        ax.set_ylabel("Cydral age change, years (red: +-8)")
        ax.set_title("FSAP's path: age reading against identity change", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)
        print(f"\nfigure: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
