"""The pretrained DCGAN face generator (veil.transforms.generators)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from veil.transforms.generators import (  # noqa: E402
    GENERATOR_MODEL,
    DCGANGenerator,
    load_generator,
    sample_latents,
)
from veil.transforms.models import ModelRegistry, load_torch_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def generator(models_dir):
    return load_generator(ModelRegistry(models_dir=str(models_dir)))


def test_state_dict_keys_match_the_published_file_exactly(models_dir):
    state = load_torch_state_dict(ModelRegistry(models_dir=str(models_dir)).resolve(GENERATOR_MODEL))
    model = DCGANGenerator()
    assert set(state) == set(model.state_dict())
    assert all(k.startswith("generator_deconv.") for k in state)
    model.load_state_dict(state, strict=True)  # every key and shape


def test_generates_faces_in_range_deterministically(generator):
    assert isinstance(generator, DCGANGenerator) and not generator.training
    z = sample_latents(6, generator=torch.Generator().manual_seed(7))
    assert z.shape == (6, 100, 1, 1) and z.min() >= -1 and z.max() <= 1
    with torch.inference_mode():
        x = generator(z)
        again = generator(sample_latents(6, generator=torch.Generator().manual_seed(7)))
        other = generator(sample_latents(6, generator=torch.Generator().manual_seed(8)))
    assert x.shape == (6, 3, 32, 32)
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, again)
    assert not torch.allclose(x, other)
    # Real faces, not a collapsed or untrained output: varied samples with full contrast.
    assert x.std() > 0.3 and x.std(dim=0).mean() > 0.1
    # (N, 100) latents are accepted too.
    with torch.inference_mode():
        assert torch.equal(generator(z.flatten(1)), x)


def test_wrong_latent_shape_is_an_error(generator):
    with pytest.raises(ValueError, match=r"\(N, 100, 1, 1\)"):
        generator(torch.zeros(1, 64, 1, 1))
