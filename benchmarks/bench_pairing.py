"""Pairing cost against pool size: build a pool, embed real faces, index, query.

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_pairing.py \
        --real-count 1000 --sizes 1000,10000,100000 --queries 1000 --work /tmp/bench-pairing

What is measured (CPU seconds of this process, ``time.process_time``, with torch and faiss on
one thread each, so the figures do not depend on what else shares the machine):

1. **Pool build**: ``build_pool("dcgan-celeba32", real_count)`` end to end (generate, upsample,
   detect, align, MobileFaceNet, attribute models, PNG, Parquet); per kept face and the
   rejection rate. Skipped when the pool folder already exists (then loaded).
2. **Embed per real face**: MobileFaceNet identity + attribute features of the faces CenterFace
   finds in the shared photos (what ``PairStage`` adds per face), repeated ``--repeat`` times.
3. **Index and query** per pool size: the real pool's vectors when the size is at most the
   real pool, else the real vectors resampled with replacement plus N(0, 0.05^2) jitter per
   coordinate (and the identity vectors likewise, renormalised) — cost depends on the size
   and dimension, not on where the vectors came from. Queries are the real photo faces'
   vectors resampled and jittered the same way. Both the exact (flat) index and the IVF
   index; the IVF's agreement with the exact answer is printed as recall@1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> float:
    return time.process_time()


def resample(rng: np.random.Generator, attrs: np.ndarray, ids: np.ndarray, n: int
             ) -> tuple[np.ndarray, np.ndarray]:
    pick = rng.integers(0, len(attrs), n)
    a = attrs[pick] + rng.normal(0.0, 0.05, (n, attrs.shape[1]))
    i = ids[pick] + rng.normal(0.0, 0.05, (n, ids.shape[1]))
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    return a.astype(np.float32), i.astype(np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real-count", type=int, default=1000)
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threshold", type=float, default=0.2)
    p.add_argument("--work", default="/tmp/bench-pairing")
    args = p.parse_args()

    import faiss
    import torch

    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry
    from veil.transforms.pairing import PairIndex
    from veil.transforms.pool import (
        AttributeFeatureModels,
        SyntheticPool,
        arcface_crop,
        build_pool,
    )
    from veil.transforms.recognizers import MobileFaceNetRecognizer

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import face_photo  # noqa: E402 - the tests' photo loader

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    registry = ModelRegistry()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    pool_dir = work / f"dcgan-{args.real_count}"

    # 1. Pool build
    if pool_dir.exists():
        pool = SyntheticPool.load(pool_dir)
        print(f"pool: loaded {pool_dir} ({len(pool)} faces; build not re-measured)")
        build_per_face = pool.meta.get("seconds", float("nan")) / len(pool)
        build_note = "wall, from pool.json"
    else:
        start = cpu()
        pool = build_pool("dcgan-celeba32", args.real_count, pool_dir, seed=0, registry=registry,
                          batch_size=64)
        build_per_face = (cpu() - start) / len(pool)
        build_note = "CPU"
    print(f"pool build: {len(pool)} faces, {build_per_face * 1000:.1f} ms {build_note} per kept "
          f"face, rejection rate {pool.meta['rejection_rate']:.1%} "
          f"({pool.meta['attempts']} generated)")

    # 2. Embed per real face
    faces_dir = ROOT.parent / "shared" / "data" / "faces"
    detector = build_detector(DetectConfig(), registry)
    recognizer = MobileFaceNetRecognizer.from_registry(registry)
    attributes = AttributeFeatureModels.from_registry(registry)
    items = []
    for photo in sorted(faces_dir.iterdir()):
        rgb = face_photo(faces_dir, photo.name)
        items += [(rgb, r.to_dict()) for r in detector.detect(rgb)]
    recognizer.embed([arcface_crop(rgb, r) for rgb, r in items])  # warm-up
    start = cpu()
    for _ in range(args.repeat):
        real_ids = recognizer.embed([arcface_crop(rgb, r) for rgb, r in items])
    id_ms = (cpu() - start) / (args.repeat * len(items)) * 1000
    start = cpu()
    for _ in range(args.repeat):
        real_attrs = attributes.features_of(items)
    attr_ms = (cpu() - start) / (args.repeat * len(items)) * 1000
    print(f"embed per real face ({len(items)} faces in {faces_dir.name}/, x{args.repeat}): "
          f"identity {id_ms:.1f} ms + attributes {attr_ms:.1f} ms = {id_ms + attr_ms:.1f} ms CPU")

    # 3. Index and query per pool size
    rng = np.random.default_rng(0)
    q_attr, q_id = resample(rng, real_attrs, real_ids, args.queries)
    print(f"\n{'pool size':>10} {'vectors':>10} {'index':>6} {'build s':>8} "
          f"{'query ms/face':>14} {'recall@1':>9} {'dist ratio':>10} {'mean id sim':>12}")
    for size in (int(s) for s in args.sizes.split(",")):
        if size <= len(pool):
            attrs, ids, origin = pool.attributes[:size], pool.identity[:size], "real"
        else:
            attrs, ids = resample(rng, pool.attributes, pool.identity, size)
            origin = "resampled"
        sized = _VectorPool(attrs, ids)
        exact_pairs = None
        for kind in ("exact", "ivf"):
            start = cpu()
            exact_below = size if kind == "exact" else 0
            index = PairIndex(sized, exact_below=exact_below)  # type: ignore[arg-type]
            build_s = cpu() - start
            start = cpu()
            pairs = index.query(q_attr, q_id, k=32, max_identity_similarity=args.threshold)
            query_ms = (cpu() - start) / len(q_attr) * 1000
            if kind == "exact":
                exact_pairs = pairs
                recall = ratio = "-"
            else:
                both = [(a, b) for a, b in zip(pairs, exact_pairs, strict=True)
                        if a is not None and b is not None]
                recall = f"{np.mean([a.pool_index == b.pool_index for a, b in both]):.3f}"
                # How much farther the approximate partner is than the exact one (1 = as near).
                ratios = [a.attribute_distance / max(b.attribute_distance, 1e-9) for a, b in both]
                ratio = f"{np.mean(ratios):.3f}"
            sims = np.mean([p.identity_similarity for p in pairs if p is not None])
            print(f"{size:>10} {origin:>10} {kind:>6} {build_s:>8.3f} {query_ms:>14.3f} "
                  f"{recall:>9} {ratio:>10} {sims:>12.3f}")
    return 0


class _VectorPool:
    """Just what PairIndex reads from a pool: vectors and ids."""

    def __init__(self, attributes: np.ndarray, identity: np.ndarray) -> None:
        self.attributes = attributes
        self.identity = identity
        self.ids = [f"v{i}" for i in range(len(attributes))]
        self.path = "<vectors>"

    def __len__(self) -> int:
        return len(self.ids)


if __name__ == "__main__":
    sys.exit(main())
