"""Latent spaces FSAP perturbs: an image autoencoder, differentiable both ways.

FSAP (thesis chapter 5) moves a face's *latent code* instead of its pixels: a step in a
learned latent space changes the face the way faces change (shape, shading, features), so a
small step can change identity while a decoder keeps the result a plausible photo. Veil
needs a latent space that runs offline on a laptop and one that users with internet and a
GPU can swap in:

* ``taef2`` (default): TAEF2, the tiny autoencoder distilled by madebyollin/taesd for the
  FLUX.2 VAE latent space. 32 latent channels at 1/8 resolution, about 1.2 M parameters per
  half, 32-35 dB round trip on face photos. Built here from its published layout (the TAESD
  design: 3x3 convolutions, residual blocks, stride-2 down / nearest up sampling; TAEF2 adds a
  GroupNorm bottleneck inside the blocks next to the latent) and loaded from the registry.
* any diffusers ``AutoencoderKL`` (Stable Diffusion, SDXL, FLUX VAEs) by hub id or local
  folder: the latent is the posterior mean times the VAE's scaling factor.

Both take RGB in [0, 1] (N, 3, H, W) with H, W multiples of 8 and return images in [0, 1].
Each latent space documents its default step sizes (``default_rates``), because a sign step
of 0.02 means something different in every space: they are chosen so that one step changes a
decoded face by a similar, small amount (measured in ``tests/test_fsap.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from veil.transforms.models import ModelRegistry

#: Registry names of the TAEF2 halves.
TAEF2_ENCODER = "taef2_encoder"
TAEF2_DECODER = "taef2_decoder"


@dataclass(frozen=True)
class LatentRates:
    """Default sign-step sizes of a latent space: lambda_I (identity) and lambda_P
    (attributes), in latent units."""

    lambda_id: float
    lambda_attr: float


#: Per latent space. The thesis (StyleGAN2 W+ space, pSp encoder) uses lambda_I = 0.02,
#: lambda_P = 0.008. TAEF2 latents are spatial with a spread of about 1 (tanh-clamped to +-3
#: in the decoder), like W+ codes, so the paper's values were the starting point (0.02 moves
#: MobileFaceNet similarity by about 0.03 per step on the shared photos). Both rates twice
#: that, in the same ratio, reach tau in about half the iterations (median 38 -> 20 on the
#: photos, 36 -> 19 on the scene set) with the same verification, identification and
#: restoration figures and face LPIPS within 0.002; three times (0.06, 0.024) costs
#: LPIPS and lets one scene face back after the restoration attack (BENCHMARKS.md, "FSAP's
#: step sizes"). AutoencoderKL latents are scaled to unit variance by the VAE's scaling
#: factor; no AutoencoderKL can be measured offline, so they keep the paper's values.
DEFAULT_RATES: dict[str, LatentRates] = {
    "taef2": LatentRates(lambda_id=0.04, lambda_attr=0.016),
    "autoencoderkl": LatentRates(lambda_id=0.02, lambda_attr=0.008),
}


def _taesd_modules() -> tuple[type, type]:
    """The TAESD encoder/decoder as ``nn.Sequential`` subclasses (torch imported lazily)."""
    import torch
    from torch import nn

    def conv3(n_in: int, n_out: int, **kwargs: Any) -> nn.Conv2d:
        return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)

    class SoftClamp(nn.Module):
        """Keeps decoder inputs within +-3 smoothly: gradients never vanish at a hard edge."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x / 3.0) * 3.0

    class ResBlock(nn.Module):
        """Three 3x3 convs with a residual; with ``bottleneck`` a GroupNorm 1x1 bottleneck is
        added to the input first (TAEF2's blocks next to the latent)."""

        def __init__(self, channels: int, bottleneck: bool) -> None:
            super().__init__()
            self.conv = nn.Sequential(conv3(channels, channels), nn.ReLU(), conv3(channels, channels),
                                      nn.ReLU(), conv3(channels, channels))
            self.skip = nn.Identity()
            self.fuse = nn.ReLU()
            self.pool: nn.Module | None = None
            if bottleneck:
                wide = channels * 4
                self.pool = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.GroupNorm(4, wide),
                                          nn.ReLU(), nn.Conv2d(wide, channels, 1, bias=False))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.pool is not None:
                x = x + self.pool(x)
            return self.fuse(self.conv(x) + self.skip(x))

    class TinyEncoder(nn.Sequential):
        """RGB [0, 1] -> latent at 1/8 resolution (indices match the published state dicts)."""

        def __init__(self, latent_channels: int, bottleneck: bool) -> None:
            down = lambda: conv3(64, 64, stride=2, bias=False)  # noqa: E731
            block = lambda deep=False: ResBlock(64, bottleneck and deep)  # noqa: E731
            super().__init__(
                conv3(3, 64), block(),
                down(), block(), block(), block(),
                down(), block(), block(), block(),
                down(), block(True), block(True), block(True),
                conv3(64, latent_channels),
            )

    class TinyDecoder(nn.Sequential):
        """Latent -> RGB (about [0, 1]) at 8x resolution."""

        def __init__(self, latent_channels: int, bottleneck: bool) -> None:
            up = lambda: (nn.Upsample(scale_factor=2), conv3(64, 64, bias=False))  # noqa: E731
            block = lambda deep=False: ResBlock(64, bottleneck and deep)  # noqa: E731
            super().__init__(
                SoftClamp(), conv3(latent_channels, 64), nn.ReLU(),
                block(True), block(True), block(True), *up(),
                block(), block(), block(), *up(),
                block(), block(), block(), *up(),
                block(), conv3(64, 3),
            )

    return TinyEncoder, TinyDecoder


class LatentSpace:
    """An autoencoder FSAP can optimise in. Subclasses set ``name``, ``kind``, ``models``."""

    name: str = "latent"
    #: Key of :data:`DEFAULT_RATES`.
    kind: str = "taef2"
    #: Spatial downscaling factor: crop sides must be multiples of it.
    factor: int = 8

    @property
    def rates(self) -> LatentRates:
        return DEFAULT_RATES[self.kind]

    @property
    def models(self) -> list[str]:
        """Registry names of the weight files (for the run's model list with sha256)."""
        return []

    def to(self, device: Any) -> LatentSpace:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TinyAutoencoder(LatentSpace):
    """TAESD-family autoencoder (TAEF2 by default) from two plain state dicts.

    Latent channels and the bottleneck variant are read off the state dict's shapes and keys,
    so TAESD (4 ch), TAESDXL, TAESD3/TAEF1 (16 ch) and TAEF2 (32 ch) files all load; loading
    is ``strict`` and ``weights_only``: a file that does not fit fails loudly.
    """

    kind = "taef2"

    def __init__(self, encoder_state: dict[str, Any], decoder_state: dict[str, Any], *,
                 name: str = "taef2", models: list[str] | None = None) -> None:
        encoder_cls, decoder_cls = _taesd_modules()
        latent_channels = int(decoder_state["1.weight"].shape[1])
        if int(encoder_state["14.weight"].shape[0]) != latent_channels:
            raise ValueError("encoder and decoder state dicts disagree on the latent channels")
        self.encoder = encoder_cls(latent_channels, "11.pool.0.weight" in encoder_state)
        self.decoder = decoder_cls(latent_channels, "3.pool.0.weight" in decoder_state)
        self.encoder.load_state_dict(encoder_state, strict=True)
        self.decoder.load_state_dict(decoder_state, strict=True)
        self.encoder.eval().requires_grad_(False)
        self.decoder.eval().requires_grad_(False)
        self.latent_channels = latent_channels
        self.name = name
        self._models = list(models or [])

    @classmethod
    def from_registry(cls, registry: ModelRegistry) -> TinyAutoencoder:
        from veil.transforms.models import load_torch_state_dict

        return cls(load_torch_state_dict(registry.resolve(TAEF2_ENCODER)),
                   load_torch_state_dict(registry.resolve(TAEF2_DECODER)),
                   name="taef2", models=[TAEF2_ENCODER, TAEF2_DECODER])

    @classmethod
    def random(cls, *, latent_channels: int = 32, bottleneck: bool = True, seed: int = 0) -> TinyAutoencoder:
        """A randomly initialised autoencoder of the real class (tests)."""
        import torch

        encoder_cls, decoder_cls = _taesd_modules()
        torch.manual_seed(seed)
        enc, dec = encoder_cls(latent_channels, bottleneck), decoder_cls(latent_channels, bottleneck)
        return cls(enc.state_dict(), dec.state_dict(), name="taef2-random")

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def to(self, device: Any) -> TinyAutoencoder:
        self.encoder.to(device)
        self.decoder.to(device)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


class DiffusersAutoencoder(LatentSpace):
    """A diffusers ``AutoencoderKL`` (by hub id or local folder) as a latent space.

    The latent is the posterior *mean* (no sampling: the same face always gives the same
    start) times ``config.scaling_factor`` (minus ``shift_factor`` where the VAE has one), so
    latents have about unit spread whatever the VAE. Images map [0, 1] <-> [-1, 1].
    Offline (the default) the model must already be on disk: a hub id is looked up in the
    local Hugging Face cache only, and a missing model is a clear error.
    """

    kind = "autoencoderkl"

    def __init__(self, vae: Any, *, name: str) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        cfg = vae.config
        self.scaling = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.factor = 2 ** (len(getattr(cfg, "block_out_channels", [0, 0, 0, 0])) - 1)

    @classmethod
    def load(cls, id_or_path: str, *, allow_download: bool = False) -> DiffusersAutoencoder:
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:  # pragma: no cover - diffusers is a dependency
            raise ImportError("an AutoencoderKL latent space needs diffusers: pip install diffusers") from exc
        local = Path(id_or_path).expanduser()
        source = str(local) if local.exists() else id_or_path
        offline = not allow_download
        try:
            vae = AutoencoderKL.from_pretrained(source, local_files_only=offline)
        except Exception as first:  # noqa: BLE001 - full SD pipelines keep the VAE in vae/
            try:
                vae = AutoencoderKL.from_pretrained(source, subfolder="vae", local_files_only=offline)
            except Exception:  # noqa: BLE001 - report the first, clearer error
                hint = ("it is not a local folder and is not in the Hugging Face cache; run once "
                        "with allow_download: true (--allow-download) on a machine with internet, "
                        "or point fsap.latent to a folder with config.json and the weights")
                raise FileNotFoundError(f"fsap.latent {id_or_path!r}: cannot load an AutoencoderKL: {hint}. "
                                        f"({type(first).__name__}: {str(first).splitlines()[0][:200]})") from first
        return cls(vae, name=id_or_path)

    def to(self, device: Any) -> DiffusersAutoencoder:
        self.vae.to(device)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        posterior = self.vae.encode(x * 2.0 - 1.0).latent_dist
        return (posterior.mean - self.shift) * self.scaling

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode(z / self.scaling + self.shift).sample
        return (out + 1.0) / 2.0


def build_latent_space(name: str, registry: ModelRegistry, *, allow_download: bool = False) -> LatentSpace:
    """``taef2`` from the registry, or a diffusers AutoencoderKL by hub id or folder."""
    if name == "taef2":
        return TinyAutoencoder.from_registry(registry)
    return DiffusersAutoencoder.load(name, allow_download=allow_download)
