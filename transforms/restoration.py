"""The restoration attack: an attacker's attempts to undo an anonymizing perturbation.

FSAP's change is adversarial, and adversarial changes are often fragile: re-encoding,
smoothing or rescaling the released image can bring a face back under a recognizer's
threshold. Validation scores every synthesized face again after each restoration (the
attacker keeps the best), and FSAP and diffusion certify their faces against the same
restorations before release, so the two agree. numpy and Pillow only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["RESTORATIONS", "check_restoration", "restore"]

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
