"""Fuzzing decode_image: mutated real photos in every supported format either decode into a
valid image within the limits (which also encodes back) or raise ImageDecodeError."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzz.strategies import mutated_images  # noqa: E402
from fuzz.targets import (  # noqa: E402
    PropertyViolation,
    apply_ops,
    check_decode,
    image_seeds,
)

#: Scales every fuzz test's example count (CI runs 1; raise it locally to search longer).
SCALE = float(os.environ.get("VEIL_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(400 * SCALE), deadline=None, derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seeds(faces_dir):
    return image_seeds(faces_dir)


def test_every_seed_decodes_or_is_refused_as_documented(seeds):
    outcomes = {name: check_decode(data, ext) for name, (data, ext) in seeds.items()}
    # The seed corpus must exercise the decoder, not only its refusals.
    assert outcomes["jpeg-exif6"] == outcomes["png-16bit"] == outcomes["tiff-cmyk"] == "decoded"
    assert outcomes["gif-animated"] == outcomes["tiff-multipage"] == "unsupported_image"


def test_decode_image_survives_mutated_images(seeds):
    pool = [data for data, _ext in seeds.values()]

    @FUZZ
    @given(mutated_images(seeds))
    def run(case):
        name, ops, ext = case
        check_decode(apply_ops(seeds[name][0], ops, pool), ext)

    run()


def test_check_decode_catches_a_broken_contract(seeds, monkeypatch):
    """The property check fails when decode_image raises something undocumented."""
    import veil.transforms.imageio as imageio

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(imageio, "decode_image", broken)
    with pytest.raises(PropertyViolation, match="KeyError"):
        check_decode(seeds["png"][0], "png")


# Regressions found by fuzzing --------------------------------------------------------------


DATA = Path(__file__).resolve().parents[1] / "data" / "fuzz"


def test_image_too_wide_for_its_output_format_is_refused_before_decoding():
    """Fuzzing found a JPEG whose header says 16384x1 (the grey seed with its SOF rewritten):
    stored as .webp it decoded, then EncodeStage failed ("Image size exceeds WebP limit of
    16383 pixels"). It is now refused up front; stored as .jpg or .png it still decodes."""
    from veil.transforms.imageio import ImageDecodeError, decode_image

    data = (DATA / "jpeg-16384x1-grey.jpg").read_bytes()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, ext="webp", max_pixels=1 << 20, max_bytes=1 << 20)
    assert info.value.reason == "unsupported_image"
    assert "16383" in str(info.value)
    assert check_decode(data, "webp") == "unsupported_image"
    assert check_decode(data, "jpg") == check_decode(data, "png") == "decoded"
