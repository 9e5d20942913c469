"""The restoration attack: an attacker's attempts to undo an anonymizing perturbation.

FSAP's change is adversarial, and adversarial changes are often fragile: re-encoding,
smoothing or rescaling the released image can bring a face back under a recognizer's
threshold. Validation scores every synthesized face again after each restoration (the
attacker keeps the best), and FSAP and diffusion certify their faces against the same
restorations before release, so the two agree. numpy and Pillow only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["RESTORATIONS", "best_restoration", "check_restoration", "parse_restorations", "restore"]

#: An attacker's attempts to undo a perturbation before matching, applied to the whole
#: anonymized image: re-encoding (``jpeg-q<quality>``), Gaussian smoothing (``blur-<sigma>``)
#: and scaling down then up again (``rescale-<factor>``, bicubic) strip the fine detail an
#: adversarial change (FSAP) may consist of. A synthesis release must stay unrecognised after
#: each: on the FSAP benchmark blur sigma 2 brought one face of 31 back under dlib's threshold
#: (BENCHMARKS.md), while the same operations leave an untouched original recognised.
RESTORATIONS = ("jpeg-q50", "blur-1", "blur-2", "rescale-0.5", "rescale-0.25")


def check_restoration(attack: str) -> tuple[str, float]:
    """(kind, parameter) of a restoration name, or ValueError naming the accepted forms."""
    kind, _, arg = str(attack).partition("-")
    try:
        value = float(arg[1:] if kind == "jpeg" and arg.startswith("q") else arg)
    except ValueError:
        value = float("nan")
    ok = ((kind == "jpeg" and arg.startswith("q") and 1 <= value <= 100 and value == int(value))
          or (kind == "blur" and 0 < value <= 20)
          or (kind == "rescale" and 0 < value < 1))
    if not ok:
        raise ValueError(f"unknown restoration {attack!r}: use jpeg-q<1..100>, blur-<sigma 0..20> "
                         f"or rescale-<factor in (0, 1)>, e.g. {', '.join(RESTORATIONS)}")
    return kind, value


def parse_restorations(value: str | Sequence[str] | None) -> list[str]:
    """Restoration names from a list or a comma-separated string ("none" or empty: none), each
    checked by :func:`check_restoration`."""
    if isinstance(value, str):
        value = [] if value.strip().lower() == "none" else [v.strip() for v in value.split(",") if v.strip()]
    out = [str(v) for v in (value or [])]
    for attack in out:
        check_restoration(attack)
    return out


def restore(rgb: np.ndarray, attack: str) -> np.ndarray:
    """The RGB uint8 image ``rgb`` after restoration ``attack`` (same size)."""
    import io

    from PIL import Image, ImageFilter

    kind, value = check_restoration(attack)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if kind == "jpeg":
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=int(value))
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB"))
    if kind == "blur":
        return np.asarray(image.filter(ImageFilter.GaussianBlur(value)))
    small = image.resize((max(1, round(image.width * value)), max(1, round(image.height * value))),
                         Image.BICUBIC)
    return np.asarray(small.resize(image.size, Image.BICUBIC))


def best_restoration(recognizer: Any, original: np.ndarray, restored: Mapping[str, np.ndarray],
                     faces: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The attacker's best restoration per face: embed each face of ``original`` and of every
    restored image (at the original's geometry, ``recognizer.embed_pair``) and keep, per face,
    the restored embedding most like the original (highest cosine, or smallest distance for a
    Euclidean recognizer). Returns (original embeddings, best restored embeddings, their
    scores in the recognizer's metric, the restoration each came from)."""
    cosine = recognizer.metric == "cosine"
    e_orig = best_emb = best_score = None
    best_by: list[str] = []
    for attack, image in restored.items():
        e_o, e_r = recognizer.embed_pair(original, image, faces)
        e_o, e_r = np.asarray(e_o, np.float64), np.asarray(e_r, np.float64)
        if cosine:
            norms = np.maximum(np.linalg.norm(e_o, axis=1) * np.linalg.norm(e_r, axis=1), 1e-12)
            score = np.einsum("ij,ij->i", e_o, e_r) / norms
        else:
            score = np.linalg.norm(e_o - e_r, axis=1)
        if best_score is None:
            e_orig, best_emb, best_score, best_by = e_o, e_r.copy(), score.copy(), [attack] * len(score)
            continue
        for j in np.flatnonzero(score > best_score if cosine else score < best_score):
            best_emb[j], best_score[j], best_by[j] = e_r[j], score[j], attack
    if best_score is None:
        raise ValueError("best_restoration needs at least one restored image")
    return e_orig, best_emb, best_score, best_by
