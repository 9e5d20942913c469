"""Diffusion face replacement (``--method diffusion``; thesis chapter 6, issue 8).

Every face is handled like FSAP handles it (``veil.transforms.fsap`` provides the geometry,
blending, certification and fallback): aligned into a square crop, replaced there, the change
blended back through the inverse crop warp under a feathered face mask, and certified on the
pixels that will be released by a recognizer that took no part in making it. Two modes:

* ``inpaint`` (default): any diffusers inpainting pipeline (Stable Diffusion 1.5/2 or SDXL
  inpainting, by hub id or local folder, safetensors only) repaints the face ellipse of the
  crop. The prompt describes the *original* face's predicted age group, gender and expression
  (``transforms.attributes``: "photo of a smiling middle-aged woman, natural light ..."), so
  the new face keeps what a dataset user needs and loses who it was. Each face has its own
  seed, derived from (run seed, sample key, face index, re-sample), so every runner gives the
  same bytes; faces that share a pseudo-identity (``--pseudo-identities``) share their seed.
  Crops are ``crop_size`` (512, Stable Diffusion's size; use 1024 for SDXL inpainting). The *identity guard*: a face the certifier still matches to the original (or
  one the pipeline's safety checker blanked) is re-sampled with a new seed and more strength;
  after ``max_resamples`` its sample is quarantined.
* ``latent``: the thesis's paired latent optimisation. The synthetic pool face paired with the
  real face (``region["target"]`` from the pseudo-identity pass, else ``region["pair"]`` from
  the pairing stage; see ``transforms/pool.py``) is aligned into the same crop frame, encoded
  with an autoencoder (TAEF2 offline, or any AutoencoderKL), and its latent optimised with
  Adam on ``w_id * |cos(E_id(x_A), E_id(x_R))| + w_att * L_att(x_A, x_R) + w_border *
  L_border``. ``E_id`` is MobileFaceNet (as in FSAP); ``L_att`` is LPIPS, a distance over
  patch-level deep features, standing in for the FaRL patch features of the thesis (FaRL has
  no offline weights); ``L_border`` (pixel MSE + SSIM + LPIPS, FSAP's attribute loss) keeps
  the decoded face equal to the photo where the mask ramps out, so it blends. ``x_A`` is the
  real crop with the decoded face composited under the mask: the losses see what is released.
  A re-sample doubles the identity weight.

Faces whose longer box side is below ``min_face`` are obscured with ``fallback``. Manifest
records (``region["diffusion"]``) carry the mode, model, steps, seed, strength, re-samples,
certifier verdicts and, for paired faces, only the opaque ``pseudo_id`` and the pairing
distance: pool ids and the real-to-synthetic mapping never reach the manifest.

Determinism: on CPU a sample's faces form their own model batch and torch runs with a fixed
thread count, so runners give identical bytes; on a GPU faces of a stage batch are batched.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.config import AnonymizeConfig, DiffusionConfig, ImageIOConfig
from veil.transforms.models import ModelNotFoundError
from veil.transforms.stage import (
    ModelStage,
    Resources,
    Sample,
    describe_exception,
)

if TYPE_CHECKING:
    import torch

#: Public inpainting pipelines that load with ``AutoPipelineForInpainting`` (named in errors).
PUBLIC_INPAINT_MODELS = (
    "stable-diffusion-v1-5/stable-diffusion-inpainting",
    "stabilityai/stable-diffusion-2-inpainting",
    "diffusers/stable-diffusion-xl-1.0-inpainting-0.1",
)
#: Upper age bounds (years, exclusive) of the prompt's age groups.
AGE_GROUPS = ((13.0, "child"), (20.0, "teenage"), (35.0, "young adult"), (55.0, "middle-aged"),
              (float("inf"), "elderly"))
#: Expression classes (FER2013) as prompt adjectives; neutral adds none.
EXPRESSION_WORDS = {"happy": "smiling", "sad": "sad", "angry": "angry", "surprise": "surprised",
                    "fear": "frightened", "disgust": "disgusted", "neutral": ""}
#: A latent-mode re-sample multiplies the identity weight by this.
RESAMPLE_IDENTITY_FACTOR = 2.0


class DiffusionModelNotFoundError(ModelNotFoundError):
    """The inpainting pipeline is neither a local folder nor in the Hugging Face cache."""


# ------------------------------------------------------------------------------------ prompts


def describe_face(attributes: dict[str, Any]) -> dict[str, str]:
    """Prompt words for one face from its predicted attributes (``AttributeModels.predict``):
    ``age`` group, ``gender`` noun, ``expression`` adjective, and the ``subject`` phrase they
    make ("a smiling middle-aged woman"); a missing prediction leaves its word empty."""
    age = attributes.get("age")
    group = ""
    if age is not None:
        group = next(name for bound, name in AGE_GROUPS if float(age) < bound)
    gender = attributes.get("gender")
    child = group in ("child", "teenage")
    noun = {"female": "girl" if child else "woman", "male": "boy" if child else "man"}.get(gender or "", "")
    expression = EXPRESSION_WORDS.get(attributes.get("expression") or "", "")
    age_word = "" if group == "child" and noun in ("girl", "boy") else group
    if not noun:
        noun = "child" if group == "child" else "person"
        age_word = "" if group == "child" else age_word
    words = [w for w in (expression, age_word, noun) if w]
    article = "an" if words[0][0] in "aeiou" else "a"
    return {"age": group, "gender": noun if gender else "", "expression": expression,
            "subject": " ".join([article, *words])}


def build_prompt(template: str, attributes: dict[str, Any]) -> str:
    """``template`` (``diffusion.prompt``) filled in for one face; blank runs are squeezed."""
    text = template.format(**describe_face(attributes))
    return " ".join(text.split())


def face_seed(seed: int, key: str, face: int, resample: int) -> int:
    """The noise seed of one face in one re-sample: a function of (run seed, sample key, face
    index, re-sample) only, so it never depends on batching, worker or runner."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}\x00{int(face)}\x00{int(resample)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------ models


def _resolve_pipeline_source(model: str, *, allow_download: bool) -> tuple[str, str | None]:
    """(what to pass to ``from_pretrained``, local folder or None when it will be downloaded).
    Raises :class:`DiffusionModelNotFoundError` saying which public models work."""
    local = Path(model).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise DiffusionModelNotFoundError(
                f"diffusion.model {model!r}: folder has no model_index.json, so it is not a diffusers "
                f"pipeline; save one with pipeline.save_pretrained(folder, safe_serialization=True)")
        return str(local), str(local)
    if allow_download:
        return model, None
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # noqa: BLE001 - not a valid repo id either: same answer
        cached = None
    if isinstance(cached, str):
        return model, str(Path(cached).parent)
    raise DiffusionModelNotFoundError(
        f"diffusion.model {model!r} is not a local folder and is not in the Hugging Face cache, and "
        f"downloads are off. Public inpainting pipelines that work: {', '.join(PUBLIC_INPAINT_MODELS)}. "
        f"Run once with --allow-download on a machine with internet (or `hf download ID`), or pass "
        f"--diffusion-model FOLDER with model_index.json and .safetensors weights")


def diffusion_model_provenance(config: DiffusionConfig, *, allow_download: bool) -> list[dict[str, Any]]:
    """The run's record of the inpainting pipeline (run.json), checked before any work: a
    missing pipeline is an error here, not one quarantine per sample. Diffusers folders hold
    several large files and have no registered checksum: ``sha256`` is None."""
    if config.mode != "inpaint":
        return []
    _source, folder = _resolve_pipeline_source(config.model, allow_download=allow_download)
    return [{"name": f"diffusion:{config.model}", "path": folder, "sha256": None,
             "license": "see the model card", "source": config.model}]


def models_for_diffusion(config: DiffusionConfig) -> list[str]:
    """Registry names of the files a diffusion configuration uses (run.json provenance)."""
    from veil.transforms.attributes import AGE_MODEL, EXPRESSION_MODEL, GENDER_MODEL
    from veil.transforms.latent import TAEF2_DECODER, TAEF2_ENCODER
    from veil.transforms.perceptual import LPIPS_MODELS
    from veil.transforms.recognizers import MOBILEFACENET_MODEL, RECOGNIZER_MODELS

    if config.mode == "inpaint":
        names = [AGE_MODEL, GENDER_MODEL, EXPRESSION_MODEL]
    else:
        names = [TAEF2_ENCODER, TAEF2_DECODER] if config.latent == "taef2" else []
        names += [MOBILEFACENET_MODEL, LPIPS_MODELS["alex"]]
    for name in config.certify:
        names += RECOGNIZER_MODELS.get(name, ())
    return list(dict.fromkeys(names))


def _torch_dtype(config: DiffusionConfig, device: str) -> Any:
    import torch

    name = config.dtype
    if name == "auto":
        name = "float16" if device.startswith("cuda") and config.mode == "inpaint" else "float32"
    return getattr(torch, name)


def load_inpaint_pipeline(model: str, *, allow_download: bool, device: str, dtype: Any) -> Any:
    """A diffusers inpainting pipeline by hub id or folder: safetensors only (no pickle), from
    local files unless downloads are allowed, progress bars off."""
    try:
        from diffusers import AutoPipelineForInpainting
    except ImportError as exc:  # pragma: no cover - diffusers is a dependency
        raise ImportError("--method diffusion needs diffusers and transformers: "
                          "pip install diffusers transformers") from exc
    source, _folder = _resolve_pipeline_source(model, allow_download=allow_download)
    try:
        pipe = AutoPipelineForInpainting.from_pretrained(
            source, use_safetensors=True, local_files_only=not allow_download, dtype=dtype)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0][:300]
        raise DiffusionModelNotFoundError(
            f"diffusion.model {model!r}: cannot load an inpainting pipeline ({type(exc).__name__}: "
            f"{first}). It must be a diffusers inpainting pipeline with .safetensors weights, e.g. "
            f"{', '.join(PUBLIC_INPAINT_MODELS)}") from exc
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------ inpaint


@dataclass
class InpaintResult:
    """One face's repainted crop as a change to add (S, S, 3) float32 in 0-255 units, and
    whether the pipeline's safety checker replaced it (a blank face is re-sampled)."""

    change: np.ndarray
    blanked: bool


class Inpainter:
    """Repaint the face ellipse of aligned crops with a diffusers inpainting pipeline."""

    def __init__(self, pipeline: Any, config: DiffusionConfig, mask: np.ndarray) -> None:
        from PIL import Image

        self.pipeline = pipeline
        self.config = config
        # Everything the feathered blend can show is repainted: the mask's whole support.
        self._mask_image = Image.fromarray(np.where(mask > 0.0, 255, 0).astype(np.uint8))

    def __call__(self, crops: np.ndarray, prompts: list[str], seeds: list[int], strength: float
                 ) -> list[InpaintResult]:
        import torch
        from PIL import Image

        size = crops.shape[1]
        cfg = self.config
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        negative = [cfg.negative_prompt] * len(prompts) if cfg.guidance > 1.0 else None
        with torch.inference_mode():
            out = self.pipeline(
                prompt=prompts, negative_prompt=negative,
                image=[Image.fromarray(c) for c in crops], mask_image=[self._mask_image] * len(prompts),
                height=size, width=size, num_inference_steps=cfg.steps, strength=strength,
                guidance_scale=cfg.guidance, generator=generators, output_type="np")
        images = np.asarray(out.images, dtype=np.float32)
        if images.shape != (len(prompts), size, size, 3):
            raise RuntimeError(f"inpainting pipeline returned images of shape {images.shape}, "
                               f"expected {(len(prompts), size, size, 3)}")
        if not np.isfinite(images).all():
            # Half-precision VAEs can overflow; a NaN face must never be blended into a release.
            raise RuntimeError("inpainting pipeline returned non-finite pixels (a float16 overflow?); "
                               "set diffusion.dtype: float32")
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
        return [InpaintResult(change=images[i] * 255.0 - crops[i].astype(np.float32), blanked=bool(flags[i]))
                for i in range(len(prompts))]


# -------------------------------------------------------------------------------- latent mode


@dataclass
class LatentFace:
    """What latent optimisation did to one face."""

    change: np.ndarray  # (S, S, 3) float32, 0-255 units
    similarity: float  # cosine of the optimised recognizer, released vs original
    attribute_loss: float


class PairedLatentOptimizer:
    """Optimise the latent of a paired synthetic face towards the real face's attributes and
    away from its identity (thesis 6.5.4). Reuses FSAP's recognizer view (``embed``) and its
    attribute loss (pixels + SSIM + LPIPS) as the border loss."""

    def __init__(self, latent: Any, recognizer: Any, perceptual: Any, config: DiffusionConfig,
                 mask: np.ndarray, device: str) -> None:
        import torch

        from veil.config import FSAPConfig
        from veil.transforms.fsap import FSAPOptimizer

        self.config = config
        self.latent = latent
        self.perceptual = perceptual
        self.device = torch.device(device)
        # FSAP's machinery with all attribute-loss terms at weight 1: its attribute loss is
        # this mode's border loss.
        self.fsap = FSAPOptimizer(latent, recognizer, perceptual,
                                  FSAPConfig(weight_pixel=1.0, weight_ssim=1.0, weight_lpips=1.0), device)
        self.mask = torch.from_numpy(mask).to(self.device).view(1, 1, *mask.shape)

    def optimise(self, real: np.ndarray, start: np.ndarray, *, resample: int = 0
                 ) -> list[LatentFace]:
        """``real`` and ``start`` (B, S, S, 3) uint8 crops in the same frame: the real faces and
        their paired synthetic faces."""
        import torch

        cfg = self.config
        w_id = cfg.weight_identity * RESAMPLE_IDENTITY_FACTOR ** resample

        def tensor(a: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
            return t.permute(0, 3, 1, 2).float() / 255.0

        x, p = tensor(real), tensor(start)
        m = self.mask
        with torch.no_grad():
            z = self.latent.encode(p)
            target = self.fsap.embed(x)
        z = z.clone().requires_grad_(True)
        optimiser = torch.optim.Adam([z], lr=cfg.learning_rate)

        def losses(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            decoded = self.latent.decode(z).clamp(0.0, 1.0)
            released = m * decoded + (1.0 - m) * x
            sim = (self.fsap.embed(released) * target).sum(1)
            attr = self.perceptual(released, x).view(-1)
            border = self.fsap.attribute_loss((1.0 - m) * decoded + m * x, x)
            total = w_id * sim.abs() + cfg.weight_attribute * attr + cfg.weight_border * border
            return total, sim, decoded

        for _step in range(cfg.steps):
            optimiser.zero_grad(set_to_none=True)
            total, _sim, _decoded = losses(z)
            total.sum().backward()
            optimiser.step()
        with torch.no_grad():
            total, sim, decoded = losses(z)
            attr = self.perceptual(m * decoded + (1.0 - m) * x, x).view(-1)
            change = ((decoded - x) * 255.0).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
        return [LatentFace(change=change[i], similarity=float(sim[i]), attribute_loss=float(attr[i]))
                for i in range(change.shape[0])]


def paired_face(region: dict[str, Any]) -> dict[str, Any] | None:
    """The synthetic face a region is paired with: the pseudo-identity target if there is one,
    else the attribute pairing (the contract of ``transforms/pool.py``)."""
    for name in ("target", "pair"):
        value = region.get(name)
        if isinstance(value, dict) and "pool_index" in value:
            return value
    return None


def pairing_record(region: dict[str, Any]) -> dict[str, Any]:
    """What this stage's record says about a region's pairing: the opaque pseudo-identity id
    and the pairing distance, never pool ids (the manifest cuts ``pair`` and ``target``
    themselves down the same way: ``veil.transforms.pairing.public_region``)."""
    target, pair = region.get("target"), region.get("pair")
    out: dict[str, Any] = {}
    if isinstance(target, dict):
        if target.get("pseudo_id") is not None:
            out["pseudo_id"] = str(target["pseudo_id"])
        if target.get("distance") is not None:
            out["pair_distance"] = round(float(target["distance"]), 4)
    if isinstance(pair, dict) and "pair_distance" not in out and pair.get("distance") is not None:
        out["pair_distance"] = round(float(pair["distance"]), 4)
    return out


def pool_face_crop(pool: Any, index: int, crop_size: int) -> np.ndarray:
    """Pool face ``index`` aligned into the FSAP crop frame by its 5 landmarks, so the real
    and the synthetic face line up pixel for pixel."""
    from veil.transforms.fsap import extract_crop, face_crop_matrix

    image = np.ascontiguousarray(pool.image(index), dtype=np.uint8)
    h, w = image.shape[:2]
    region = {"box": [0.0, 0.0, float(w), float(h)],
              "landmarks": np.asarray(pool.landmarks(index), dtype=np.float64).tolist()}
    return extract_crop(image, face_crop_matrix(region, crop_size), crop_size)


# ------------------------------------------------------------------------------------ stage


@dataclass
class _Face:
    sample: int
    region: int
    matrix: np.ndarray


class DiffusionStage(ModelStage):
    """Pipeline stage: every face of ``sample["_pixels"]`` replaced by a diffusion model,
    certified, re-sampled while still recognised, with fallbacks for small faces.

    Declares ``resources.gpus`` from ``--gpus-per-worker`` (its own GPU actor pool on Ray); the
    device is chosen in ``setup()`` and a GPU asked for but missing is an error.
    """

    name = "diffusion"
    stateful = True

    def __init__(self, config: DiffusionConfig, *, anonymize: AnonymizeConfig, expand: float,
                 seed: int, models: dict[str, Any], gpus: float = 0.0, batch_size: int = 16,
                 io: ImageIOConfig | None = None, pool: str | None = None) -> None:
        self.config = config
        self.io = io if io is not None else ImageIOConfig()
        self.anonymize = anonymize
        self.expand = expand
        self.seed = seed
        self.models = models
        self.pool = pool
        self.resources = Resources(cpus=1.0, gpus=float(gpus))
        self.batch_size = batch_size
        self._ready = False

    def setup(self) -> None:
        if self._ready:
            return
        import torch

        from veil.transforms.fsap import _face_mask, fallback_anonymizer, resolve_device
        from veil.transforms.models import ModelRegistry
        from veil.transforms.recognizers import build_recognizer

        cfg = self.config
        self.device = resolve_device(cfg, self.resources.gpus, section="diffusion")
        if self.device == "cpu":
            # A fixed thread count keeps float reductions, and so bytes, the same on every runner.
            torch.set_num_threads(max(1, int(self.resources.cpus)))
        registry = ModelRegistry(**self.models)
        allow_download = bool(self.models.get("allow_download"))
        self._size = cfg.crop_side
        self._crop_mask = _face_mask(self._size)
        if cfg.mode == "inpaint":
            from veil.transforms.attributes import AttributeModels

            pipe = load_inpaint_pipeline(cfg.model, allow_download=allow_download, device=self.device,
                                         dtype=_torch_dtype(cfg, self.device))
            self._inpainter: Inpainter | None = Inpainter(pipe, cfg, self._crop_mask)
            self._attributes = AttributeModels.from_registry(registry)
            self._optimizer: PairedLatentOptimizer | None = None
            self._model_name = cfg.model
        else:
            self._inpainter = None
            self._optimizer = self._build_optimizer(registry, allow_download)
            self._model_name = cfg.latent
        self._pool_data = self._load_pool() if cfg.mode == "latent" else None
        self._certifiers = [build_recognizer(name, registry) for name in cfg.certify]
        self._fallback = fallback_anonymizer(self.anonymize, cfg, expand=self.expand)
        self._face_batch = cfg.face_batch
        self._ready = True

    def _build_optimizer(self, registry: Any, allow_download: bool) -> PairedLatentOptimizer:
        from veil.transforms.latent import build_latent_space
        from veil.transforms.models import load_torch_state_dict
        from veil.transforms.perceptual import LPIPS
        from veil.transforms.recognizers import MOBILEFACENET_MODEL, _mobilefacenet_class

        latent = build_latent_space(self.config.latent, registry, allow_download=allow_download)
        latent = latent.to(self.device)
        if self._size % latent.factor:
            raise ValueError(f"diffusion.crop_size {self._size} is not a multiple of the latent "
                             f"space's factor {latent.factor}")
        recognizer = _mobilefacenet_class()()
        recognizer.load_state_dict(load_torch_state_dict(registry.resolve(MOBILEFACENET_MODEL)), strict=True)
        recognizer.eval().requires_grad_(False).to(self.device)
        perceptual = LPIPS.from_registry(registry, net="alex", device=self.device)
        perceptual.eval().requires_grad_(False)
        return PairedLatentOptimizer(latent, recognizer, perceptual, self.config, self._crop_mask,
                                     self.device)

    def _load_pool(self) -> Any:
        if not self.pool:
            raise ValueError("diffusion.mode latent starts from paired synthetic faces: give a pool "
                             "(veil pool ... --output POOL; then --synthetic-pool POOL)")
        from veil.transforms.pool import SyntheticPool

        return SyntheticPool.load(self.pool)

    # -- helpers ------------------------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """The settings a release was made with (manifest ``params``)."""
        cfg = self.config
        out: dict[str, Any] = {
            "mode": cfg.mode, "model": self._model_name, "steps": cfg.steps, "crop_size": self._size,
            "certify": list(cfg.certify), "certify_margin": cfg.certify_margin,
            "certify_restorations": list(cfg.certify_restorations),
            "max_resamples": cfg.max_resamples, "min_face": cfg.min_face, "fallback": cfg.fallback,
            "device": self.device,
        }
        if cfg.mode == "inpaint":
            out.update(strength=cfg.strength, strength_step=cfg.strength_step, guidance=cfg.guidance,
                       prompt=cfg.prompt, negative_prompt=cfg.negative_prompt)
        else:
            out.update(learning_rate=cfg.learning_rate, weights={
                "identity": cfg.weight_identity, "attribute": cfg.weight_attribute,
                "border": cfg.weight_border})
        return out

    def _strength(self, resample: int) -> float:
        return min(1.0, self.config.strength + self.config.strength_step * resample)

    def _seed(self, sample: Sample, region: int, resample: int) -> int:
        """A face's noise seed. Faces given one pseudo-identity (``--pseudo-identities``) share
        it, so with their shared prompt words they tend to come out as one synthetic person;
        every other face has its own, from its sample key and index."""
        pseudo_id = sample["regions"][region]["diffusion"].get("pseudo_id")
        if pseudo_id is not None:
            return face_seed(self.seed, f"pseudo:{pseudo_id}", 0, resample)
        return face_seed(self.seed, sample["__key__"], region, resample)

    def _groups(self, faces: list[_Face]) -> list[list[int]]:
        """Model batches: one sample's faces on CPU (runner-independent bytes), up to
        ``face_batch`` faces across samples on a GPU."""
        groups: list[list[int]] = []
        for i, face in enumerate(faces):
            same = groups and (self.device != "cpu" or faces[groups[-1][0]].sample == face.sample)
            if same and len(groups[-1]) < self._face_batch:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def _replace(self, batch: list[Sample], pixels: dict[int, np.ndarray], faces: list[_Face],
                 resample: int, prompts: dict[tuple[int, int], str], starts: dict[tuple[int, int], int]
                 ) -> list[tuple[np.ndarray, dict[str, Any]]]:
        """Replace faces in model batches; returns each face's crop change and its record."""
        cfg = self.config
        out: list[tuple[np.ndarray, dict[str, Any]] | None] = [None] * len(faces)
        for group in self._groups(faces):
            from veil.transforms.fsap import extract_crop

            crops = np.stack([extract_crop(pixels[faces[i].sample], faces[i].matrix, self._size)
                              for i in group])
            seeds = [self._seed(batch[faces[i].sample], faces[i].region, resample) for i in group]
            if self._inpainter is not None:
                strength = self._strength(resample)
                group_prompts = [prompts[(faces[i].sample, faces[i].region)] for i in group]
                results = self._inpainter(crops, group_prompts, seeds, strength)
                for j, i in enumerate(group):
                    out[i] = (results[j].change, {
                        "seed": seeds[j], "strength": round(strength, 4), "prompt": group_prompts[j],
                        "blanked": results[j].blanked})
            else:
                assert self._optimizer is not None
                start = np.stack([pool_face_crop(self._pool_data, starts[(faces[i].sample, faces[i].region)],
                                                 self._size) for i in group])
                results_l = self._optimizer.optimise(crops, start, resample=resample)
                w_id = cfg.weight_identity * RESAMPLE_IDENTITY_FACTOR ** resample
                for j, i in enumerate(group):
                    out[i] = (results_l[j].change, {
                        "weight_identity": w_id, "similarity": round(results_l[j].similarity, 4),
                        "attribute_loss": round(results_l[j].attribute_loss, 5)})
        return out  # type: ignore[return-value]

    def _prepare(self, sample: Sample, index: int, pending: list[_Face],
                 prompts: dict[tuple[int, int], str], starts: dict[tuple[int, int], int]) -> list[dict[str, Any]]:
        """Sort a sample's faces into replaced and too small; prompts (inpaint) or pool starts
        (latent) for the replaced ones. Returns the small regions."""
        from veil.transforms.fsap import face_crop_matrix

        cfg = self.config
        small, faces = [], []
        for r, region in enumerate(sample["regions"]):
            pairing = paired_face(region)
            if pairing is not None and self._pool_data is not None:
                starts[(index, r)] = int(pairing["pool_index"])
            record = pairing_record(region)
            x0, y0, x1, y1 = region["box"]
            side = max(x1 - x0, y1 - y0)
            if side < cfg.min_face:
                small.append(region)
                region["diffusion"] = {"status": "fallback", "method": cfg.fallback, **record,
                                       "why": f"face {side:.0f} px < diffusion.min_face {cfg.min_face} px: "
                                              f"too small for a recognizer"}
                continue
            if cfg.mode == "latent" and (index, r) not in starts:
                raise ValueError(f"face {r} has no paired synthetic face (region 'target' or 'pair'): "
                                 f"latent mode needs the pairing stage (--synthetic-pool)")
            if cfg.mode == "latent" and not 0 <= starts[(index, r)] < len(self._pool_data):
                raise ValueError(f"face {r} is paired with pool face {starts[(index, r)]}, outside the "
                                 f"pool of {len(self._pool_data)}")
            region["diffusion"] = {"status": "pending", **record}
            faces.append((r, region))
        if cfg.mode == "inpaint" and faces:
            predicted = self._attributes.predict(sample["_decoded"].rgb, [f[1] for f in faces])
            for (r, _region), attrs in zip(faces, predicted, strict=True):
                prompts[(index, r)] = build_prompt(cfg.prompt, attrs)
        pending.extend(_Face(index, r, face_crop_matrix(region, self._size)) for r, region in faces)
        return small

    # -- the stage ------------------------------------------------------------------------------

    def process_batch(self, batch: list[Sample]) -> list[Sample]:
        from veil.transforms.anonymize import sample_rng
        from veil.transforms.fsap import (
            begin_replacement,
            certify_faces,
            finish_replacement,
            matched_by,
            released_pixels,
            render_changes,
        )

        self.setup()
        cfg = self.config
        todo = begin_replacement(batch)
        if not todo:
            return batch
        start = time.perf_counter()
        originals = {i: batch[i]["_decoded"].rgb for i in todo}
        masks = {i: np.zeros(originals[i].shape[:2], dtype=np.float32) for i in todo}
        pending: list[_Face] = []
        prompts: dict[tuple[int, int], str] = {}
        starts: dict[tuple[int, int], int] = {}
        failed: dict[int, str] = {}
        for i in todo:
            sample = batch[i]
            try:
                before = len(pending)
                small = self._prepare(sample, i, pending, prompts, starts)
                if small:
                    result = self._fallback.apply(sample["_pixels"], small,
                                                  rng=sample_rng(self.seed, sample["__key__"]))
                    sample["_pixels"] = result.pixels
                    masks[i] = np.maximum(masks[i], result.mask)
            except Exception as exc:  # noqa: BLE001 - failures are data
                del pending[before:]
                failed[i] = f"diffusion_error: {describe_exception(exc)}"
        pending = [f for f in pending if f.sample not in failed]
        # Every re-sample renders a sample afresh from these, so changes never stack.
        base_pixels = {i: batch[i]["_pixels"].copy() for i in todo if i not in failed}
        base_masks = {i: masks[i].copy() for i in todo if i not in failed}
        changes: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        resample = 0
        while pending:
            try:
                results = self._replace(batch, base_pixels, pending, resample, prompts, starts)
            except Exception as exc:  # noqa: BLE001 - the group failed: quarantine its samples
                for f in pending:
                    failed[f.sample] = f"diffusion_error: {describe_exception(exc)}"
                break
            for f, (change, info) in zip(pending, results, strict=True):
                changes.setdefault(f.sample, {})[f.region] = (change, f.matrix)
                region = batch[f.sample]["regions"][f.region]
                kept = {k: v for k, v in region["diffusion"].items() if k in ("pseudo_id", "pair_distance")}
                region["diffusion"] = {"status": "replaced", "mode": cfg.mode, "model": self._model_name,
                                       "steps": cfg.steps, "resamples": resample, **info, **kept}
            touched = sorted({f.sample for f in pending})
            render_changes(batch, touched, base_pixels, base_masks, changes, self._crop_mask, masks)
            # The identity guard: certify on the pixels that will be released.
            retry: list[_Face] = []
            for i in touched:
                if i in failed:
                    continue
                here = [f for f in pending if f.sample == i]
                regions = [batch[i]["regions"][f.region] for f in here]
                try:
                    verdicts = certify_faces(self._certifiers, originals[i],
                                             released_pixels(batch[i], masks[i], self.io), regions,
                                             margin=cfg.certify_margin,
                                             restorations=cfg.certify_restorations)
                except Exception as exc:  # noqa: BLE001 - failures are data
                    failed[i] = f"certify_error: {describe_exception(exc)}"
                    continue
                for f, region, verdict in zip(here, regions, verdicts, strict=True):
                    region["diffusion"]["certify"] = verdict
                    if region["diffusion"].get("blanked") or any(v["matched"] for v in verdict.values()):
                        retry.append(f)
            if retry and resample >= cfg.max_resamples:
                for f in retry:
                    record = batch[f.sample]["regions"][f.region]["diffusion"]
                    names = matched_by(record["certify"])
                    why = f"still matched by {names}" if names else "blanked by the pipeline's safety checker"
                    failed.setdefault(f.sample, f"identity_not_removed: face {f.region} {why} after "
                                                f"{resample} re-sample(s)")
                break
            resample += 1
            pending = retry
        finish_replacement(batch, todo, failed, masks, stage=self.name, method="diffusion",
                           params=self.params(), seconds=time.perf_counter() - start)
        return batch
