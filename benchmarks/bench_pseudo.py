"""Pseudo-identities: consistency, separation and re-identification under dlib, for plain FSAP
and FSAP with ``--pseudo-identities`` side by side, on the shared photos (four photos of one
person, one each of others), with a DCGAN pool.

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_pseudo.py --work /tmp/bench-pseudo

Labels are the true people (from the file names), not the run's clusters, so the plain FSAP
row is measured the same way. Rates as ``veil.validators.consistency.pair_rates``. CPU time is
this process's (``time.process_time``; the local runner runs everything in it), since wall
time on a shared machine says little.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PHOTOS = {"obama": "obama.jpg", "obama2": "obama2.jpg", "obama3": "obama3.jpg",
          "partial": "obama_partial_face.jpg", "biden": "biden.jpg", "hopper": "grace_hopper.jpg"}


def person(key: str) -> str:
    return "obama" if key.startswith("obama") or key == "partial" else key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True)
    parser.add_argument("--faces", default=str(ROOT.parent / "shared" / "data" / "faces"))
    parser.add_argument("--pool-count", type=int, default=48)
    parser.add_argument("--modes", default="fsap,pseudo")
    parser.add_argument("--keys", default=",".join(PHOTOS), help="which photos (keys of PHOTOS)")
    args = parser.parse_args()

    from helpers import face_photo, jpeg_bytes, write_tar

    from veil.config import RunConfig
    from veil.orchestrate import run
    from veil.transforms.imageio import decode_image
    from veil.transforms.models import ModelRegistry
    from veil.transforms.pool import build_pool
    from veil.transforms.recognizers import build_recognizer
    from veil.validators.consistency import pair_rates
    from veil.validators.pairing import read_veil_output

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "in").mkdir(parents=True)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    originals = {k: jpeg_bytes(face_photo(Path(args.faces), PHOTOS[k], max_side=480), quality=95) for k in keys}
    write_tar(work / "in" / "s-000.tar", [(k, {"jpg": originals[k]}) for k in keys])
    t0 = time.process_time()
    build_pool("dcgan-celeba32", args.pool_count, work / "pool", seed=0, registry=ModelRegistry(), batch_size=32)
    print(f"pool: {args.pool_count} faces, {time.process_time() - t0:.1f} s CPU", flush=True)
    dlib = build_recognizer("dlib-resnet", ModelRegistry())
    rows = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        out = work / f"out-{mode}"
        config = RunConfig(input=str(work / "in" / "s-000.tar"), output=str(out), runner="local", progress=False,
                           batch_size=2, anonymize={"method": "fsap"},
                           pseudo={"enabled": mode == "pseudo", "pool": str(work / "pool")})
        t0 = time.process_time()
        summary = run(config)
        cpu = time.process_time() - t0
        veil_out = read_veil_output(out)
        labels, emb_o, emb_a = [], [], []
        for key in keys:
            regions = [r for r in veil_out.regions.get(key, []) if (r.get("fsap") or {}).get("status") == "optimised"]
            if veil_out.statuses.get(key) != "anonymized" or not regions:
                continue
            rgb_o = decode_image(originals[key], ext="jpg", max_pixels=10**8, max_bytes=10**9).rgb
            rgb_a = decode_image(_member(out, key),
                                 ext="jpg", max_pixels=10**8, max_bytes=10**9).rgb
            o, a = dlib.embed_pair(rgb_o, rgb_a, regions[:1])
            labels.append(person(key))
            emb_o.append(o[0])
            emb_a.append(a[0])
        rates = pair_rates(labels, np.stack(emb_a), np.stack(emb_o), metric="euclidean", threshold=0.6)
        dist = np.linalg.norm(np.stack(emb_a)[:, None] - np.stack(emb_a)[None], axis=-1)
        lab = np.array(labels)
        same = (lab[:, None] == lab[None]) & np.triu(np.ones_like(dist, bool), 1)
        diff = (lab[:, None] != lab[None]) & np.triu(np.ones_like(dist, bool), 1)
        row = {"mode": mode, "counts": summary.counts, "cpu_s": round(cpu, 1),
               "same_person_dlib": [round(float(x), 3) for x in dist[same]],
               "different_people_dlib": [round(float(x), 3) for x in dist[diff]], **rates}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| mode | faces | consistency | separation | real match | same-person dlib distances | CPU s |")
    print("|---|---|---|---|---|---|---|")
    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        same = r["same_person_dlib"]
        span = f"{min(same):.2f}-{max(same):.2f}" if same else "-"
        print(f"| {r['mode']} | {r['faces']} | {rate(r['consistency_rate'])} | {rate(r['separation_rate'])} | "
              f"{rate(r['real_match_rate'])} | {span} | {r['cpu_s']} |")


def _member(out: Path, key: str) -> bytes:
    import tarfile

    with tarfile.open(out / "data" / "s-000.tar") as tar:
        return tar.extractfile(f"{key}.jpg").read()  # type: ignore[union-attr]


if __name__ == "__main__":
    main()
