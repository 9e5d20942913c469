"""Pseudo-identity consistency: does each real person become one synthetic person, and only one?

For a release made with ``--pseudo-identities`` every clustered face carries an opaque
``pseudo_id`` in its manifest region (``target.pseudo_id``). Measured under the run's
*certifying* recognizer (dlib ResNet by default), never the one FSAP optimised against, so a
pseudo-person has to exist for a model that was not fooled into seeing it:

``consistency_rate``   pairs of released faces with the same pseudo id that the certifier says
                       are one person (the structure "these photos show one person" survived);
``separation_rate``    pairs of released faces with different pseudo ids that it says are
                       different people (two people did not merge into one);
``real_match_rate``    released faces that match *any* original face of their own cluster
                       (the real person is still there: the privacy side; 0 is the goal);
``original_consistency_rate``  the same pairs on the originals, for scale: how consistent
                       the certifier finds the real people themselves.

Pairs of faces in one image are counted like any other pair. The measurement runs in the
validation driver over the clustered faces only (one certifier embedding per original and
released face) after the shard pass; without pseudo ids it measures nothing and its gates are
``not_evaluated`` (they are optional, see gates.yaml). Nothing here is written except the
rates and counts: no embedding.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS = ("consistency_rate", "separation_rate", "real_match_rate", "original_consistency_rate")
PREFIX = "pseudo"


def pseudo_faces(regions: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, Any], str]]:
    """(region index, region, pseudo id) of a manifest row's faces that have a pseudo id."""
    out = []
    for r, region in enumerate(regions):
        target = region.get("target")
        if isinstance(target, dict) and target.get("pseudo_id") and not region.get("redetected"):
            out.append((r, region, str(target["pseudo_id"])))
    return out


def pair_rates(labels: Sequence[str], released: np.ndarray, original: np.ndarray, *,
               metric: str, threshold: float) -> dict[str, Any]:
    """The rates of the module docstring from per-face labels and certifier embeddings."""
    labels = list(labels)
    n = len(labels)

    def matches(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        if metric == "euclidean":
            return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1) <= threshold
        na = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        nb = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return na @ nb.T >= threshold

    lab = np.array(labels, dtype=object)
    same = lab[:, None] == lab[None, :]
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    rel_rel = matches(released, released)
    org_org = matches(original, original)
    rel_org = matches(released, original)
    same_pairs, diff_pairs = same & upper, ~same & upper
    n_same, n_diff = int(same_pairs.sum()), int(diff_pairs.sum())
    return {
        "faces": n,
        "identities": len(set(labels)),
        "same_pairs": n_same,
        "different_pairs": n_diff,
        "consistency_rate": float(rel_rel[same_pairs].mean()) if n_same else None,
        "separation_rate": float((~rel_rel[diff_pairs]).mean()) if n_diff else None,
        "real_match_rate": float((rel_org & same).any(axis=1).mean()) if n else None,
        "original_consistency_rate": float(org_org[same_pairs].mean()) if n_same else None,
    }


def pseudo_identity_metrics(config: Any, veil_out: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat metrics ``pseudo.<rate>`` and details for a Veil output with pseudo ids; empty
    when the release has none (not a ``--pseudo-identities`` run, or not a Veil output)."""
    if veil_out is None or not any(pseudo_faces(r) for r in veil_out.regions.values()):
        return {}, {}
    from veil.transforms.imageio import decode_image
    from veil.transforms.models import ModelRegistry
    from veil.transforms.recognizers import build_recognizer
    from veil.validators.pairing import open_pairing

    info = json.loads(veil_out.root.read_bytes("run.json"))
    run_config = info.get("config") or {}
    section = "diffusion" if (run_config.get("anonymize") or {}).get("method") == "diffusion" else "fsap"
    certify = (run_config.get(section) or {}).get("certify") or ["dlib-resnet"]
    registry = ModelRegistry(paths=dict(config.models), models_dir=config.models_dir,
                             allow_download=config.allow_download)
    recognizer = build_recognizer(certify[0], registry)
    pairing, _ = open_pairing(config.original, config.anonymized, image_column=config.image_column,
                              folder_shard_size=config.folder_shard_size, max_member_bytes=config.max_bytes,
                              follow_symlinks=config.follow_symlinks)
    labels: list[str] = []
    released: list[np.ndarray] = []
    original: list[np.ndarray] = []
    skipped = 0
    for pair in pairing.plan():
        for key, orig, anon in pairing.read(pair):
            faces = pseudo_faces(veil_out.regions.get(key, []))
            if not faces or orig is None or anon is None or veil_out.statuses.get(key) not in ("anonymized", "clean"):
                continue
            try:
                rgb_o = decode_image(orig[orig["__image__"]], ext=orig["__image__"], max_pixels=config.max_pixels,
                                     max_bytes=config.max_bytes).rgb
                rgb_a = decode_image(anon[anon["__image__"]], ext=anon["__image__"], max_pixels=config.max_pixels,
                                     max_bytes=config.max_bytes).rgb
                emb_o, emb_a = recognizer.embed_pair(rgb_o, rgb_a, [region for _, region, _ in faces])
            except Exception as exc:  # noqa: BLE001 - measured faces only; the count says so
                log.warning("pseudo-identity consistency: %s skipped: %s", key, exc)
                skipped += len(faces)
                continue
            for (_, _, pid), eo, ea in zip(faces, emb_o, emb_a, strict=True):
                labels.append(pid)
                original.append(np.asarray(eo, np.float64))
                released.append(np.asarray(ea, np.float64))
    if not labels:
        return {}, {"pseudo_identities": {"faces": 0, "skipped": skipped}}
    rates = pair_rates(labels, np.stack(released), np.stack(original), metric=recognizer.metric,
                       threshold=recognizer.threshold)
    details = {**rates, "skipped": skipped, "recognizer": recognizer.name, "metric": recognizer.metric,
               "threshold": recognizer.threshold}
    metrics = {f"{PREFIX}.{name}": rates[name] for name in METRICS}
    return metrics, {"pseudo_identities": details}
