"""Tests for veil.transforms.imageio: decoding untrusted bytes, encoding without metadata."""

from __future__ import annotations

import io
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile

from veil.config import ImageIOConfig
from veil.transforms.imageio import (
    IMAGE_EXTENSIONS,
    DecodedImage,
    DecodeStage,
    EncodeStage,
    ImageDecodeError,
    decode_image,
    encode_image,
    image_format_for_ext,
    is_image_extension,
    sha256_hex,
    strip_working_fields,
)
from veil.transforms.stage import QUARANTINED

FACES_DIR = Path("/work/shared/data/faces")
LIMITS = {"max_pixels": 80_000_000, "max_bytes": 200 * 1024 * 1024}
FORMAT_OF = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "tif": "TIFF", "bmp": "BMP"}
LOSSLESS = {"png", "tif", "bmp"}


# Helpers ------------------------------------------------------------------------------------


def smooth_rgb(height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth, asymmetric colour image: lossy codecs reproduce it closely."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)],
        axis=2,
    ).astype(np.uint8)


def quadrants(height: int = 32, width: int = 48) -> np.ndarray:
    """Four flat colour blocks (no rotation or mirror maps it onto itself)."""
    out = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    out[:h, :w] = (255, 0, 0)
    out[:h, w:] = (0, 255, 0)
    out[h:, :w] = (0, 0, 255)
    out[h:, w:] = (255, 255, 0)
    return out


def block_centres(image: np.ndarray) -> np.ndarray:
    """The colours at the centres of an image's four quadrants (robust to JPEG edge ringing)."""
    h, w = image.shape[:2]
    return np.array(
        [image[y, x] for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)], dtype=int
    )


def save(image: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(data: bytes, ext: str | None = "png", **limits: int) -> DecodedImage:
    return decode_image(data, ext=ext, **{**LIMITS, **limits})


def reencode(data: bytes, ext: str, *, quality: int = 92) -> tuple[DecodedImage, bytes]:
    decoded = decode(data, ext)
    return decoded, encode_image(
        decoded, decoded.rgb.copy(), mask=None, ext=ext, jpeg_quality=quality
    )


def reopen(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_error(data: bytes, ext: str | None = "jpg", **limits: int) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode(data, ext, **limits)
    return info.value


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge size, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def png_chunk_types(data: bytes) -> list[bytes]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kinds.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return kinds


def jpeg_markers(data: bytes) -> list[int]:
    """Marker codes of a JPEG's header segments, up to the start of scan."""
    assert data[:2] == b"\xff\xd8"
    pos, markers = 2, []
    while pos < len(data):
        assert data[pos] == 0xFF, f"expected a marker at {pos}"
        marker = data[pos + 1]
        markers.append(marker)
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        pos += 2 + length
    return markers


def webp_chunk_types(data: bytes) -> list[bytes]:
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    pos, kinds = 12, []
    while pos + 8 <= len(data):
        kind = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        kinds.append(kind)
        pos += 8 + size + (size & 1)
    return kinds


def srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def exif_with_secrets(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "VeilSecretMake"  # Make
    exif[0x0110] = "VeilSecretModel"  # Model
    exif[0x013B] = "VeilSecretArtist"  # Artist
    exif[0x0132] = "2024:01:02 03:04:05"  # DateTime
    gps = exif.get_ifd(0x8825)
    gps[1] = "N"
    gps[2] = (52.0, 22.0, 12.5)
    gps[3] = "E"
    gps[4] = (4.0, 53.0, 30.0)
    if orientation is not None:
        exif[0x0112] = orientation
    return exif


XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
    b'<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:CreatorTool="VeilSecretXmp"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def with_iptc_segment(jpeg: bytes) -> bytes:
    """Insert a Photoshop APP13 (IPTC) segment right after SOI."""
    iptc = b"\x1c\x02\x50" + struct.pack(">H", 18) + b"VeilSecretByline!!"  # 2:80 By-line
    resource = (
        b"8BIM" + struct.pack(">H", 0x0404) + b"\x00\x00" + struct.pack(">I", len(iptc)) + iptc
    )
    payload = b"Photoshop 3.0\x00" + resource
    return jpeg[:2] + b"\xff\xed" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


#: Width, length, bits, compression, photometric, strip offsets, samples, rows per strip,
#: strip byte counts, planar config, predictor, extra samples, sample format, ICC profile.
TIFF_STRUCTURAL_TAGS = {256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 338, 339, 34675}


def assert_no_metadata(data: bytes) -> None:
    for needle in (
        b"VeilSecret",
        b"Exif\x00\x00",
        b"http://ns.adobe.com/xap",
        b"Photoshop 3.0",
        b"8BIM",
    ):
        assert needle not in data, needle
    image = reopen(data)
    if image.format == "TIFF":  # a TIFF's "EXIF" is its IFD0: only structural tags allowed
        assert set(image.getexif()) <= TIFF_STRUCTURAL_TAGS, (
            set(image.getexif()) - TIFF_STRUCTURAL_TAGS
        )
    else:
        assert len(image.getexif()) == 0
    for key in ("exif", "xmp", "XML:com.adobe.xmp", "comment", "photoshop", "iptc"):
        assert key not in image.info, key


# Extensions ---------------------------------------------------------------------------------


def test_extensions_and_formats() -> None:
    assert IMAGE_EXTENSIONS == {"jpg", "jpeg", "png", "webp", "tif", "tiff", "bmp"}
    assert (
        is_image_extension("JPG")
        and is_image_extension(".png")
        and is_image_extension("image.webp")
    )
    assert not is_image_extension("gif") and not is_image_extension("json")
    assert image_format_for_ext("jpeg") == "JPEG"
    assert image_format_for_ext("tiff") == "TIFF"
    assert image_format_for_ext("TIF") == "TIFF"
    with pytest.raises(ValueError, match="gif"):
        image_format_for_ext("gif")


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


# Round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(FORMAT_OF))
def test_round_trip_every_format(ext: str) -> None:
    pixels = smooth_rgb()
    decoded, out = reencode(save(pixels, FORMAT_OF[ext]), ext)
    assert decoded.format == FORMAT_OF[ext]
    assert decoded.mode == "RGB"
    assert (decoded.width, decoded.height) == (64, 48)
    assert decoded.rgb.dtype == np.uint8 and decoded.rgb.shape == (48, 64, 3)
    assert decoded.alpha is None and decoded.native is None and decoded.orientation == 1

    back = reopen(out)
    assert back.format == FORMAT_OF[ext]
    assert back.mode == "RGB"
    diff = np.abs(np.asarray(back).astype(int) - pixels.astype(int))
    if ext in LOSSLESS:
        assert diff.max() == 0
    else:
        assert diff.mean() < 3.0, diff.mean()


@pytest.mark.parametrize("ext", ["jpeg", "tiff"])
def test_long_extension_names(ext: str) -> None:
    fmt = image_format_for_ext(ext)
    _, out = reencode(save(smooth_rgb(), fmt), ext)
    assert reopen(out).format == fmt


def test_content_decides_decoding_extension_decides_output() -> None:
    """A PNG stored under .jpg decodes, and is written as the JPEG its extension promises."""
    decoded, out = reencode(save(smooth_rgb(), "PNG"), "jpg")
    assert decoded.format == "PNG"
    assert reopen(out).format == "JPEG"


def test_encode_rejects_pixels_of_the_wrong_shape() -> None:
    decoded = decode(save(smooth_rgb(), "PNG"))
    with pytest.raises(ValueError, match="48x64x3"):
        encode_image(decoded, decoded.rgb[:, :-1].copy(), mask=None, ext="png", jpeg_quality=90)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(decoded, decoded.rgb.astype(np.float32), mask=None, ext="png", jpeg_quality=90)
    with pytest.raises(ValueError, match="mask must be 48x64"):
        encode_image(
            decoded,
            decoded.rgb.copy(),
            mask=np.zeros((64, 48), np.float32),
            ext="png",
            jpeg_quality=90,
        )


def test_decoded_rgb_is_read_only() -> None:
    decoded = decode(save(smooth_rgb(), "PNG"))
    with pytest.raises(ValueError):
        decoded.rgb[0, 0, 0] = 1


# EXIF orientation ---------------------------------------------------------------------------

EXPECTED_ORIENTATION = {
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # stored rotated: turn 90 degrees clockwise to display
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_orientation_applied_jpeg(orientation: int) -> None:
    stored = quadrants()
    data = save(stored, "JPEG", quality=95, exif=exif_with_secrets(orientation))
    decoded = decode(data, "jpg")
    expected = EXPECTED_ORIENTATION[orientation](stored)
    assert decoded.orientation == orientation
    assert decoded.rgb.shape == expected.shape
    assert np.abs(block_centres(decoded.rgb) - block_centres(expected)).max() <= 6

    out = encode_image(decoded, decoded.rgb.copy(), mask=None, ext="jpg", jpeg_quality=95)
    back = reopen(out)
    assert back.getexif().get(0x0112) is None  # no orientation tag: pixels are upright
    assert np.abs(block_centres(np.asarray(back)) - block_centres(expected)).max() <= 6


@pytest.mark.parametrize("orientation", sorted(EXPECTED_ORIENTATION))
def test_exif_orientation_applied_exactly(orientation: int) -> None:
    stored = quadrants()
    stored[0, 0] = (7, 8, 9)  # one marked pixel pins down the exact transform
    rgba = np.concatenate([stored, np.arange(32 * 48, dtype=np.uint8).reshape(32, 48, 1)], axis=2)
    exif = Image.Exif()
    exif[0x0112] = orientation
    decoded = decode(save(rgba, "PNG", exif=exif), "png")
    assert decoded.orientation == orientation
    assert np.array_equal(decoded.rgb, EXPECTED_ORIENTATION[orientation](stored))
    assert np.array_equal(decoded.alpha, EXPECTED_ORIENTATION[orientation](rgba)[..., 3])


def test_orientation_of_16_bit_native_pixels() -> None:
    stored = (np.arange(12 * 20, dtype=np.uint16).reshape(12, 20) * 271).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode(save(stored, "PNG", exif=exif), "png")
    assert np.array_equal(decoded.native, np.rot90(stored, -1))


def test_out_of_range_orientation_is_ignored() -> None:
    exif = Image.Exif()
    exif[0x0112] = 42
    decoded = decode(save(quadrants(), "PNG", exif=exif))
    assert decoded.orientation == 1
    assert np.array_equal(decoded.rgb, quadrants())


# Metadata -----------------------------------------------------------------------------------


def test_jpeg_metadata_removed() -> None:
    data = save(
        smooth_rgb(),
        "JPEG",
        quality=95,
        exif=exif_with_secrets(),
        xmp=XMP,
        comment=b"VeilSecretComment",
    )
    data = with_iptc_segment(data)
    # The input really carries everything the output must not.
    for needle in (
        b"VeilSecretMake",
        b"VeilSecretXmp",
        b"VeilSecretComment",
        b"VeilSecretByline",
        b"GPS",
    ):
        assert needle in data or needle == b"GPS"
    assert {0xE1, 0xED, 0xFE} <= set(jpeg_markers(data))

    _, out = reencode(data, "jpg")
    assert_no_metadata(out)
    markers = jpeg_markers(out)
    assert 0xFE not in markers  # COM
    assert not {0xE1, 0xED} & set(markers)  # APP1 (EXIF/XMP), APP13 (IPTC)


def test_png_metadata_removed() -> None:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Author", "VeilSecretAuthor")
    info.add_text("Comment", "VeilSecretCompressed" * 20, zip=True)
    info.add_itxt("Description", "VeilSecretInternational", lang="en")
    data = save(smooth_rgb(), "PNG", pnginfo=info, exif=exif_with_secrets())
    assert {b"tEXt", b"zTXt", b"iTXt", b"eXIf"} <= set(png_chunk_types(data))

    _, out = reencode(data, "png")
    assert_no_metadata(out)
    assert set(png_chunk_types(out)) <= {b"IHDR", b"IDAT", b"IEND"}
    assert reopen(out).text == {}


def test_webp_metadata_removed() -> None:
    data = save(smooth_rgb(), "WEBP", exif=exif_with_secrets(), xmp=XMP)
    assert {b"EXIF", b"XMP "} <= set(webp_chunk_types(data))
    _, out = reencode(data, "webp")
    assert_no_metadata(out)
    assert not {b"EXIF", b"XMP "} & set(webp_chunk_types(out))


def test_tiff_metadata_removed() -> None:
    from PIL.TiffImagePlugin import ImageFileDirectory_v2

    tags = ImageFileDirectory_v2()
    tags[270] = "VeilSecretDescription"
    tags[305] = "VeilSecretSoftware"
    tags[315] = "VeilSecretArtist"
    tags[306] = "2024:01:02 03:04:05"
    data = save(smooth_rgb(), "TIFF", tiffinfo=tags)
    assert b"VeilSecretArtist" in data

    _, out = reencode(data, "tif")
    assert_no_metadata(out)
    assert b"2024:01:02" not in out
    assert set(reopen(out).tag_v2) <= TIFF_STRUCTURAL_TAGS


def test_icc_profile_kept_with_identifying_header_fields_zeroed() -> None:
    profile = srgb_profile()
    assert profile[24:36] != bytes(12)  # the creation date is set
    for ext in ("jpg", "png", "webp", "tif"):
        decoded, out = reencode(save(smooth_rgb(), FORMAT_OF[ext], icc_profile=profile), ext)
        kept = reopen(out).info.get("icc_profile")
        assert kept == decoded.icc_profile, ext
        assert kept[24:36] == bytes(12) and kept[48:56] == bytes(8) and kept[80:100] == bytes(20)
        assert kept[128:] == profile[128:]  # the colour data itself is untouched
        ImageCms.ImageCmsProfile(io.BytesIO(kept))  # still a usable profile


def test_no_icc_profile_when_input_has_none() -> None:
    _, out = reencode(save(smooth_rgb(), "PNG"), "png")
    assert "icc_profile" not in reopen(out).info
    assert b"iCCP" not in png_chunk_types(out)


def test_rgb_icc_profile_dropped_for_greyscale_output() -> None:
    grey = smooth_rgb()[..., 0]
    data = save(grey, "PNG", icc_profile=srgb_profile())
    decoded, out = reencode(data, "png")
    assert decoded.icc_profile is not None
    assert reopen(out).mode == "L"
    assert "icc_profile" not in reopen(out).info


# Modes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["png", "jpg", "tif", "bmp"])
def test_greyscale_stays_greyscale(ext: str) -> None:
    grey = smooth_rgb()[..., 1]
    decoded, out = reencode(save(grey, FORMAT_OF[ext]), ext)
    assert decoded.mode == "L" and decoded.is_greyscale
    assert np.array_equal(decoded.rgb[..., 0], decoded.rgb[..., 2])
    back = reopen(out)
    assert back.mode == "L"
    tolerance = 0 if ext in LOSSLESS else 3
    assert np.abs(np.asarray(back).astype(int) - grey.astype(int)).max() <= tolerance


def test_greyscale_webp_output_is_rgb_with_grey_values() -> None:
    """WebP has no greyscale colour type, so greyscale input comes back as grey RGB."""
    grey = smooth_rgb()[..., 1]
    decoded = decode(save(grey, "PNG"))
    out = encode_image(decoded, decoded.rgb.copy(), mask=None, ext="webp", jpeg_quality=95)
    back = np.asarray(reopen(out)).astype(int)
    assert np.abs(back - grey[..., None].astype(int)).mean() < 3


def test_anonymized_colour_pixels_in_greyscale_output_use_luma() -> None:
    decoded = decode(save(smooth_rgb()[..., 1], "PNG"))
    pixels = decoded.rgb.copy()
    pixels[:8, :8] = (255, 0, 0)
    out = encode_image(decoded, pixels, mask=None, ext="png", jpeg_quality=90)
    assert np.asarray(reopen(out))[0, 0] == 76  # 0.299 * 255


def test_bilevel_written_as_greyscale() -> None:
    bits = Image.fromarray((quadrants()[..., 0] > 128).astype(np.uint8) * 255).convert("1")
    decoded, out = reencode(save(bits, "PNG"), "png")
    assert decoded.mode == "1"
    back = reopen(out)
    assert back.mode == "L"
    assert set(np.unique(np.asarray(back))) == {0, 255}


@pytest.mark.parametrize("ext", ["png", "tif", "webp"])
def test_rgba_keeps_alpha_exactly(ext: str) -> None:
    rgb = smooth_rgb()
    alpha = np.random.default_rng(3).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
    alpha[:10] = 0
    alpha[-10:] = 255
    data = save(np.concatenate([rgb, alpha[..., None]], axis=2), FORMAT_OF[ext])
    decoded, out = reencode(data, ext)
    assert decoded.mode == "RGBA"
    assert np.array_equal(decoded.alpha, alpha)
    back = reopen(out)
    assert back.mode == "RGBA"
    assert np.array_equal(np.asarray(back)[..., 3], alpha)


def test_la_keeps_alpha_and_greyscale() -> None:
    grey, alpha = smooth_rgb()[..., 0], smooth_rgb()[..., 1]
    decoded, out = reencode(save(np.stack([grey, alpha], axis=2), "PNG"), "png")
    assert decoded.mode == "LA"
    back = reopen(out)
    assert back.mode == "LA"
    assert np.array_equal(np.asarray(back), np.stack([grey, alpha], axis=2))


def test_palette_with_transparency_becomes_rgba() -> None:
    palette_image = Image.fromarray(quadrants()).quantize(colors=4)
    index = np.asarray(palette_image)
    transparent = int(index[0, 0])
    data = save(palette_image, "PNG", transparency=transparent)
    decoded, out = reencode(data, "png")
    assert decoded.mode == "P"
    assert np.array_equal(decoded.alpha, np.where(index == transparent, 0, 255))
    back = reopen(out)
    assert back.mode == "RGBA"  # not re-quantized
    assert np.array_equal(np.asarray(back)[..., 3], decoded.alpha)
    assert np.array_equal(np.asarray(back)[..., :3], decoded.rgb)


def test_palette_without_transparency_becomes_rgb() -> None:
    palette_image = Image.fromarray(quadrants()).quantize(colors=4)
    decoded, out = reencode(save(palette_image, "PNG"), "png")
    assert decoded.mode == "P" and decoded.alpha is None
    back = reopen(out)
    assert back.mode == "RGB"
    assert np.array_equal(np.asarray(back), np.asarray(palette_image.convert("RGB")))


@pytest.mark.parametrize("ext", ["jpg", "bmp"])
def test_alpha_composited_on_white_where_format_has_no_alpha(ext: str) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :8, 3] = 0  # left half transparent: white after compositing
    rgba[:, 8:, 3] = 255  # right half opaque red
    decoded = decode(save(rgba, "PNG"))
    out = encode_image(decoded, decoded.rgb.copy(), mask=None, ext=ext, jpeg_quality=95)
    back = np.asarray(reopen(out)).astype(int)
    assert reopen(out).mode == "RGB"
    assert np.abs(back[4:12, 1:6] - 255).max() <= 3
    assert np.abs(back[4:12, 10:15] - (200, 0, 0)).max() <= 4


def cmyk_pixels() -> np.ndarray:
    y, x = np.mgrid[0:32, 0:40]
    return np.stack([x * 6, y * 7, (x + y) * 3, np.full_like(x, 40)], axis=2).astype(np.uint8)


def test_cmyk_tiff_round_trip_exact_outside_mask() -> None:
    cmyk = cmyk_pixels()
    data = save(Image.frombytes("CMYK", (40, 32), cmyk.tobytes()), "TIFF")
    decoded = decode(data, "tif")
    assert decoded.mode == "CMYK"
    assert np.array_equal(decoded.native, cmyk)
    assert np.array_equal(
        decoded.rgb, np.asarray(Image.frombytes("CMYK", (40, 32), cmyk.tobytes()).convert("RGB"))
    )

    pixels = decoded.rgb.copy()
    pixels[4:12, 5:15] = (10, 20, 30)
    mask = np.zeros((32, 40), np.float32)
    mask[4:12, 5:15] = 1.0
    back = reopen(encode_image(decoded, pixels, mask=mask, ext="tif", jpeg_quality=90))
    assert back.mode == "CMYK"
    out = np.asarray(back)
    assert np.array_equal(out[mask == 0], cmyk[mask == 0])
    assert np.array_equal(out[4:12, 5:15], np.broadcast_to([245, 235, 225, 0], (8, 10, 4)))


def test_cmyk_jpeg_stays_cmyk() -> None:
    cmyk = cmyk_pixels()
    data = save(Image.frombytes("CMYK", (40, 32), cmyk.tobytes()), "JPEG", quality=95)
    decoded = decode(data, "jpg")
    assert decoded.format == "JPEG" and decoded.mode == "CMYK"
    unchanged = np.zeros((32, 40), np.float32)
    back = reopen(
        encode_image(decoded, decoded.rgb.copy(), mask=unchanged, ext="jpg", jpeg_quality=95)
    )
    assert back.mode == "CMYK"
    assert np.abs(np.asarray(back).astype(int) - cmyk.astype(int)).mean() < 3


def sixteen_bit() -> np.ndarray:
    """16-bit greyscale whose values are not multiples of 257, so 8 bits cannot hold them."""
    y, x = np.mgrid[0:40, 0:50]
    return (x * 1301 + y * 17 + 3).astype(np.uint16)


def test_16_bit_png_keeps_precision_outside_mask_and_changes_inside() -> None:
    native = sixteen_bit()
    decoded = decode(save(native, "PNG"), "png")
    assert decoded.mode == "I;16"
    assert decoded.native.dtype == np.uint16 and np.array_equal(decoded.native, native)
    assert np.array_equal(decoded.rgb[..., 0], np.rint(native / 257).astype(np.uint8))

    pixels = decoded.rgb.copy()
    pixels[10:20, 10:30] = 0
    pixels[25, 40] = 100  # half-anonymized feather pixel
    mask = np.zeros((40, 50), np.float32)
    mask[10:20, 10:30] = 1.0
    mask[25, 40] = 0.5
    back = reopen(encode_image(decoded, pixels, mask=mask, ext="png", jpeg_quality=90))
    assert back.mode == "I;16"
    out = np.asarray(back).astype(np.int64)
    assert np.array_equal(out[mask == 0], native[mask == 0])
    assert np.all(out[10:20, 10:30] == 0)
    # Feather: the 8-bit result lifted to 16 bits plus half the original's sub-8-bit detail.
    original8 = int(decoded.rgb[25, 40, 0])
    assert out[25, 40] == round(100 * 257 + 0.5 * (int(native[25, 40]) - original8 * 257))


def test_16_bit_pixels_changed_outside_the_mask_count_as_changed() -> None:
    native = sixteen_bit()
    decoded = decode(save(native, "PNG"))
    pixels = decoded.rgb.copy()
    pixels[0, 0] = 200
    out = np.asarray(
        reopen(
            encode_image(
                decoded, pixels, mask=np.zeros((40, 50), np.float32), ext="png", jpeg_quality=90
            )
        )
    )
    assert out[0, 0] == 200 * 257
    assert np.array_equal(out[1:], native[1:])


def test_16_bit_tiff_and_8_bit_fallback_for_jpeg() -> None:
    native = sixteen_bit()
    decoded, out = reencode(save(native, "TIFF"), "tif")
    assert reopen(out).mode == "I;16"
    # mask=None means everything changed: the 16-bit output is the 8-bit pixels lifted.
    assert np.array_equal(np.asarray(reopen(out)), decoded.rgb[..., 0].astype(np.uint16) * 257)

    jpeg = encode_image(decoded, decoded.rgb.copy(), mask=None, ext="jpg", jpeg_quality=95)
    assert reopen(jpeg).mode == "L"


def test_float_tiff_keeps_values_outside_mask() -> None:
    values = np.linspace(-0.5, 2.0, 30 * 20, dtype=np.float32).reshape(20, 30)
    decoded = decode(save(values, "TIFF"), "tif")
    assert decoded.mode == "F"
    assert decoded.rgb[0, 0, 0] == 0 and decoded.rgb[-1, -1, 0] == 255  # stretched for detection
    pixels = decoded.rgb.copy()
    pixels[:5] = 255
    mask = np.zeros((20, 30), np.float32)
    mask[:5] = 1
    out = np.asarray(reopen(encode_image(decoded, pixels, mask=mask, ext="tif", jpeg_quality=90)))
    assert out.dtype == np.float32
    assert np.array_equal(out[5:], values[5:])
    assert np.allclose(out[:5], 2.0)


# Refusals -----------------------------------------------------------------------------------


def test_header_bomb_beyond_pillows_limit_is_too_large() -> None:
    err = decode_error(png_header_only(100_000, 100_000), "png")
    assert err.reason == "too_large"


def test_pixel_limit_checked_before_pixels_are_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse_to_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse_to_load)
    err = decode_error(png_header_only(9_000, 9_000), "png", max_pixels=80_000_000)
    assert err.reason == "too_large" and "81000000" in str(err)

    err = decode_error(save(smooth_rgb(), "JPEG"), "jpg", max_pixels=1_000)
    assert err.reason == "too_large"


def test_byte_limit() -> None:
    data = save(smooth_rgb(), "PNG")
    assert decode_error(data, "png", max_bytes=len(data) - 1).reason == "too_large"
    assert decode(data, "png", max_bytes=len(data)).width == 64


def test_empty_file() -> None:
    assert decode_error(b"").reason == "empty_file"


@pytest.mark.parametrize(
    "data",
    [
        b"This is a text file that someone named photo.jpg\n" * 4,
        b"BMW 320i, 2004, blue\n",  # starts like a BMP
        np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    ],
    ids=["text", "text-starting-BM", "random"],
)
def test_not_an_image(data: bytes) -> None:
    err = decode_error(data, "jpg")
    assert err.reason == "not_an_image"
    assert ".jpg" in str(err)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp", "bmp", "tif"])
def test_truncated(ext: str) -> None:
    data = save(
        np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8), FORMAT_OF[ext]
    )
    assert decode_error(data[: len(data) // 2], ext).reason == "truncated_image"


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_inside_header(ext: str) -> None:
    data = save(smooth_rgb(), FORMAT_OF[ext])
    assert decode_error(data[:30], ext).reason == "truncated_image"


def test_jpeg_without_end_marker_is_truncated() -> None:
    data = save(smooth_rgb(), "JPEG")
    assert decode_error(data[:-2], "jpg").reason == "truncated_image"


def test_corrupt_png_data() -> None:
    data = bytearray(
        save(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8), "PNG")
    )
    start = data.find(b"IDAT") + 40
    data[start : start + 64] = bytes(64)
    err = decode_error(bytes(data), "png")
    assert err.reason == "corrupt_image"


def test_corrupt_jpeg_header() -> None:
    data = bytearray(save(smooth_rgb(), "JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 2 : sof + 12] = b"\xff" * 10  # garbage frame header, file still ends with EOI
    err = decode_error(bytes(data), "jpg")
    assert err.reason == "corrupt_image"


def frames() -> list[Image.Image]:
    return [Image.fromarray(quadrants()), Image.fromarray(255 - quadrants())]


@pytest.mark.parametrize(("fmt", "ext"), [("GIF", "png"), ("WEBP", "webp"), ("TIFF", "tif")])
def test_multi_frame_images_are_unsupported(fmt: str, ext: str) -> None:
    first, *rest = frames()
    data = save(first, fmt, save_all=True, append_images=rest)
    err = decode_error(data, ext)
    assert err.reason == "unsupported_image"
    assert "2 frames" in str(err)


def test_single_frame_gif_content_decodes() -> None:
    decoded = decode(save(quadrants(), "GIF"), "png")
    assert decoded.format == "GIF" and decoded.mode == "P"
    assert np.array_equal(decoded.rgb, quadrants())


def test_jpeg_with_auxiliary_mpf_images_decodes_primary_image() -> None:
    first, *rest = frames()
    data = save(first, "MPO", save_all=True, append_images=rest, quality=95)
    decoded, out = reencode(data, "jpg")
    assert decoded.format == "JPEG"
    assert np.abs(block_centres(decoded.rgb) - block_centres(quadrants())).max() <= 6
    assert getattr(reopen(out), "n_frames", 1) == 1  # the auxiliary image is not written


def test_extension_that_cannot_be_written_back() -> None:
    err = decode_error(save(quadrants(), "GIF"), "gif")
    assert err.reason == "unsupported_image"


def test_decode_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(ImageDecodeError("truncated_image", "cut short")))
    assert err.reason == "truncated_image" and str(err) == "cut short"
    with pytest.raises(ValueError):
        ImageDecodeError("bad_reason", "x")


# Determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(FORMAT_OF))
@pytest.mark.parametrize("kind", ["rgb", "rgba", "grey16"])
def test_encoding_is_deterministic(ext: str, kind: str) -> None:
    source = {
        "rgb": lambda: save(smooth_rgb(), "PNG", icc_profile=srgb_profile()),
        "rgba": lambda: save(np.concatenate([smooth_rgb(), smooth_rgb()[..., :1]], axis=2), "PNG"),
        "grey16": lambda: save(sixteen_bit(), "PNG"),
    }[kind]()
    outputs = set()
    for _ in range(2):
        decoded = decode(source)
        pixels = decoded.rgb.copy()
        pixels[5:15, 5:15] = 128
        mask = np.zeros((decoded.height, decoded.width), np.float32)
        mask[5:15, 5:15] = 1.0
        outputs.add(encode_image(decoded, pixels, mask=mask, ext=ext, jpeg_quality=90))
    assert len(outputs) == 1


# Stages -------------------------------------------------------------------------------------


def make_sample(key: str, data: bytes, ext: str = "jpg") -> dict:
    return {
        "__key__": key,
        "__shard__": "s0",
        "__index__": 0,
        "__image__": ext,
        ext: data,
        "txt": b"caption",
    }


def test_decode_stage_quarantines_bad_sample_and_keeps_going() -> None:
    good = save(smooth_rgb(), "JPEG")
    bad = b"not an image at all"
    stage = DecodeStage(ImageIOConfig(), batch_size=8)
    assert stage.name == "decode" and stage.resources.cpus == 0.5 and stage.batch_size == 8

    batch = stage.process_batch(
        [make_sample("a", good), make_sample("b", bad), make_sample("c", good)]
    )
    assert [s["__key__"] for s in batch] == ["a", "b", "c"]
    a, b, c = batch

    assert b["status"] == QUARANTINED
    assert b["reason"].startswith("not_an_image: ")
    assert b["input_sha256"] == sha256_hex(bad)
    assert "_decoded" not in b

    for sample in (a, c):
        assert sample.get("status") != QUARANTINED
        assert sample["input_sha256"] == sha256_hex(good)
        decoded = sample["_decoded"]
        assert isinstance(decoded, DecodedImage)
        assert (sample["width"], sample["height"]) == (64, 48)
        assert sample["input_format"] == "JPEG" and sample["input_mode"] == "RGB"
        assert np.array_equal(sample["_pixels"], decoded.rgb)
        assert not np.shares_memory(sample["_pixels"], decoded.rgb)
        sample["_pixels"][0, 0] = 0  # the working copy is writable
        assert "decode" in sample["timings"]


def test_decode_stage_reports_too_large_from_config() -> None:
    stage = DecodeStage(ImageIOConfig(max_pixels=100))
    [sample] = stage.process_batch([make_sample("a", save(smooth_rgb(), "PNG"), "png")])
    assert sample["status"] == QUARANTINED and sample["reason"].startswith("too_large: ")


def test_decode_stage_quarantines_missing_image_field() -> None:
    sample = {"__key__": "a", "__shard__": "s0", "__index__": 0, "__image__": "jpg"}
    [out] = DecodeStage(ImageIOConfig()).process_batch([sample])
    assert out["status"] == QUARANTINED and out["reason"].startswith("missing_image")


def test_encode_stage_round_trip_and_strip() -> None:
    config = ImageIOConfig(jpeg_quality=90)
    data = save(smooth_rgb(), "PNG", exif=exif_with_secrets())
    [sample] = DecodeStage(config).process_batch([make_sample("a", data, "png")])
    sample["_pixels"][:10, :10] = 0
    sample["_mask"] = np.zeros((48, 64), np.float32)
    sample["_mask"][:10, :10] = 1

    [sample] = EncodeStage(config).process_batch([sample])
    out = sample["png"]
    assert sample["output_sha256"] == sha256_hex(out) != sample["input_sha256"]
    assert_no_metadata(out)
    assert np.all(np.asarray(reopen(out))[:10, :10] == 0)
    assert "_decoded" in sample and "_pixels" in sample  # kept for the re-scan stage
    assert sample["txt"] == b"caption"

    strip_working_fields(sample)
    assert not [k for k in sample if k.startswith("_") and not k.startswith("__")]
    assert {"__key__", "__shard__", "__index__", "__image__"} <= set(sample)


def test_encode_stage_keeps_16_bit_precision_when_nothing_changed() -> None:
    native = sixteen_bit()
    config = ImageIOConfig()
    [sample] = DecodeStage(config).process_batch([make_sample("a", save(native, "PNG"), "png")])
    [sample] = EncodeStage(config).process_batch([sample])  # no _mask set by any stage
    assert np.array_equal(np.asarray(reopen(sample["png"])), native)


def test_encode_stage_quarantines_sample_without_pixels() -> None:
    [sample] = EncodeStage(ImageIOConfig()).process_batch([make_sample("a", b"x")])
    assert sample["status"] == QUARANTINED and sample["reason"].startswith("encode_error")


def test_quarantined_samples_pass_through_encode_untouched() -> None:
    [sample] = DecodeStage(ImageIOConfig()).process_batch([make_sample("a", b"")])
    assert sample["reason"].startswith("empty_file")
    [sample] = EncodeStage(ImageIOConfig()).process_batch([sample])
    assert sample["jpg"] == b"" and "output_sha256" not in sample


# Real photos --------------------------------------------------------------------------------

FACE_FILES = (
    sorted(p for p in FACES_DIR.glob("*") if is_image_extension(p.suffix))
    if FACES_DIR.is_dir()
    else []
)


@pytest.mark.skipif(not FACE_FILES, reason=f"no sample photos in {FACES_DIR}")
@pytest.mark.parametrize("path", FACE_FILES, ids=[p.name for p in FACE_FILES])
def test_real_photos_decode_and_reencode(path: Path) -> None:
    data = path.read_bytes()
    ext = path.suffix.lstrip(".")
    decoded, out = reencode(data, ext)
    original = Image.open(path)
    assert decoded.format == original.format
    assert decoded.rgb.shape[2] == 3 and decoded.rgb.dtype == np.uint8
    assert_no_metadata(out)
    again = decode(out, ext)
    assert (again.width, again.height) == (decoded.width, decoded.height)
    diff = np.abs(again.rgb.astype(int) - decoded.rgb.astype(int)).mean()
    assert diff < (0.01 if ext == "png" else 3.0), diff
