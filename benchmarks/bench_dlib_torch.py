"""CPU cost of dlib's ResNet face descriptor: the "dlib" backend (dlib-bin, no BLAS) against
the "torch" backend (the same network in PyTorch, veil.transforms.dlib_torch), one thread.

The chips are dlib's 150x150 face chips of the faces CenterFace finds in the test photos
(repeated to fill the batches). Each backend embeds them in batches of 1 and of 8 chips;
``--repeats`` rounds alternate the backends so that a machine shared with other jobs drifts
evenly. Printed per (backend, batch): the median CPU ms per face (time.process_time, all
threads of this process) and the largest descriptor difference between the backends. Also
printed: the CPU ms per face of the rest of ``embed_pair`` (5-point shape + 2 chips),
which both backends share.

    VEIL_MODELS=../shared/models python benchmarks/bench_dlib_torch.py --repeats 5

Results are printed as JSON and appended to bench-out/dlib_torch.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces"


def load_faces(faces_dir: Path) -> list[tuple[np.ndarray, dict]]:
    """(photo, face region) of each face CenterFace finds in the test photos."""
    from PIL import Image, ImageOps

    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    detector = build_detector(DetectConfig(), ModelRegistry())
    out = []
    for path in sorted(faces_dir.iterdir()):
        img = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
        img.thumbnail((640, 640))
        rgb = np.asarray(img)
        out += [(rgb, r.to_dict()) for r in detector.detect(rgb)]
    return out


def cpu_ms_per_face(fn, n_faces: int) -> float:
    start = time.process_time()
    fn()
    return 1000.0 * (time.process_time() - start) / n_faces


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faces-dir", type=Path, default=FACES)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--faces", type=int, default=16, help="chips per measurement")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # the benchmark's setting only; the recognizer never sets it
    from veil.transforms.recognizers import build_recognizer

    backends = {b: build_recognizer("dlib-resnet", backend=b) for b in ("dlib", "torch")}
    faces = load_faces(args.faces_dir)
    rec = backends["torch"]
    chips = [rec.chips(rgb, rec.shapes(rgb, [face]))[0] for rgb, face in faces]
    chips = (chips * (args.faces // len(chips) + 1))[: args.faces]

    for rec in backends.values():  # warm-up: first-call allocations, lazy init
        rec.embed_chips(chips[:8])
    reference = backends["dlib"].embed_chips(chips)
    max_diff = float(np.abs(backends["torch"].embed_chips(chips) - reference).max())

    times: dict[str, list[float]] = {}
    for round_ in range(args.repeats):
        order = list(backends.items())
        for name, rec in order if round_ % 2 == 0 else order[::-1]:
            for batch in (1, 8):

                def run(rec=rec, batch=batch) -> None:
                    for i in range(0, len(chips), batch):
                        rec.embed_chips(chips[i : i + batch])

                times.setdefault(f"{name}/batch{batch}", []).append(
                    cpu_ms_per_face(run, len(chips))
                )
        rgb, face = faces[0]

        def shape_and_chips(rec=backends["torch"], rgb=rgb, face=face) -> None:
            for _ in range(10):
                shapes = rec.shapes(rgb, [face])  # embed_pair: one shape, a chip per image
                for _ in range(2):
                    rec.chips(rgb, shapes)

        times.setdefault("shape+2chips", []).append(cpu_ms_per_face(shape_and_chips, 10))

    result = {
        "torch_threads": torch.get_num_threads(),
        "faces_found": len(faces),
        "chips": len(chips),
        "repeats": args.repeats,
        "median_cpu_ms_per_face": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "all_cpu_ms_per_face": {k: [round(x, 2) for x in v] for k, v in times.items()},
        "max_abs_descriptor_diff": max_diff,
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench-out"
    out.mkdir(exist_ok=True)
    with open(out / "dlib_torch.jsonl", "a") as f:
        f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **result}) + "\n")


if __name__ == "__main__":
    main()
