"""Pretrained face generators, for building pools of synthetic faces.

Synthesis anonymizers replace a face by a face that belongs to nobody; a pool of generated
faces (and tests of how faces are paired with them) needs a real generator, not noise. The
registered ``dcgan_celeba32_generator`` is a small DCGAN trained on CelebA crops: it maps
``z ~ U[-1, 1]^100`` to a 32x32 RGB face in ``[-1, 1]``. Its weights are a plain state dict,
loaded with ``weights_only=True`` and strictly (every key and shape must match), so a
different or damaged file fails instead of producing plausible-looking garbage.

torch is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from veil.transforms.models import ModelRegistry

__all__ = ["DCGANGenerator", "load_generator", "sample_latents", "LATENT_DIM", "GENERATOR_MODEL"]  # noqa: F822 - module __getattr__

#: Length of the generator's latent vector.
LATENT_DIM = 100
#: Registry name of the pretrained generator.
GENERATOR_MODEL = "dcgan_celeba32_generator"


def _build_layers() -> Any:
    """The upstream layer stack, with its ``generator_deconv.{i}.{0,1}`` state-dict names.

    1x1 -> 4x4 (256) -> 4x4 (128, a 3x3 conv) -> 8x8 (64) -> 16x16 (32) -> 32x32 (RGB, tanh).
    """
    from torch import nn

    def block(conv: nn.Module, channels: int, *, act: bool) -> nn.Sequential:
        layers: list[nn.Module] = [conv, nn.BatchNorm2d(channels)]
        if act:
            layers.append(nn.LeakyReLU(0.2))
        return nn.Sequential(*layers)

    return nn.Sequential(
        # The first block has no activation in the published model (BatchNorm only).
        block(nn.ConvTranspose2d(LATENT_DIM, 256, 4, 1, 0, bias=False), 256, act=False),
        block(nn.Conv2d(256, 128, 3, 1, 1, bias=False), 128, act=True),
        block(nn.ConvTranspose2d(128, 64, 4, 2, 1, bias=False), 64, act=True),
        block(nn.ConvTranspose2d(64, 32, 4, 2, 1, bias=False), 32, act=True),
        nn.Sequential(nn.ConvTranspose2d(32, 3, 4, 2, 1, bias=True), nn.Tanh()),
    )


@lru_cache(maxsize=1)
def _generator_class() -> type:
    """Define the ``torch.nn.Module`` subclass on first use, so importing this module does not
    import torch (module ``__getattr__`` below hands it out as ``DCGANGenerator``)."""
    import torch

    class DCGANGenerator(torch.nn.Module):
        """DCGAN face generator (keys ``generator_deconv.{0..4}.{0,1}`` as published).

        ``forward(z)`` takes z of shape (N, 100, 1, 1) or (N, 100), drawn from U[-1, 1],
        and returns faces of shape (N, 3, 32, 32) in [-1, 1] (tanh output).
        """

        latent_dim = LATENT_DIM
        image_size = 32

        def __init__(self) -> None:
            super().__init__()
            self.generator_deconv = _build_layers()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            if z.ndim == 2:
                z = z[:, :, None, None]
            if z.ndim != 4 or tuple(z.shape[1:]) != (LATENT_DIM, 1, 1):
                raise ValueError(f"z must be (N, {LATENT_DIM}, 1, 1), got {tuple(z.shape)}")
            return self.generator_deconv(z)

    DCGANGenerator.__module__ = __name__
    return DCGANGenerator


def __getattr__(name: str) -> Any:
    if name == "DCGANGenerator":
        return _generator_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def sample_latents(n: int, *, generator: torch.Generator | None = None, device: str = "cpu") -> torch.Tensor:
    """``n`` latent vectors drawn from U[-1, 1]^100, the distribution the DCGAN was trained on.

    Draws come only from ``generator`` (seed it for reproducible pools), never the global RNG.
    """
    import torch

    z = torch.rand((n, LATENT_DIM, 1, 1), generator=generator, device=device)
    return z * 2.0 - 1.0


def load_generator(registry: ModelRegistry | None = None, *, device: str = "cpu") -> Any:
    """The pretrained DCGAN face generator in eval mode (BatchNorm uses its running stats).

    The state dict is loaded with ``weights_only=True`` and ``strict=True``.
    """
    from veil.transforms.models import ModelRegistry, load_torch_state_dict

    registry = registry if registry is not None else ModelRegistry()
    state = load_torch_state_dict(registry.resolve(GENERATOR_MODEL))
    model = _generator_class()()
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)
