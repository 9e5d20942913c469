"""Re-scan: look for faces in what would be released, and never release one.

The re-scan decodes the *encoded output bytes* (what a reader of the release will see), runs
the same detectors again, and when a face is still found either re-anonymizes more strongly
(regions found by the re-scan are added to the original ones) or quarantines the sample. After
``max_rounds`` strengthening rounds a sample that still shows a face is quarantined: it fails
closed.

Where it searches (``rescan.scope``). The first pass already searched the whole original with
the same detect configuration and found no face outside its regions; outside the pixels
anonymization changed, the release differs from that original only by JPEG re-encoding. So by
default ("changed") the coarsest pyramid level still searches the whole released image, and
the finer levels, which cost most, search only crops around the changed pixels with
``rescan.context`` network pixels of margin. The margin is set by evidence
(benchmarks/bench_stage_cost.py): CenterFace reacts to context, and narrower margins missed
borderline faces the whole-image scan found. Anything the first pass cannot vouch for (regions
not from the detect stage, other detect settings, synthesis, method "none", clean samples
re-scanned on request) is searched whole, as is everything with scope "full".

Synthesis methods (FSAP) *keep* faces detectable on purpose, so for them the question is not
"is there a face?" but "is it still the same person?":

* a face found where FSAP replaced an identity is expected; the certifying recognizer(s)
  (dlib's ResNet by default, never the recognizer FSAP optimised against) compare it, in the
  encoded output, with the original face at the same place, and a match quarantines the
  sample (FSAP already re-optimised such faces more strongly before encoding);
* any other face found (one the detector missed, or a small face FSAP obscured with its
  fallback) is strengthened with the fallback method as for obscuring methods, then
  quarantined if it is still there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from veil.config import (
    SYNTHESIS_METHODS,
    AnonymizeConfig,
    DetectConfig,
    DiffusionConfig,
    FSAPConfig,
    ImageIOConfig,
    PIIConfig,
    RescanConfig,
)
from veil.transforms.regions import RegionDetector, kind_methods
from veil.transforms.stage import ANONYMIZED, CLEAN, Resources, Sample, SampleStage, quarantine


class RescanStage(SampleStage):
    name = "rescan"
    stateful = True
    resources = Resources(cpus=0.5)

    def __init__(
        self,
        *,
        rescan: RescanConfig,
        detect: DetectConfig,
        anonymize: AnonymizeConfig,
        io: ImageIOConfig,
        models: dict[str, Any],
        seed: int,
        batch_size: int = 16,
        fsap: FSAPConfig | DiffusionConfig | None = None,
        pii: PIIConfig | None = None,
        detectors: list[RegionDetector] | None = None,
    ) -> None:
        self.rescan = rescan
        self.fsap = fsap if fsap is not None else FSAPConfig()
        self.synthesis = anonymize.method in SYNTHESIS_METHODS
        self.detect = detect
        self.anonymize = anonymize
        self.io = io
        self.models = models
        self.seed = seed
        self.batch_size = batch_size
        #: Personal-data classes besides faces: their detectors look again at the released
        #: pixels (a class whose policy is ``keep`` is not re-scanned).
        self.pii = pii if pii is not None else PIIConfig(classes=["faces"])
        self.methods = kind_methods(self.pii)
        self.detectors = [d for d in (detectors or []) if self.methods.get(d.kind, "keep") != "keep"]
        self.faces = "faces" in self.pii.classes
        self._detector = None
        self._anonymizer = None
        self._certifiers: list[Any] = []

    def setup(self) -> None:
        from veil.transforms.anonymize import Anonymizer
        from veil.transforms.detect import build_detector
        from veil.transforms.models import ModelRegistry

        registry = ModelRegistry(**self.models)
        self._detector = build_detector(self.detect, registry) if self.faces else None
        for detector in self.detectors:
            detector.setup()
        if self.synthesis:
            from veil.transforms.fsap import fallback_anonymizer
            from veil.transforms.recognizers import build_recognizer

            # Faces the synthesis left or missed are obscured with its fallback method.
            self._anonymizer = fallback_anonymizer(self.anonymize, self.fsap, expand=self.detect.expand)
            self._certifiers = [build_recognizer(name, registry) for name in self.fsap.certify]
        else:
            self._anonymizer = Anonymizer(self.anonymize, expand=self.detect.expand)

    def __getstate__(self) -> dict[str, Any]:
        # Models are per worker: never ship a loaded detector with the stage object.
        state = self.__dict__.copy()
        state["_detector"] = None
        state["_anonymizer"] = None
        state["_certifiers"] = []
        return state

    def process_sample(self, sample: Sample) -> Sample:
        if not self.rescan.enabled:
            return sample
        status = sample.get("status")
        if status == CLEAN and not self.rescan.include_clean:
            sample["rescan_rounds"] = 0
            return sample
        if status not in (ANONYMIZED, CLEAN):
            return sample
        if self._anonymizer is None:
            self.setup()

        from veil.transforms.anonymize import sample_rng
        from veil.transforms.imageio import decode_image, encode_image, sha256_hex
        from veil.transforms.policy import PolicyAnonymizer

        field = sample["__image__"]
        regions = list(sample.get("regions") or [])
        for round_ in range(self.rescan.max_rounds + 1):
            released = decode_image(
                sample[field], ext=field, max_pixels=self.io.max_pixels, max_bytes=self.io.max_bytes
            )
            found = []
            if self._detector is not None:
                areas = self._search_areas(sample, regions)
                if areas is None:
                    detections = self._detector.detect(released.rgb)
                else:
                    detections = self._detector.detect_near(
                        released.rgb, areas, margin=self.rescan.context
                    )
                found = [r.to_dict() for r in detections]
            if self.synthesis:
                replaced = [r["box"] for r in regions if _is_synthesized(r)]
                found = [r for r in found if not any(_overlaps(r["box"], box) for box in replaced)]
            for detector in self._class_scans(regions):
                for region in detector.residual(released.rgb, sample, regions):
                    region["kind"] = detector.kind
                    found.append(region)
            if not found:
                sample["rescan_rounds"] = round_
                if self.synthesis:
                    return self._certify(sample, released.rgb, regions)
                return sample
            if self.rescan.policy == "quarantine" or round_ == self.rescan.max_rounds:
                sample["rescan_rounds"] = round_
                return quarantine(sample, residual_reason(found, round_))
            # Strengthen: anonymize the *released* pixels again, with what the re-scan found
            # added, at the next strength level. Working on the released pixels (not the
            # originals) matters for DP: re-processing a DP output costs no privacy budget,
            # and newly found regions are disjoint pixels (parallel composition), so the
            # recorded epsilon stays true. Each round draws from its own random stream.
            for region in found:
                region["rescan_round"] = round_ + 1
                # A face found again where one was already anonymized is the same face, not
                # a new one: it widens the area to strengthen but is not counted twice.
                region["redetected"] = any(_overlaps(region["box"], r["box"]) for r in regions
                                           if r.get("kind", "face") == region.get("kind", "face"))
            regions.extend(found)
            decoded = sample["_decoded"]
            # A synthesis method's replaced faces are not obscured: only what it left or missed.
            targets = [r for r in regions if not _is_synthesized(r)] if self.synthesis else regions
            # Every kind strengthened by its own class's method, faces by the face anonymizer
            # (a synthesis method's fallback); a person around the faces the synthesis replaced.
            policy = PolicyAnonymizer(self.methods, self.anonymize, face=self._anonymizer,
                                      face_expand=self.detect.expand)
            result = policy.apply(
                sample["_pixels"],
                targets,
                rng=sample_rng(self.seed, f"{sample['__key__']}#rescan{round_ + 1}"),
                strength=round_ + 1,
                protect=[r for r in regions if _is_synthesized(r)] if self.synthesis else None,
            )
            previous_mask = sample.get("_mask")
            if previous_mask is not None:
                result.mask = np.maximum(result.mask, previous_mask)
            sample["_pixels"] = result.pixels
            sample["_mask"] = result.mask
            sample["regions"] = regions
            sample["status"] = ANONYMIZED
            sample["method"] = self.anonymize.method
            if self.synthesis:
                sample["params"] = {**(sample.get("params") or {}), "rescan_fallback": result.params}
            else:
                sample["params"] = result.params
            if result.epsilon is not None or sample.get("epsilon") is None:
                # A fill fallback over a DP release is post-processing: the budget stands.
                sample["epsilon"] = result.epsilon
            sample["anonymize_round"] = round_ + 1
            sample[field] = encode_image(
                decoded, result.pixels, mask=result.mask, ext=field, jpeg_quality=self.io.jpeg_quality
            )
            sample["output_sha256"] = sha256_hex(sample[field])
        return sample  # unreachable: the last round returns above


    def _class_scans(self, regions: list[dict[str, Any]]) -> list[RegionDetector]:
        """The class detectors to run on the released pixels. With scope "changed", a class
        is scanned again only in samples where its first pass found something: the first pass
        read the whole original, and the release differs from it only where regions were
        obscured (blur, pixelate and fill remove detail, they never write text, plates or
        people), plus re-encoding; for faces the same reasoning restricts the re-scan to the
        changed areas. Scope "full" scans every class in every re-scanned sample. A class
        found by a round of this re-scan is scanned again in the next round."""
        if self.rescan.scope == "full":
            return self.detectors
        kinds = {str(r.get("kind") or "face") for r in regions}
        return [d for d in self.detectors if d.kind in kinds]

    def _search_areas(
        self, sample: Sample, regions: list[dict[str, Any]]
    ) -> list[tuple[int, int, int, int]] | None:
        """Boxes around every pixel anonymization changed, for a re-scan restricted to them, or
        None for a scan of the whole image.

        The restriction rests on the first pass: the detect stage searched the whole original
        with the same detect configuration (it leaves ``_scanned_with``) and found no face
        outside ``regions``, and outside the changed pixels the release differs from that
        original only by JPEG re-encoding. So it applies only to obscuring methods that changed
        pixels over every region. Regions from anywhere else, synthesis methods, the debug
        method "none" (faces left in place must be found again) and clean samples re-scanned
        on request get the whole-image scan.
        """
        from veil.transforms.detect import scan_fingerprint

        if self.rescan.scope != "changed" or self.synthesis or self.anonymize.method == "none":
            return None
        if sample.get("_scanned_with") != scan_fingerprint(self.detect):
            return None
        mask = sample.get("_mask")
        pixels = sample.get("_pixels")
        decoded = sample.get("_decoded")
        if sample.get("status") != ANONYMIZED or mask is None or pixels is None or decoded is None:
            return None
        if mask.shape != pixels.shape[:2] or decoded.rgb.shape != pixels.shape:
            return None
        # Pixels that differ from the original count as changed whatever the mask says (the
        # encoder does the same): the restriction never trusts the mask alone.
        import cv2

        # absdiff and a channel OR: numpy's any(axis=2) over HxWx3 costs ~7 ms at 640x480.
        diff = cv2.absdiff(pixels, decoded.rgb)
        changed = (mask > 0) | ((diff[:, :, 0] | diff[:, :, 1] | diff[:, :, 2]) > 0)
        return changed_areas(changed, regions)

    def _certify(self, sample: Sample, released_rgb: np.ndarray, regions: list[dict[str, Any]]) -> Sample:
        """Compare every synthesized face of the *encoded output* with the original face at the
        same place under each certifying recognizer; a match quarantines the sample."""
        from veil.transforms.fsap import certify_faces

        indices = [i for i, r in enumerate(regions) if _is_synthesized(r)]
        if not indices:
            return sample
        faces = [regions[i] for i in indices]
        margin = self.fsap.certify_margin
        verdicts = certify_faces(self._certifiers, sample["_decoded"].rgb, released_rgb, faces, margin=margin,
                                 restorations=self.fsap.certify_restorations)
        for face, verdict in zip(faces, verdicts, strict=True):
            _synthesis_record(face).setdefault("released", {}).update({n: v["score"] for n, v in verdict.items()})
        for rec in self._certifiers:
            for index, verdict in zip(indices, verdicts, strict=True):
                v = verdict[rec.name]
                if v["matched"]:
                    restored = v.get("restored") or {}
                    after = (f"; {restored['score']:.3f} after restoration {restored['by']}"
                             if restored.get("matched") else "")
                    return quarantine(
                        sample,
                        f"identity_not_removed: {rec.name} still matches face {index} to the original "
                        f"in the encoded output ({v['metric']} {v['score']:.3f}, threshold "
                        f"{v['threshold']}, margin {margin}{after})",
                    )
        return sample


def residual_reason(found: list[dict[str, Any]], rounds: int) -> str:
    """The quarantine reason for what the re-scan still found: faces first (``residual_face``),
    else the first other kind (``residual_text``, ``residual_plate``...), with counts per kind
    and never what was read."""
    kinds: dict[str, list[dict[str, Any]]] = {}
    for region in found:
        kinds.setdefault(str(region.get("kind") or "face"), []).append(region)
    if "face" in kinds:
        faces = kinds.pop("face")
        best = max(float(r.get("score") or 0.0) for r in faces)
        text = (f"residual_face: {len(faces)} face(s) still detected in the output "
                f"(max score {best:.2f}) after {rounds} strengthening round(s)")
    else:
        kind = next(iter(kinds))
        text = (f"residual_{kind}: {len(kinds.pop(kind))} {kind} region(s) still found in the "
                f"output after {rounds} strengthening round(s)")
    if kinds:
        text += "; also " + ", ".join(f"{len(v)} {k}" for k, v in sorted(kinds.items()))
    return text


def changed_areas(
    changed: np.ndarray, regions: list[dict[str, Any]]
) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1, exclusive ends) of the connected parts of ``changed``
    (HxW, nonzero where a pixel changed), plus every region's box rounded outward, so a
    region whose pixels came out unchanged is still searched."""
    import math

    import cv2

    binary = np.asarray(changed)
    binary = binary.view(np.uint8) if binary.dtype == bool else (binary > 0).astype(np.uint8)
    binary = np.ascontiguousarray(binary)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    areas = [(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h, _ in stats[1:count]]
    for region in regions:
        x0, y0, x1, y1 = region["box"]
        areas.append((math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)))
    return areas


def _is_synthesized(region: dict[str, Any]) -> bool:
    """True for a region whose identity a synthesis method replaced (not obscured)."""
    return _synthesis_record(region) is not None


def _synthesis_record(region: dict[str, Any]) -> dict[str, Any] | None:
    """The per-face record of the synthesis method that replaced this face (FSAP's or the
    diffusion stage's), or None for a face that was obscured or not touched."""
    if (region.get("fsap") or {}).get("status") == "optimised":
        return region["fsap"]
    if (region.get("diffusion") or {}).get("status") == "replaced":
        return region["diffusion"]
    return None


def _overlaps(a: list[float], b: list[float]) -> bool:
    """True when box a's centre lies inside box b or the boxes overlap by IoU > 0.3."""
    cx, cy = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]:
        return True
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return union > 0 and inter / union > 0.3
