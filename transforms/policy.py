"""A policy per personal-data class: each region kind anonymized by its class's method.

Faces are anonymized by the face stage (blur, pixelate, fill, DP-Pix, FSAP or diffusion:
``anonymize.method``); persons, plates and text regions, found after it by their own detector
stages, get their class's method from ``pii.policy`` (SpinML's levels: ``keep``, or obscure with
blur, pixelate or fill). A person's face keeps the face policy: the person's method is applied
around the face, never over it, so a person blurred around a synthesized face still shows the
synthesized face. :class:`PolicyAnonymizer` is also what the re-scan strengthens with, so a
residual plate found there gets the plate method at the next strength, a residual face the face
method.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.config import AnonymizeConfig, PIIConfig
from veil.transforms.anonymize import (
    Anonymizer,
    AnonymizeResult,
    expand_box,
    region_mask,
    sample_rng,
)
from veil.transforms.regions import is_face, kind_methods
from veil.transforms.stage import ANONYMIZED, Resources, Sample, SampleStage

#: How each non-face kind is drawn: a box mask (text lines and plates are rectangles, and a
#: person's silhouette fills its box), the growth of the detector's box per side, the feather.
KIND_GEOMETRY: dict[str, dict[str, float]] = {
    "person": {"expand": 0.05, "feather": 0.05},
    "plate": {"expand": 0.1, "feather": 0.0},
    "text": {"expand": 0.1, "feather": 0.0},
}
#: Region kinds painted in this order: persons first, so plates and text on a person are
#: obscured by their own method on top.
KIND_ORDER = ("person", "plate", "text")


def kind_config(kind: str, method: str, base: AnonymizeConfig) -> AnonymizeConfig:
    """The anonymizer settings of a non-face kind: its method with the run's blur, pixelate and
    fill settings, drawn as a box with the kind's feather."""
    return AnonymizeConfig(method=method, mask="box", feather=KIND_GEOMETRY[kind]["feather"],
                           blur_strength=base.blur_strength, pixel_blocks=base.pixel_blocks,
                           fill_color=base.fill_color)


class PolicyAnonymizer:
    """Anonymizes a list of regions of mixed kinds, each kind by its own method.

    ``methods``: kind -> method for the non-face kinds (``keep`` leaves the kind's regions as
    they are). ``face``: the anonymizer for face regions, or None where the face stage already
    replaced them (synthesis) and faces are not this anonymizer's work. ``face_expand``: how far
    faces reach, for keeping a person's face out of the person's method.
    """

    def __init__(self, methods: dict[str, str], base: AnonymizeConfig, *, face: Anonymizer | None,
                 face_expand: float) -> None:
        self.methods = dict(methods)
        self.face = face
        self.face_expand = float(face_expand)
        self.face_feather = float(base.feather)
        self._kinds = {kind: Anonymizer(kind_config(kind, method, base), expand=KIND_GEOMETRY[kind]["expand"])
                       for kind, method in self.methods.items() if method != "keep"}

    def anonymizes(self, region: dict[str, Any]) -> bool:
        """Whether this anonymizer changes ``region`` (a kept kind does not)."""
        if is_face(region):
            return self.face is not None
        return str(region.get("kind")) in self._kinds

    def apply(self, rgb: np.ndarray, regions: list[dict[str, Any]], *, rng: np.random.Generator,
              strength: int = 0, protect: list[dict[str, Any]] | None = None) -> AnonymizeResult:
        """Anonymize ``regions`` (any kinds) at ``strength``. ``protect``: faces already replaced
        by a synthesis method, kept out of persons like the faces in ``regions``."""
        height, width = rgb.shape[:2]
        out = rgb
        mask = np.zeros((height, width), dtype=np.float32)
        params: dict[str, Any] = {}
        epsilon = None
        faces = [r for r in regions if is_face(r)]
        shielded = faces + [r for r in (protect or []) if is_face(r)]
        keep_out = self._face_area(shielded, height, width) if shielded else None
        for kind in KIND_ORDER:
            anonymizer = self._kinds.get(kind)
            mine = [r for r in regions if r.get("kind") == kind]
            if anonymizer is None or not mine:
                continue
            result = anonymizer.apply(out, mine, rng=rng, strength=strength)
            kind_mask = result.mask
            pixels = result.pixels
            if kind == "person" and keep_out is not None:
                # The face inside a person keeps the face policy: restore it under the face area.
                pixels = _composite(pixels, out, keep_out)
                kind_mask = kind_mask * (1.0 - keep_out)
            out = pixels
            np.maximum(mask, kind_mask, out=mask)
            params[kind] = result.params
        if self.face is not None and faces:
            result = self.face.apply(out, faces, rng=rng, strength=strength)
            out = result.pixels
            np.maximum(mask, result.mask, out=mask)
            epsilon = result.epsilon
            face_params = result.params
        else:
            face_params = {}
        if out is rgb:
            out = rgb.copy()
        if params:
            face_params = {**face_params, "classes": params}
        return AnonymizeResult(out, mask, face_params, epsilon)

    def _face_area(self, faces: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
        area = np.zeros((height, width), dtype=np.float32)
        for region in faces:
            box = expand_box(region["box"], self.face_expand, width, height)
            if box[2] > box[0] and box[3] > box[1]:
                np.maximum(area, region_mask(height, width, box, shape="ellipse", feather=self.face_feather),
                           out=area)
        return area


def _composite(top: np.ndarray, under: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``top`` everywhere except where ``keep`` is 1, which shows ``under`` (blended between)."""
    k = keep[..., None]
    mixed = top.astype(np.float32) * (1.0 - k) + under.astype(np.float32) * k
    return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)


class PolicyStage(SampleStage):
    """Pipeline stage after the face anonymizer and the class detectors: anonymizes every
    non-face region by its class's method, around the faces, and merges its mask into the
    sample's. A sample with such a region changed becomes ``anonymized`` (its ``method`` stays
    the face method; ``params["classes"]`` records each kind's parameters); kept regions are
    marked ``policy: keep`` and left as they are."""

    name = "policy"
    resources = Resources(cpus=0.25)

    def __init__(self, pii: PIIConfig, anonymize: AnonymizeConfig, *, expand: float, seed: int,
                 batch_size: int = 16) -> None:
        self.methods = kind_methods(pii)
        self.anonymize = anonymize
        self.expand = expand
        self.seed = seed
        self.batch_size = batch_size
        self._policy = PolicyAnonymizer(self.methods, anonymize, face=None, face_expand=expand)

    def process_sample(self, sample: Sample) -> Sample:
        regions = list(sample.get("regions") or [])
        others = [r for r in regions if not is_face(r)]
        if not others:
            return sample
        for region in others:
            region["policy"] = self.methods.get(str(region.get("kind")), "keep")
        if not any(self._policy.anonymizes(r) for r in others):
            return sample
        result = self._policy.apply(sample["_pixels"], regions,
                                    rng=sample_rng(self.seed, f"{sample['__key__']}#policy"))
        previous = sample.get("_mask")
        sample["_pixels"] = result.pixels
        sample["_mask"] = result.mask if previous is None else np.maximum(previous, result.mask)
        sample["params"] = {**(sample.get("params") or {}), **result.params}
        sample["status"] = ANONYMIZED
        if not sample.get("method"):
            sample["method"] = self.anonymize.method
        return sample
