"""Decode untrusted image bytes into pixels, and encode anonymized pixels with no metadata.

Everything a dataset image carries besides its pixels (EXIF with GPS and serial numbers, XMP,
IPTC, PNG text chunks, TIFF description tags, JPEG comments, thumbnails) is dropped simply
because nothing is ever copied: the decoder hands out numpy arrays and the encoder builds a
fresh Pillow image from them and saves it with explicit parameters only.

Decoding fails *closed*. Anything that cannot be read completely and unambiguously raises
:class:`ImageDecodeError` with a short ``reason`` code, and :class:`DecodeStage` turns that into
a quarantined sample instead of guessing:

``empty_file``         zero bytes
``too_large``          over ``max_bytes``, or over ``max_pixels`` according to the header
                       (checked before any pixel is decoded, so decompression bombs never are)
``not_an_image``       bytes that no supported image format recognises
``corrupt_image``      a recognised container whose contents cannot be decoded
``truncated_image``    a file that ends early (never half-decoded: Pillow's
                       ``LOAD_TRUNCATED_IMAGES`` is left alone)
``unsupported_image``  readable, but not something the pipeline can anonymize faithfully
                       (animations, multi-page TIFFs, extensions we cannot write back)

Pixel model. Detectors and anonymizers work on ``DecodedImage.rgb`` (HxWx3 uint8, EXIF
orientation applied). What 8-bit RGB cannot represent is kept next to it: ``alpha`` for
transparency and ``native`` for pixels with more precision or other channels than 8-bit RGB
(16-bit and 32-bit greyscale, float, CMYK). The encoder writes the input's family back where
the output format can hold it and blends ``native`` with the anonymized ``rgb`` by the mask, so
pixels outside anonymized regions keep their full precision.

Choices worth knowing:

* ICC profiles are kept (they are colour data, and dropping one without converting the pixels
  shifts the colours of wide-gamut photos), but their header is scrubbed of the creation date,
  device manufacturer/model, creator and profile ID. A profile whose colour space does not
  match the output mode is dropped.
* CMYK JPEGs are written back as CMYK JPEGs; Pillow round-trips them exactly (it writes and
  honours the Adobe marker). ``rgb`` is Pillow's naive CMYK -> RGB conversion, good enough to
  find faces; the original CMYK values survive outside anonymized regions through ``native``.
* Palette images (``P``, ``PA``) are written as RGB or RGBA: re-quantizing anonymized pixels
  into a palette would add error to the whole image, and colour types are cheap.
* Bilevel images (mode ``1``) are written as greyscale ``L``: thresholding a blurred face back
  to two levels would re-introduce edges.
* Alpha cannot go into JPEG or BMP (Pillow writes 32-bit BMPs without an alpha mask, so readers
  ignore the channel). Such an image is composited onto white, which is what a viewer shows.
  This only happens when a file's content does not match its extension, because the output
  always keeps the input's extension.
* JPEGs with extra MPF images (``MPO``: phone photos carrying an HDR gain map, depth map or
  preview) are decoded as their primary image; the extra images are auxiliary data and, like
  all metadata, are never written out. True animations are refused instead, because silently
  turning an animation into a still changes the dataset.
* 16-bit *colour* PNG/TIFF files are reduced to 8 bits per channel by Pillow when they are
  read, so only 16-bit greyscale keeps its full precision.
* Pillow's own decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top
  of ``max_pixels``; it is not raised here because it is process-wide state other code relies
  on. An embedding application that needs ``max_pixels`` above Pillow's limit raises it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import Final

import numpy as np
from PIL import Image, UnidentifiedImageError

from veil.config import ImageIOConfig
from veil.transforms.stage import Resources, Sample, SampleStage, quarantine, strip_working_fields

__all__ = [
    "IMAGE_EXTENSIONS",
    "DecodeStage",
    "DecodedImage",
    "EncodeStage",
    "ImageDecodeError",
    "decode_image",
    "encode_image",
    "image_format_for_ext",
    "is_image_extension",
    "sha256_hex",
    "strip_working_fields",
    "DECODE_FAILURE_REASONS",
]

_EXT_TO_FORMAT: Final[dict[str, str]] = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "tif": "TIFF",
    "tiff": "TIFF",
    "bmp": "BMP",
}

#: Extensions (lowercase, no dot) of the image fields Veil reads and writes.
IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset(_EXT_TO_FORMAT)

#: Formats Pillow may try when identifying input bytes. Restricting the list keeps Pillow's
#: more exotic (and more fragile) plugins away from untrusted data. GIF is readable so that a
#: GIF stored under an image extension is recognised, and refused when it is animated.
_DECODE_FORMATS: Final[tuple[str, ...]] = ("JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF")

#: Formats whose extra frames are auxiliary images rather than content (see module docs).
_AUXILIARY_FRAME_FORMATS: Final[frozenset[str]] = frozenset({"MPO"})
#: Formats whose frame count Pillow finds by walking every frame, and the file size up to
#: which a refused multi-frame file still has its frames counted for the message.
_WALKED_FRAME_FORMATS: Final[frozenset[str]] = frozenset({"GIF", "TIFF"})
_FRAME_COUNT_BYTES: Final = 1 << 16
#: Most scans a JPEG may have (libjpeg-turbo's fuzzers use the same limit); see
#: ``_check_jpeg_scans``.
_MAX_JPEG_SCANS: Final = 500

#: EXIF orientation -> the transpose that makes the pixels upright (as in ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION_TAG: Final = 0x0112

_GREY_MODES: Final[frozenset[str]] = frozenset(
    {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
)
_UINT16_MODES: Final[frozenset[str]] = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

#: Output formats that can hold an input mode's `native` pixels, and the mode written there.
_NATIVE_OUTPUT: Final[dict[str, tuple[frozenset[str], str]]] = {
    **{m: (frozenset({"PNG", "TIFF"}), "I;16") for m in _UINT16_MODES},
    "I": (frozenset({"TIFF"}), "I"),
    "F": (frozenset({"TIFF"}), "F"),
    "CMYK": (frozenset({"JPEG", "TIFF"}), "CMYK"),
}
_ALPHA_FORMATS: Final[frozenset[str]] = frozenset({"PNG", "TIFF", "WEBP"})
#: Longest side an output format can be written with (libwebp; libjpeg's JPEG_MAX_DIMENSION).
_MAX_OUTPUT_SIDE: Final[dict[str, int]] = {"WEBP": 16383, "JPEG": 65500}

#: PNG/TIFF/WebP encoder settings. Fixed values make output bytes a function of the pixels.
_PNG_COMPRESS_LEVEL: Final = 6
_WEBP_METHOD: Final = 4
_TIFF_COMPRESSION: Final = "tiff_lzw"

DECODE_FAILURE_REASONS: Final[frozenset[str]] = frozenset(
    {
        "empty_file",
        "too_large",
        "not_an_image",
        "corrupt_image",
        "truncated_image",
        "unsupported_image",
    }
)


class ImageDecodeError(ValueError):
    """An image could not be decoded safely. ``reason`` is a short code for manifests and
    reports; the message says what was wrong in words."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in DECODE_FAILURE_REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # Keep `reason` when the error crosses a process boundary (Ray, Beam).
        return (type(self), (self.reason, str(self)))


@dataclass(eq=False)
class DecodedImage:
    """Pixels of one decoded image plus what the encoder needs to write it back faithfully.

    All arrays are read-only: ``rgb`` is the pristine reference that the encoder compares the
    anonymized pixels against, so stages work on a copy (``sample["_pixels"]``).
    """

    #: HxWx3 uint8, EXIF orientation applied: what detectors and anonymizers work on.
    rgb: np.ndarray
    #: Pillow format name of the input ("JPEG", "PNG", "WEBP", "TIFF", "BMP"; "GIF" when a
    #: still GIF is stored under an image extension).
    format: str
    #: The input's Pillow mode ("RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "1", ...).
    mode: str
    #: HxW uint8 alpha channel (orientation applied) when the input has transparency.
    alpha: np.ndarray | None = None
    #: Input pixels (orientation applied) that 8-bit RGB cannot represent: HxW uint16 for
    #: 16-bit greyscale, HxW int32 for mode I, HxW float32 for mode F, HxWx4 uint8 for CMYK.
    native: np.ndarray | None = None
    #: EXIF orientation that was applied to the pixels (1 = none).
    orientation: int = 1
    #: The input's ICC profile with identifying header fields zeroed, or None.
    icc_profile: bytes | None = None

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def is_greyscale(self) -> bool:
        """True when the input had no colour, so the output is written as greyscale."""
        return self.mode in _GREY_MODES


def _normalise_ext(ext: str) -> str:
    """Lowercase extension without the dot: "JPG", ".jpg" and WebDataset field names such as
    "image.jpg" all mean "jpg"."""
    return ext.rsplit(".", 1)[-1].strip().lower()


def is_image_extension(ext: str) -> bool:
    """Whether a field name / file extension is an image Veil can read and write."""
    return _normalise_ext(ext) in IMAGE_EXTENSIONS


def image_format_for_ext(ext: str) -> str:
    """Pillow format name for an extension: "jpg" -> "JPEG". Raises ValueError otherwise."""
    try:
        return _EXT_TO_FORMAT[_normalise_ext(ext)]
    except KeyError:
        known = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise ValueError(f"not an image extension: {ext!r} (known: {known})") from None


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of a byte string, recorded for input and output images in the manifest."""
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Decoding


def decode_image(
    data: bytes, *, ext: str | None = None, max_pixels: int, max_bytes: int
) -> DecodedImage:
    """Decode untrusted image bytes, refusing anything that cannot be decoded completely.

    ``ext`` is the extension (or field name) the bytes were stored under; it is used to refuse
    extensions the encoder could not write back and to word error messages. The content
    decides how the bytes are decoded, so a PNG stored as ``.jpg`` still decodes.

    Size limits are enforced before decoding: ``max_bytes`` on the input length and
    ``max_pixels`` on the dimensions read from the header, so an oversized image never gets a
    pixel buffer.
    """
    named = f" (stored as .{_normalise_ext(ext)})" if ext else ""
    if ext is not None and not is_image_extension(ext):
        raise ImageDecodeError(
            "unsupported_image",
            f"extension .{_normalise_ext(ext)} is not one Veil can write back "
            f"(supported: {', '.join(sorted(IMAGE_EXTENSIONS))})",
        )
    if len(data) == 0:
        raise ImageDecodeError("empty_file", f"the image is empty (0 bytes){named}")
    if len(data) > max_bytes:
        raise ImageDecodeError(
            "too_large", f"the image is {len(data)} bytes, over the limit of {max_bytes} bytes"
        )

    try:
        img = Image.open(io.BytesIO(data), formats=list(_DECODE_FORMATS))
    except UnidentifiedImageError:
        sniffed = _sniff_format(data)
        if sniffed is None:
            raise ImageDecodeError(
                "not_an_image",
                f"the bytes{named} are not a JPEG, PNG, WebP, TIFF, BMP or GIF image",
            ) from None
        if _container_truncated(data, sniffed):
            raise ImageDecodeError(
                "truncated_image", f"the {sniffed} file ends before its header is complete"
            ) from None
        raise ImageDecodeError(
            "corrupt_image", f"the {sniffed} header cannot be read{named}"
        ) from None
    except Exception as exc:  # noqa: BLE001 - every decoder failure is classified, never raised raw
        sniffed = _sniff_format(data)
        if sniffed is None:
            # A plugin with a loose signature check (BMP accepts any "BM...") gave up.
            raise ImageDecodeError(
                "not_an_image",
                f"the bytes{named} are not a JPEG, PNG, WebP, TIFF, BMP or GIF image",
            ) from exc
        raise _classify_failure(exc, data, sniffed) from exc

    with img:
        if ext is not None:
            _check_writable_size(img.size, image_format_for_ext(ext))
        return _decode_opened(img, data, max_pixels=max_pixels)


def _check_writable_size(size: tuple[int, int], out_format: str) -> None:
    """Refuse an image the output format cannot hold (found by fuzzing: a 16384x1 JPEG
    stored as .webp decoded, then failed in the encoder), before any pixel is decoded."""
    limit = _MAX_OUTPUT_SIDE.get(out_format)
    if limit is not None and max(size) > limit:
        raise ImageDecodeError(
            "unsupported_image",
            f"the image is {size[0]}x{size[1]}; {out_format} cannot be written with a side "
            f"over {limit} pixels, so it could not be released in its format",
        )


def _check_jpeg_scans(data: bytes) -> None:
    """Refuse a JPEG with more scans than any encoder writes, before decoding it.

    Each scan of a progressive JPEG is a pass over the whole image, so scans cost time
    without costing bytes: 3,000 empty scans over a 4000x4000 image are a 96 KB file that
    took 17.5 s to decode (measured, Pillow 12 / libjpeg-turbo), and ``max_bytes`` allows
    millions. libjpeg-turbo leaves the limit to the caller (TurboJPEG's scan limit,
    ``djpeg -maxscans``) and Pillow does not set one. Entropy-coded data stuff every 0xFF
    byte, so ``FF DA`` occurs only as a start-of-scan marker (or inside metadata, which can
    only over-count).
    """
    scans = data.count(b"\xff\xda")
    if scans > _MAX_JPEG_SCANS:
        raise ImageDecodeError(
            "too_large",
            f"the JPEG has {scans} scans, over the limit of {_MAX_JPEG_SCANS} (encoders write "
            "about 10; each scan is a pass over the whole image); it was not decoded",
        )


def _decode_opened(img: Image.Image, data: bytes, *, max_pixels: int) -> DecodedImage:
    fmt = img.format or _sniff_format(data) or "unknown"
    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(
            "corrupt_image", f"the {fmt} header gives a size of {width}x{height}"
        )
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_large",
            f"the {fmt} image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} pixels; it was not decoded",
        )

    try:
        # is_animated looks for a second frame only; n_frames walks every frame of a GIF or
        # TIFF (0.35 ms per TIFF page: a 200 MB file of tiny pages would take minutes).
        multi_frame = bool(getattr(img, "is_animated", False))
        n_frames = (
            int(getattr(img, "n_frames", 1))
            if multi_frame and (fmt not in _WALKED_FRAME_FORMATS or len(data) <= _FRAME_COUNT_BYTES)
            else None
        )
    except Exception as exc:  # noqa: BLE001 - reading frame headers can fail
        raise _classify_failure(exc, data, fmt) from exc
    if multi_frame and fmt not in _AUXILIARY_FRAME_FORMATS:
        kind = "multi-page" if fmt == "TIFF" else "animated"
        count = f"{n_frames} frames" if n_frames else "more than one frame"
        raise ImageDecodeError(
            "unsupported_image",
            f"{kind} {fmt} with {count}: only single-frame images can be anonymized "
            "(decoding the first frame would silently drop the others)",
        )
    if fmt in ("JPEG", "MPO"):
        _check_jpeg_scans(data)

    try:
        img.load()
    except Exception as exc:  # noqa: BLE001 - classified into a reason code
        raise _classify_failure(exc, data, fmt) from exc

    orientation = _exif_orientation(img)
    mode = img.mode
    icc = _sanitize_icc(img.info.get("icc_profile"))
    upright: Image.Image = img
    if orientation in _ORIENTATION_TRANSPOSE:
        upright = img.transpose(_ORIENTATION_TRANSPOSE[orientation])

    try:
        rgb, alpha, native = _split_pixels(upright)
    except ValueError as exc:  # Pillow cannot convert this mode
        raise ImageDecodeError(
            "unsupported_image", f"{fmt} images in mode {mode} are not supported: {exc}"
        ) from exc

    for array in (rgb, alpha, native):
        if array is not None:
            array.setflags(write=False)
    return DecodedImage(
        rgb=rgb,
        format="JPEG" if fmt == "MPO" else fmt,
        mode=mode,
        alpha=alpha,
        native=native,
        orientation=orientation if orientation in _ORIENTATION_TRANSPOSE else 1,
        icc_profile=icc,
    )


def _exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, or 1 when there is none or the EXIF block is unreadable.

    Unreadable EXIF is common in the wild and only affects display orientation, so it does not
    fail the image; the output carries no orientation tag either way.
    """
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
        return int(value)
    except Exception:  # noqa: BLE001 - malformed EXIF, see docstring
        return 1


def _split_pixels(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Split an upright image into (rgb, alpha, native) as described on DecodedImage."""
    mode = img.mode
    if mode in _UINT16_MODES or mode in ("I", "F"):
        dtype = {"I": np.int32, "F": np.float32}.get(mode, np.uint16)
        native = np.array(img).astype(dtype, copy=False)
        lo, hi = _native_range(native, mode)
        return _grey_to_rgb(_native_to_u8(native, lo, hi)), None, native
    if mode == "CMYK":
        return np.array(img.convert("RGB")), None, np.array(img)
    transparent = img.has_transparency_data
    if mode in ("1", "L") and not transparent:
        return _grey_to_rgb(np.array(img.convert("L"))), None, None
    if mode in ("1", "L", "LA", "La"):  # greyscale with alpha or a transparent grey level
        la = np.array(img.convert("LA"))
        return _grey_to_rgb(la[..., 0]), np.ascontiguousarray(la[..., 1]), None
    if not transparent:
        # RGB, P without transparency, RGBX, YCbCr, LAB, ...: colour without alpha.
        return np.array(img.convert("RGB")), None, None
    # RGBA, RGBa, PA, P/RGB with a transparency key.
    rgba = np.array(img.convert("RGBA"))
    return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]), None


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def _native_range(native: np.ndarray, mode: str) -> tuple[float, float]:
    """The native values that map to 0 and 255 in `rgb`.

    16-bit data uses the full uint16 range (so rgb = native / 257, as a viewer shows it). 32-bit
    integer data in the 16-bit range is treated the same way; other 32-bit and float data have
    no conventional white point and are stretched over their own finite range, so faces are as
    visible to the detector as in an auto-levelled viewer.
    """
    if mode in _UINT16_MODES:
        return 0.0, 65535.0
    finite = native[np.isfinite(native)] if native.dtype.kind == "f" else native
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if mode == "I" and lo >= 0 and hi <= 65535:
        return 0.0, 65535.0
    if hi <= lo:
        return lo, lo + 1.0
    return lo, hi


def _native_to_u8(native: np.ndarray, lo: float, hi: float) -> np.ndarray:
    work = _work_dtype(native)
    scaled = (np.nan_to_num(native.astype(work), nan=lo) - work(lo)) * work(255.0 / (hi - lo))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _u8_to_native(grey: np.ndarray, lo: float, hi: float, work: type[np.floating]) -> np.ndarray:
    return work(lo) + grey.astype(work) * work((hi - lo) / 255.0)


def _sanitize_icc(profile: object) -> bytes | None:
    """Keep an ICC profile's colour data, zeroing the header fields that identify where and
    when it was made: creation date, device manufacturer and model, creator, profile ID.

    Anything that is not a well-formed ICC profile is dropped.
    """
    if not isinstance(profile, bytes) or len(profile) < 128 or profile[36:40] != b"acsp":
        return None
    header = bytearray(profile[:128])
    header[24:36] = bytes(12)  # date and time of creation
    header[48:56] = bytes(8)  # device manufacturer and model
    header[80:100] = bytes(20)  # profile creator, profile ID (MD5; zero means "not computed")
    return bytes(header) + profile[128:]


def _icc_colour_space(profile: bytes) -> bytes:
    return profile[16:20]


# Failure classification ---------------------------------------------------------------------


def _sniff_format(data: bytes) -> str | None:
    """Recognise a container by its signature, to tell damaged images from non-images."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    # "BM" alone is too common in text; also require a known DIB header size.
    if data[:2] == b"BM" and len(data) >= 18:
        if int.from_bytes(data[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124):
            return "BMP"
    return None


def _container_truncated(data: bytes, fmt: str | None) -> bool | None:
    """Whether a (failed) file of a known format lacks the end its container requires; None
    when the format has no end marker or length field to tell."""
    if fmt in ("JPEG", "MPO"):
        return not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" not in data
    if fmt == "WEBP":
        return len(data) < 12 or int.from_bytes(data[4:8], "little") + 8 > len(data)
    if fmt == "BMP":
        return int.from_bytes(data[2:6], "little") > len(data)
    if fmt == "GIF":
        return not data.rstrip(b"\x00").endswith(b";")
    return None


def _classify_failure(exc: BaseException, data: bytes, fmt: str | None) -> ImageDecodeError:
    """Turn an exception from Pillow into a reason code and a readable message."""
    if isinstance(exc, ImageDecodeError):
        return exc
    what = fmt or "image"
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageDecodeError("too_large", f"Pillow refused the {what} as too large: {detail}")
    if isinstance(exc, MemoryError):
        return ImageDecodeError("too_large", f"out of memory decoding the {what}")
    # The container's own structure is the better witness; Pillow says "truncated" whenever a
    # read runs short, which garbage length fields in a complete file also cause.
    truncated = _container_truncated(data, fmt)
    if truncated is None:
        truncated = "truncated" in detail.lower()
    if truncated:
        return ImageDecodeError("truncated_image", f"the {what} file is truncated: {detail}")
    return ImageDecodeError("corrupt_image", f"the {what} cannot be decoded: {detail}")


# --------------------------------------------------------------------------------------------
# Encoding


def encode_image(
    decoded: DecodedImage,
    rgb: np.ndarray,
    *,
    mask: np.ndarray | None,
    ext: str,
    jpeg_quality: int,
) -> bytes:
    """Encode (possibly anonymized) pixels in the format named by ``ext``, with no metadata.

    ``rgb`` is HxWx3 uint8 in the geometry of ``decoded.rgb``. ``mask`` (HxW, values in [0, 1])
    says how much each pixel was changed; None means "all changed". It only matters where the
    input had ``native`` pixels: there the output is the anonymized ``rgb`` lifted into the
    native space, plus the original's native detail weighted by ``1 - mask``, so untouched
    pixels come out exactly as they went in. A pixel that differs from ``decoded.rgb`` although
    the mask says 0 is treated as fully changed (the mask is never trusted to un-anonymize).

    Output bytes depend only on the arguments: every encoder option is fixed.
    """
    fmt = image_format_for_ext(ext)
    height, width = decoded.height, decoded.width
    if rgb.shape != (height, width, 3) or rgb.dtype != np.uint8:
        raise ValueError(
            f"pixels must be a {height}x{width}x3 uint8 array like the decoded image, "
            f"got shape {rgb.shape} dtype {rgb.dtype}"
        )
    if mask is not None and mask.shape != (height, width):
        raise ValueError(
            f"mask must be {height}x{width} like the decoded image, got shape {mask.shape}"
        )

    native_output = _NATIVE_OUTPUT.get(decoded.mode)
    if decoded.native is not None and native_output is not None and fmt in native_output[0]:
        image = _native_image(decoded, rgb, _change_weight(decoded, rgb, mask), native_output[1])
    else:
        # 8-bit output: `rgb` already is the final image, there is nothing to restore.
        image = _eight_bit_image(decoded, rgb, fmt)
    return _save(image, fmt, jpeg_quality=jpeg_quality, icc_profile=decoded.icc_profile)


def _change_weight(decoded: DecodedImage, rgb: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Per-pixel weight of the anonymized pixels: the mask, raised to 1 wherever the pixels
    differ from the original although the mask says 0 (and NaN counts as changed)."""
    if mask is None:
        return np.ones((decoded.height, decoded.width), dtype=np.float32)
    weight = np.clip(np.nan_to_num(mask.astype(np.float32), nan=1.0), 0.0, 1.0)
    changed = np.any(rgb != decoded.rgb, axis=2)
    weight[changed & (weight == 0.0)] = 1.0
    return weight


def _native_image(
    decoded: DecodedImage, rgb: np.ndarray, weight: np.ndarray, out_mode: str
) -> Image.Image:
    """Blend anonymized pixels into the native ones: ``F(rgb) + (native - F(orig)) * (1 - w)``.

    F lifts 8-bit pixels into native space. Where w = 0 (and rgb equals the original) this is
    exactly ``native``; where w = 1 it is ``F(rgb)``; in a feathered edge it equals blending
    the original and the anonymized content in native space, provided the anonymizer blended
    linearly in 8 bits.
    """
    native = decoded.native
    if native is None:
        raise ValueError("the decoded image has no native pixels")
    work = _work_dtype(native)
    keep = (1.0 - weight).astype(work)
    if decoded.mode == "CMYK":
        lifted = _rgb_to_naive_cmyk(rgb, work)
        residual = native.astype(work) - _rgb_to_naive_cmyk(decoded.rgb, work)
        out = lifted + residual * keep[..., None]
        return Image.frombytes(
            "CMYK", (decoded.width, decoded.height), _to_dtype(out, np.uint8).tobytes()
        )

    lo, hi = _native_range(native, decoded.mode)
    lifted = _u8_to_native(_luma(rgb), lo, hi, work)
    original = _u8_to_native(_luma(decoded.rgb), lo, hi, work)
    # np.where, not multiplication: NaN * 0 would leak NaNs into fully anonymized pixels.
    residual = np.where(keep > 0.0, (native.astype(work) - original) * keep, work(0))
    out = lifted + residual
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[out_mode]
    return Image.fromarray(_to_dtype(out, dtype))


def _to_dtype(values: np.ndarray, dtype: type[np.generic]) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return np.ascontiguousarray(values, dtype=dtype)
    info = np.iinfo(dtype)
    return np.ascontiguousarray(np.clip(np.rint(values), info.min, info.max), dtype=dtype)


def _work_dtype(native: np.ndarray) -> type[np.floating]:
    """Float type for blending: float32 holds every uint8/uint16 value (and float32 input)
    exactly at half the memory of float64; 32-bit integers need float64."""
    return np.float64 if native.dtype == np.int32 else np.float32


def _rgb_to_naive_cmyk(rgb: np.ndarray, work: type[np.floating]) -> np.ndarray:
    """Pillow's RGB -> CMYK conversion (C = 255 - R, ..., K = 0), as float for blending."""
    cmy = work(255) - rgb.astype(work)
    return np.concatenate([cmy, np.zeros(rgb.shape[:2] + (1,), dtype=work)], axis=2)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma with Pillow's integer weights, which sum to 2**16 so that a grey pixel
    (R = G = B) maps to itself exactly."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _eight_bit_image(decoded: DecodedImage, rgb: np.ndarray, fmt: str) -> Image.Image:
    """Build the 8-bit output image in the input's family, as far as ``fmt`` allows."""
    alpha = decoded.alpha
    if alpha is not None and fmt not in _ALPHA_FORMATS:
        # JPEG/BMP cannot carry alpha (see module docs): show it as a viewer would, on white.
        a = alpha.astype(np.uint32)[..., None]
        rgb = ((rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        alpha = None
    if decoded.is_greyscale and fmt != "WEBP":  # WebP has no greyscale colour type
        grey = _luma(rgb)
        if alpha is not None:
            return Image.fromarray(np.ascontiguousarray(np.stack([grey, alpha], axis=2)))
        return Image.fromarray(grey)
    if alpha is not None:
        return Image.fromarray(
            np.ascontiguousarray(np.concatenate([rgb, alpha[..., None]], axis=2))
        )
    return Image.fromarray(np.ascontiguousarray(rgb))


def _save(image: Image.Image, fmt: str, *, jpeg_quality: int, icc_profile: bytes | None) -> bytes:
    """Save a freshly built image with explicit options only.

    ``image`` comes from raw arrays, so its ``info`` is empty and Pillow has no EXIF, XMP,
    text chunks, comments or TIFF tags to copy; no metadata option is ever passed.
    """
    options: dict[str, object] = {}
    if icc_profile is not None and fmt != "BMP":
        expected = {
            "L": b"GRAY",
            "LA": b"GRAY",
            "I;16": b"GRAY",
            "I": b"GRAY",
            "F": b"GRAY",
            "CMYK": b"CMYK",
        }.get(image.mode, b"RGB ")
        if _icc_colour_space(icc_profile) == expected:
            options["icc_profile"] = icc_profile
    if fmt == "JPEG":
        options.update(
            quality=jpeg_quality,
            optimize=False,
            progressive=False,
            # 4:2:0 is what cameras write; CMYK and greyscale keep full resolution per channel.
            subsampling="4:2:0" if image.mode == "RGB" else "4:4:4",
        )
    elif fmt == "PNG":
        options.update(compress_level=_PNG_COMPRESS_LEVEL, optimize=False)
    elif fmt == "WEBP":
        # exact=False lets libwebp discard colour under fully transparent pixels: fine, and
        # one less place for hidden content to survive.
        options.update(quality=jpeg_quality, method=_WEBP_METHOD, lossless=False, exact=False)
    elif fmt == "TIFF":
        options.update(compression=_TIFF_COMPRESSION)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------
# Stages


class DecodeStage(SampleStage):
    """Decode each sample's image into ``_decoded`` / ``_pixels``; quarantine what cannot be.

    Sets ``input_sha256`` before decoding, so failures are traceable to their input bytes.
    """

    name = "decode"
    resources = Resources(cpus=0.5)

    def __init__(self, config: ImageIOConfig, *, batch_size: int = SampleStage.batch_size) -> None:
        self.config = config
        self.batch_size = batch_size

    def process_sample(self, sample: Sample) -> Sample:
        field = sample.get("__image__")
        data = sample.get(field) if isinstance(field, str) else None
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return quarantine(sample, f"missing_image: no image bytes under field {field!r}")
        data = bytes(data)
        sample["input_sha256"] = sha256_hex(data)
        try:
            decoded = decode_image(
                data, ext=field, max_pixels=self.config.max_pixels, max_bytes=self.config.max_bytes
            )
        except ImageDecodeError as exc:
            return quarantine(sample, f"{exc.reason}: {exc}")
        sample["_decoded"] = decoded
        sample["_pixels"] = decoded.rgb.copy()  # writable working copy; decoded.rgb stays pristine
        sample["width"] = decoded.width
        sample["height"] = decoded.height
        sample["input_format"] = decoded.format
        sample["input_mode"] = decoded.mode
        return sample


class EncodeStage(SampleStage):
    """Encode ``_pixels`` back into the sample's image field, in the format of its extension.

    ``_decoded`` and ``_pixels`` stay in the sample for the re-scan stage; call
    :func:`strip_working_fields` before the sample is written.
    """

    name = "encode"
    resources = Resources(cpus=0.5)

    def __init__(self, config: ImageIOConfig, *, batch_size: int = SampleStage.batch_size) -> None:
        self.config = config
        self.batch_size = batch_size

    def process_sample(self, sample: Sample) -> Sample:
        decoded = sample.get("_decoded")
        pixels = sample.get("_pixels")
        if not isinstance(decoded, DecodedImage) or not isinstance(pixels, np.ndarray):
            raise RuntimeError("sample has no decoded pixels; DecodeStage must run before encode")
        field = sample["__image__"]
        mask = sample.get("_mask")
        if mask is None and np.array_equal(pixels, decoded.rgb):
            # Nothing was changed and no stage set a mask: keep full native precision.
            mask = np.zeros((decoded.height, decoded.width), dtype=np.float32)
        data = encode_image(
            decoded, pixels, mask=mask, ext=field, jpeg_quality=self.config.jpeg_quality
        )
        sample[field] = data
        sample["output_sha256"] = sha256_hex(data)
        return sample
