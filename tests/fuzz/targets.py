"""Fuzz targets for the readers of untrusted input: seed corpora, mutators, property checks.

Each ``check_*`` function runs one input through the code under test and raises
:class:`PropertyViolation` when the reader breaks its contract (an exception other than the
documented one, a sample lost without trace, a result over the limits); otherwise it returns a
short outcome label, so a driver can tell what the inputs exercised. Mutations are plain tuples
(``("flip", pos, bit)``, ``("dims", w, h)``...) applied by :func:`apply_ops`, so a failing input
is reproducible from its repr and hypothesis can shrink it.

Nothing here imports hypothesis or atheris: the bounded tests (``tests/fuzz/test_fuzz_*.py``)
and the long runs (``benchmarks/fuzz.py``) share these checks.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import math
import struct
import tarfile
import types
import typing
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Limits the decoder runs under here: small, so "never over limits" is cheap to break.
DECODE_MAX_PIXELS = 1 << 20
DECODE_MAX_BYTES = 1 << 20
#: Member size limit the tar reader runs under (the driver passes ``io.max_bytes``).
TAR_MAX_MEMBER_BYTES = 1 << 20

#: Header dimensions worth trying: zero, tiny, 16-bit and 32-bit edges, over any limit.
INTERESTING_DIMS = (0, 1, 2, 3, 255, 256, 4095, 16383, 16384, 65535, 65536, 100_000,
                    (1 << 24) - 1, (1 << 31) - 1, (1 << 32) - 1)
#: Integers worth writing over header fields.
INTERESTING_INTS = (0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
                    0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)


class PropertyViolation(AssertionError):
    """The code under test broke its contract on this input."""


# -------------------------------------------------------------------------------------------
# Byte mutations shared by every target


def _u(value: int, width: int, big: bool) -> bytes:
    return (value & ((1 << (8 * width)) - 1)).to_bytes(width, "big" if big else "little")


def apply_ops(data: bytes, ops: Sequence[tuple], pool: Sequence[bytes] = ()) -> bytes:
    """Apply mutation ops in order. Positions are taken modulo the current length, so any
    integer is valid and shrinking towards 0 keeps an op meaningful."""
    out = bytes(data)
    for op in ops:
        out = apply_op(out, op, pool)
    return out


def apply_op(data: bytes, op: tuple, pool: Sequence[bytes] = ()) -> bytes:
    kind = op[0]
    n = len(data)
    buf = bytearray(data)
    if kind == "flip":
        if n:
            buf[op[1] % n] ^= 1 << (op[2] % 8)
        return bytes(buf)
    if kind == "set":
        if n:
            buf[op[1] % n] = op[2] % 256
        return bytes(buf)
    if kind == "truncate":
        return data[: op[1] % (n + 1)]
    if kind == "insert":
        i = op[1] % (n + 1)
        return data[:i] + bytes(op[2]) + data[i:]
    if kind == "delete":
        i = op[1] % (n + 1)
        return data[:i] + data[i + op[2]:]
    if kind == "dup":
        i = op[1] % (n + 1)
        return data[: i + op[2]] + data[i:i + op[2]] + data[i + op[2]:]
    if kind == "splice":
        if not pool:
            return data
        other = pool[op[2] % len(pool)]
        return data[: op[1] % (n + 1)] + other[op[3] % (len(other) + 1):]
    if kind == "int":
        _, pos, width, value, big = op
        if n < width:
            return data
        i = pos % (n - width + 1)
        buf[i:i + width] = _u(value, width, big)
        return bytes(buf)
    if kind == "dims":
        return set_dimensions(data, op[1], op[2])
    if kind == "png_chunk":
        return insert_png_chunk(data, op[1], _payload(op[2]), op[3])
    raise ValueError(f"unknown mutation {op!r}")


def first_difference(a: bytes, b: bytes) -> int | None:
    """Offset of the first byte where ``b`` differs from ``a`` (None when equal)."""
    if a == b:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


# Format-aware mutations ---------------------------------------------------------------------

_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def set_dimensions(data: bytes, width: int, height: int) -> bytes:
    """Rewrite the image size in the header of a JPEG, PNG (CRC fixed), GIF, BMP, WebP or TIFF,
    leaving the pixel data alone; other bytes come back unchanged."""
    buf = bytearray(data)
    n = len(buf)
    if data.startswith(b"\x89PNG\r\n\x1a\n") and n >= 33 and data[12:16] == b"IHDR":
        buf[16:20] = _u(width, 4, True)
        buf[20:24] = _u(height, 4, True)
        buf[29:33] = _u(zlib.crc32(bytes(buf[12:29])), 4, True)
    elif data.startswith(b"\xff\xd8"):
        i = 2
        while i + 9 <= n and buf[i] == 0xFF:
            marker = buf[i + 1]
            if marker in _JPEG_SOF:
                buf[i + 5:i + 7] = _u(height, 2, True)
                buf[i + 7:i + 9] = _u(width, 2, True)
                break
            i += 2 + int.from_bytes(buf[i + 2:i + 4], "big")
    elif data[:6] in (b"GIF87a", b"GIF89a") and n >= 10:
        buf[6:8] = _u(width, 2, False)
        buf[8:10] = _u(height, 2, False)
    elif data[:2] == b"BM" and n >= 26:
        if int.from_bytes(data[14:18], "little") == 12:
            buf[18:20] = _u(width, 2, False)
            buf[20:22] = _u(height, 2, False)
        else:
            buf[18:22] = _u(width, 4, False)
            buf[22:26] = _u(height, 4, False)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP" and n >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 ":
            buf[26:28] = _u(width & 0x3FFF, 2, False)
            buf[28:30] = _u(height & 0x3FFF, 2, False)
        elif chunk == b"VP8L":
            bits = ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
            bits |= int.from_bytes(data[21:25], "little") & ~((1 << 28) - 1)
            buf[21:25] = _u(bits, 4, False)
        elif chunk == b"VP8X":
            buf[24:27] = _u(width - 1, 3, False)
            buf[27:30] = _u(height - 1, 3, False)
    elif data[:4] in (b"II*\x00", b"MM\x00*") and n >= 8:
        _set_tiff_dimensions(buf, width, height)
    return bytes(buf)


def _set_tiff_dimensions(buf: bytearray, width: int, height: int) -> None:
    big = buf[:2] == b"MM"
    order = "big" if big else "little"
    ifd = int.from_bytes(buf[4:8], order)
    if ifd + 2 > len(buf):
        return
    count = int.from_bytes(buf[ifd:ifd + 2], order)
    for k in range(count):
        entry = ifd + 2 + 12 * k
        if entry + 12 > len(buf):
            return
        tag = int.from_bytes(buf[entry:entry + 2], order)
        if tag in (256, 257):
            buf[entry + 2:entry + 4] = _u(4, 2, big)  # LONG, so 32-bit values fit
            buf[entry + 4:entry + 8] = _u(1, 4, big)
            buf[entry + 8:entry + 12] = _u(width if tag == 256 else height, 4, big)


def png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return (_u(len(payload), 4, True) + ctype + payload
            + _u(zlib.crc32(ctype + payload), 4, True))


def insert_png_chunk(data: bytes, ctype: bytes, payload: bytes, where: int) -> bytes:
    """Insert a well-formed chunk (valid CRC, so the reader gets past the check) at the
    ``where``-th chunk boundary of a PNG; non-PNG bytes come back unchanged."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    bounds = [8]
    i = 8
    while i + 12 <= len(data):
        i += 12 + int.from_bytes(data[i:i + 4], "big")
        if i <= len(data):
            bounds.append(i)
    at = bounds[where % len(bounds)]
    return data[:at] + png_chunk(ctype, payload) + data[at:]


def _exif_with_orientation(value: int) -> bytes:
    """A minimal little-endian EXIF block holding only an orientation tag."""
    ifd = struct.pack("<HHHIHH", 1, 0x0112, 3, 1, value & 0xFFFF, 0) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd


#: Named payloads for chunk insertion; hypothesis picks a name or raw bytes.
PAYLOADS: dict[str, Callable[[], bytes]] = {
    "exif-orient-6": lambda: _exif_with_orientation(6),
    "exif-orient-0": lambda: _exif_with_orientation(0),
    "exif-orient-65535": lambda: _exif_with_orientation(65535),
    "exif-garbage": lambda: b"II*\x00\xff\xff\xff\x7f" + b"\xff" * 16,
    "actl-2": lambda: struct.pack(">II", 2, 0),
    "actl-0": lambda: struct.pack(">II", 0, 0),
    "actl-huge": lambda: struct.pack(">II", 0xFFFFFFFF, 0),
    "iccp-bomb": lambda: b"icc\0\0" + zlib.compress(b"\0" * (4 << 20), 9),
    "ztxt-bomb": lambda: b"Comment\0\0" + zlib.compress(b"A" * (4 << 20), 9),
    "itxt-bomb": lambda: b"XML:com.adobe.xmp\0\1\0\0\0" + zlib.compress(b"B" * (4 << 20), 9),
    "plte-short": lambda: b"\0\0",
    "trns-long": lambda: b"\xff" * 300,
    "ihdr-16bit-rgba": lambda: struct.pack(">IIBBBBB", 8, 8, 16, 6, 0, 0, 0),
    "idat-garbage": lambda: b"\x78\x9c" + b"\xff" * 40,
    "idat-bomb": lambda: zlib.compress(b"\0" * (8 << 20), 9),
}

PNG_CHUNK_TYPES = (b"eXIf", b"acTL", b"fcTL", b"iCCP", b"zTXt", b"iTXt", b"tEXt", b"PLTE",
                   b"tRNS", b"IHDR", b"IDAT", b"IEND", b"sBIT", b"gAMA", b"cHRM", b"pHYs",
                   b"fdAT", b"sRGB", b"bKGD")

_payload_cache: dict[str, bytes] = {}


def _payload(spec: bytes | str) -> bytes:
    if isinstance(spec, bytes):
        return spec
    if spec not in _payload_cache:
        _payload_cache[spec] = PAYLOADS[spec]()
    return _payload_cache[spec]


def random_ops(rng: Any, n_pool: int, *, max_ops: int = 4, png: bool = False) -> list[tuple]:
    """Random mutation ops (for the long runs without hypothesis): ``rng`` is random.Random."""
    ops: list[tuple] = []
    for _ in range(rng.randint(1, max_ops)):
        kind = rng.choice(["flip", "flip", "set", "truncate", "insert", "delete", "dup",
                           "splice", "int", "int", "dims"] + (["png_chunk"] * 2 if png else []))
        pos = rng.randrange(1 << 20)
        if kind == "flip":
            ops.append(("flip", pos, rng.randrange(8)))
        elif kind == "set":
            ops.append(("set", pos, rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])))
        elif kind == "truncate":
            ops.append(("truncate", pos))
        elif kind == "insert":
            ops.append(("insert", pos, rng.randbytes(rng.choice([1, 4, 16, 512]))))
        elif kind == "delete":
            ops.append(("delete", pos, rng.choice([1, 4, 16, 512])))
        elif kind == "dup":
            ops.append(("dup", pos, rng.choice([1, 8, 64, 512])))
        elif kind == "splice":
            ops.append(("splice", pos, rng.randrange(max(n_pool, 1)), rng.randrange(1 << 20)))
        elif kind == "int":
            ops.append(("int", pos, rng.choice([1, 2, 4]), rng.choice(INTERESTING_INTS),
                        rng.random() < 0.5))
        elif kind == "dims":
            ops.append(("dims", rng.choice(INTERESTING_DIMS), rng.choice(INTERESTING_DIMS)))
        else:
            payload = rng.choice([*PAYLOADS, rng.randbytes(rng.randrange(64))])
            ops.append(("png_chunk", rng.choice(PNG_CHUNK_TYPES), payload, rng.randrange(8)))
    return ops


# -------------------------------------------------------------------------------------------
# Image decoding


def _face_rgb(faces_dir: Path, name: str, side: int) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(faces_dir / name) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        img.thumbnail((side, side))
        return np.asarray(img)


def _save(img: Any, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **options)
    return buf.getvalue()


def image_seeds(faces_dir: Path, side: int = 24) -> dict[str, tuple[bytes, str]]:
    """Small re-encodings of real photos in every format and flavour the decoder handles:
    name -> (bytes, extension it would be stored under)."""
    from PIL import Image, ImageCms

    rgb = _face_rgb(faces_dir, "grace_hopper.jpg", side)
    other = _face_rgb(faces_dir, "astronaut.png", side)
    img = Image.fromarray(rgb)
    h, w = rgb.shape[:2]
    alpha = Image.fromarray(np.linspace(0, 255, h * w).reshape(h, w).astype(np.uint8))
    rgba = img.copy()
    rgba.putalpha(alpha)
    grey = img.convert("L")
    grey16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    palette = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()

    def exif(orientation: int) -> bytes:
        e = Image.Exif()
        e[0x0112] = orientation
        return e.tobytes()

    frames = [img, Image.fromarray(other).resize(img.size)]
    seeds: dict[str, tuple[bytes, str]] = {
        "jpeg": (_save(img, "JPEG", quality=80), "jpg"),
        "jpeg-progressive": (_save(img, "JPEG", quality=70, progressive=True), "jpeg"),
        "jpeg-exif6": (_save(img, "JPEG", exif=exif(6)), "jpg"),
        "jpeg-icc": (_save(img, "JPEG", icc_profile=icc), "jpg"),
        "jpeg-cmyk": (_save(img.convert("CMYK"), "JPEG"), "jpg"),
        "jpeg-grey": (_save(grey, "JPEG"), "jpg"),
        "png": (_save(img, "PNG"), "png"),
        "png-rgba": (_save(rgba, "PNG"), "png"),
        "png-palette-trns": (_save(palette, "PNG", transparency=0), "png"),
        "png-la": (_save(rgba.convert("LA"), "PNG"), "png"),
        "png-16bit": (_save(grey16, "PNG"), "png"),
        "png-1bit": (_save(img.convert("1"), "PNG"), "png"),
        "png-icc-exif8": (_save(img, "PNG", icc_profile=icc, exif=exif(8)), "png"),
        "webp": (_save(img, "WEBP", quality=60), "webp"),
        "webp-lossless-alpha": (_save(rgba, "WEBP", lossless=True), "webp"),
        "webp-exif3": (_save(img, "WEBP", exif=exif(3)), "webp"),
        "webp-animated": (_save(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
                          "webp"),
        "gif": (_save(palette, "GIF"), "png"),
        "gif-animated": (_save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
                         "png"),
        "tiff": (_save(img, "TIFF"), "tif"),
        "tiff-lzw-exif6": (_save(img, "TIFF", compression="tiff_lzw", exif=exif(6)), "tiff"),
        "tiff-16bit": (_save(grey16, "TIFF"), "tif"),
        "tiff-cmyk": (_save(img.convert("CMYK"), "TIFF"), "tif"),
        "tiff-float": (_save(grey.convert("F"), "TIFF"), "tif"),
        "tiff-int32": (_save(grey.convert("I"), "TIFF"), "tif"),
        "tiff-rgba": (_save(rgba, "TIFF", compression="tiff_deflate"), "tif"),
        "tiff-multipage": (_save(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
                           "tif"),
        "bmp": (_save(img, "BMP"), "bmp"),
        "bmp-palette": (_save(palette, "BMP"), "bmp"),
        "bmp-1bit": (_save(img.convert("1"), "BMP"), "bmp"),
        "bmp-rgba": (_save(rgba, "BMP"), "bmp"),
    }
    for name, compression in (("tiff-jpeg", "jpeg"), ("tiff-group4", "group4")):
        try:  # libtiff codecs: present in Pillow's wheels, but not guaranteed
            source = img.convert("1") if compression == "group4" else img
            seeds[name] = (_save(source, "TIFF", compression=compression), "tif")
        except (OSError, ValueError):
            pass
    return seeds


def check_decode(data: bytes, ext: str | None) -> str:
    """decode_image either returns a valid image within the limits, or raises
    ImageDecodeError with a known reason. A decoded image must also encode back under its
    extension and decode again (what EncodeStage and the re-scan do next)."""
    from veil.transforms.imageio import (
        DECODE_FAILURE_REASONS,
        ImageDecodeError,
        decode_image,
        encode_image,
        is_image_extension,
    )

    try:
        decoded = decode_image(data, ext=ext, max_pixels=DECODE_MAX_PIXELS,
                               max_bytes=DECODE_MAX_BYTES)
    except ImageDecodeError as exc:
        if exc.reason not in DECODE_FAILURE_REASONS or not str(exc):
            raise PropertyViolation(f"ImageDecodeError without a known reason: {exc!r}") from exc
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - anything else is the bug being looked for
        raise PropertyViolation(
            f"decode_image raised {type(exc).__name__}: {exc}") from exc

    rgb = decoded.rgb
    if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3
            and rgb.shape[2] == 3):
        raise PropertyViolation(f"rgb is not HxWx3 uint8: {getattr(rgb, 'shape', rgb)!r}")
    h, w = rgb.shape[:2]
    if h < 1 or w < 1 or h * w > DECODE_MAX_PIXELS:
        raise PropertyViolation(f"decoded {w}x{h} is empty or over {DECODE_MAX_PIXELS} pixels")
    if rgb.flags.writeable:
        raise PropertyViolation("decoded rgb is writable")
    if decoded.alpha is not None and decoded.alpha.shape != (h, w):
        raise PropertyViolation(f"alpha shape {decoded.alpha.shape} != {(h, w)}")
    if decoded.native is not None and decoded.native.shape[:2] != (h, w):
        raise PropertyViolation(f"native shape {decoded.native.shape} != {(h, w)}")
    if ext is None or not is_image_extension(ext):
        return "decoded"
    try:
        out = encode_image(decoded, rgb.copy(), mask=None, ext=ext, jpeg_quality=90)
    except Exception as exc:  # noqa: BLE001
        raise PropertyViolation(
            f"a decoded {decoded.format} {decoded.mode} image cannot be encoded as .{ext}: "
            f"{type(exc).__name__}: {exc}") from exc
    try:
        again = decode_image(out, ext=ext, max_pixels=DECODE_MAX_PIXELS, max_bytes=1 << 30)
    except Exception as exc:  # noqa: BLE001
        raise PropertyViolation(
            f"the .{ext} written for a {decoded.format} {decoded.mode} image does not decode: "
            f"{exc!r}") from exc
    if (again.width, again.height) != (w, h):
        raise PropertyViolation(f"re-encoded size {again.width}x{again.height} != {w}x{h}")
    return "decoded"


# -------------------------------------------------------------------------------------------
# WebDataset tar shards


def _tiny_images() -> dict[str, bytes]:
    from PIL import Image

    img = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    return {"jpg": _save(img, "JPEG"), "png": _save(img, "PNG")}


def _members(images: dict[str, bytes], long_names: bool) -> list[tuple[str, bytes | None, bytes]]:
    """(name, data or None for a non-file, typeflag) of a seed shard."""
    jpg, png = images["jpg"], images["png"]
    members: list[tuple[str, bytes | None, bytes]] = [
        ("s0.jpg", jpg, tarfile.REGTYPE), ("s0.json", b'{"a": 1}', tarfile.REGTYPE),
        ("s0.txt", b"a caption", tarfile.REGTYPE),
        ("dir/", None, tarfile.DIRTYPE),
        ("dir/s1.png", png, tarfile.REGTYPE), ("dir/s1.cls", b"3", tarfile.REGTYPE),
        ("._s2.jpg", b"resource fork", tarfile.REGTYPE), ("__meta__", b"meta", tarfile.REGTYPE),
        ("s3.jpg", b"s0.jpg", tarfile.SYMTYPE),
        ("s4.jpg", jpg, tarfile.REGTYPE), ("s4.seg.png", png, tarfile.REGTYPE),
        ("s0.cls", b"7", tarfile.REGTYPE),
        ("caf\u00e9/s5.jpeg", jpg, tarfile.REGTYPE), ("noext", b"x", tarfile.REGTYPE),
        ("s6.webp", b"RIFF\0\0\0\0WEBP", tarfile.REGTYPE), ("s6.s6.txt", b"", tarfile.REGTYPE),
    ]
    if long_names:
        members.insert(6, ("d" * 90 + "/" + "k" * 120 + ".jpg", jpg, tarfile.REGTYPE))
    return members


def _tar(members: Sequence[tuple[str, bytes | None, bytes]], fmt: int,
         pax: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for name, data, kind in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = 1_700_000_000
            if kind == tarfile.SYMTYPE:
                info.linkname = (data or b"").decode()
                tf.addfile(info)
            elif kind == tarfile.DIRTYPE:
                tf.addfile(info)
            else:
                info.size = len(data or b"")
                if pax and name == members[0][0]:
                    info.pax_headers = dict(pax)
                tf.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def _header_checksum(block: bytearray) -> None:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)


def _gnu_sparse_tar(jpg: bytes, realsize: int) -> bytes:
    """A GNU old-style sparse member ('S'): one 512-byte chunk at the end of ``realsize``
    bytes of holes, followed by a normal sample. tarfile cannot write these."""
    chunk = (jpg + bytes(512))[:512]
    info = tarfile.TarInfo("sp.jpg")
    info.size = 512
    block = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    block[156:157] = tarfile.GNUTYPE_SPARSE
    block[386:398] = b"%011o\0" % (realsize - 512)
    block[398:410] = b"%011o\0" % 512
    block[482] = 0
    block[483:495] = b"%011o\0" % realsize
    _header_checksum(block)
    tail = _tar([("s9.jpg", jpg, tarfile.REGTYPE)], tarfile.GNU_FORMAT)
    return bytes(block) + chunk + tail


def tar_seeds() -> dict[str, bytes]:
    """Seed shards: ustar, GNU (long names), pax (long and unicode names, odd pax keys,
    GNU sparse 0.1 and 1.0 maps), GNU old-style sparse, an empty archive."""
    images = _tiny_images()
    ustar = [m for m in _members(images, long_names=False) if m[0] != "caf\u00e9/s5.jpeg"]
    seeds = {
        "ustar": _tar(ustar, tarfile.USTAR_FORMAT),
        "gnu": _tar(_members(images, long_names=True), tarfile.GNU_FORMAT),
        "pax": _tar(_members(images, long_names=True), tarfile.PAX_FORMAT),
        "pax-odd-keys": _tar(_members(images, long_names=False), tarfile.PAX_FORMAT,
                             pax={"comment": "x" * 600, "mtime": "1e300", "uid": "-1",
                                  "hdrcharset": "BINARY"}),
        "pax-sparse-0.1": _tar([("sp.jpg", images["jpg"], tarfile.REGTYPE),
                                ("s9.jpg", images["jpg"], tarfile.REGTYPE)],
                               tarfile.PAX_FORMAT,
                               pax={"GNU.sparse.map": "0,100,900000000,200",
                                    "GNU.sparse.size": "900000200",
                                    "GNU.sparse.name": "sp.jpg"}),
        "pax-sparse-1.0": _tar([("sp.jpg", b"1\n0\n300\n".ljust(512, b"\0") + images["jpg"],
                                 tarfile.REGTYPE),
                                ("s9.jpg", images["jpg"], tarfile.REGTYPE)],
                               tarfile.PAX_FORMAT,
                               pax={"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                    "GNU.sparse.name": "sp.jpg",
                                    "GNU.sparse.realsize": "300"}),
        "gnu-sparse-huge": _gnu_sparse_tar(images["jpg"], realsize=1 << 32),
        "gnu-sparse-small": _gnu_sparse_tar(images["jpg"], realsize=4096),
        "empty": _tar([], tarfile.USTAR_FORMAT),
    }
    return seeds


#: ustar header fields: name -> (offset, length).
TAR_FIELDS = {"name": (0, 100), "mode": (100, 8), "size": (124, 12), "chksum": (148, 8),
              "typeflag": (156, 1), "linkname": (157, 100), "magic": (257, 8),
              "prefix": (345, 155), "sparse": (386, 96), "realsize": (483, 12)}
TAR_FIELD_VALUES: dict[str, tuple[bytes, ...]] = {
    "name": (b"../../etc/x.jpg", b"/abs/x.jpg", b"a//b.jpg", b"./x.jpg", b"", b"x.jpg/",
             b"\xff\xfe.jpg", b"a.JPG", b"x/.jpg", b"a.b.c.png", b"k" * 100, b"__key__.jpg",
             b"s0.jpg", b"s0.status", b"s0._x.jpg"),
    "mode": (b"0000777\0", b"9999999\0", b"\xff" * 8),
    "size": (b"00000000000\0", b"77777777777\0", b"\x80" + b"\0" * 7 + b"\xff" * 4,
             b"\xff" * 12, b"00000001000\0", b"0000001000 ", b"-0000000001\0", b"1e9\0"),
    "chksum": (b"0000000\0", b"\xff" * 8),
    "typeflag": (b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"L", b"K", b"x", b"g",
                 b"S", b"V", b"M", b"\0", b"Z"),
    "linkname": (b"s0.jpg", b"../../../etc/passwd", b"/etc/shadow", b"" , b"k" * 100),
    "magic": (b"ustar\x0000", b"ustar  \0", b"\0" * 8, b"garbage!"),
    "prefix": (b"pre", b"../..", b"\xff" * 155),
    "sparse": (b"%011o\0%011o\0" % (1 << 30, 512), b"\xff" * 96,
               b"%011o\0%011o\0" % (0, 1 << 32)),
    "realsize": (b"%011o\0" % (1 << 32), b"00000000000\0", b"\xff" * 12),
}


def tar_header_offsets(data: bytes) -> list[int]:
    """Offsets of the 512-byte blocks of a tar that parse as headers."""
    offsets = []
    for off in range(0, len(data) - 511, 512):
        block = data[off:off + 512]
        if block.count(0) == 512:
            continue
        try:
            tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            continue
        offsets.append(off)
    return offsets


def set_tar_field(data: bytes, header: int, field: str, value: bytes, fix_checksum: bool) -> bytes:
    """Overwrite one field of the ``header``-th header (modulo their number)."""
    offsets = tar_header_offsets(data)
    if not offsets:
        return data
    base = offsets[header % len(offsets)]
    start, length = TAR_FIELDS[field]
    buf = bytearray(data)
    block = bytearray(buf[base:base + 512])
    block[start:start + length] = value[:length].ljust(length, b"\0")
    if fix_checksum and field != "chksum":
        _header_checksum(block)
    buf[base:base + 512] = block
    return bytes(buf)


def apply_tar_ops(data: bytes, ops: Sequence[tuple], pool: Sequence[bytes] = ()) -> bytes:
    """Byte ops plus ``("field", header, name, value, fix_checksum)``."""
    out = data
    for op in ops:
        if op[0] == "field":
            out = set_tar_field(out, op[1], op[2], op[3], op[4])
        else:
            out = apply_op(out, op, pool)
    return out


def random_tar_ops(rng: Any, n_pool: int) -> list[tuple]:
    ops: list[tuple] = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.6:
            field = rng.choice(sorted(TAR_FIELD_VALUES))
            ops.append(("field", rng.randrange(32), field, rng.choice(TAR_FIELD_VALUES[field]),
                        rng.random() < 0.8))
        else:
            ops.extend(random_ops(rng, n_pool, max_ops=1))
    return ops


def _memory_url(data: bytes, name: str) -> tuple[Any, str]:
    import uuid

    import fsspec

    fs = fsspec.filesystem("memory")
    path = f"/veil-fuzz/{uuid.uuid4().hex}/{name}"
    fs.pipe(path, data)
    return fs, path


def _reference_members(raw: bytes) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Members that tarfile's random-access reader lists, up to its first error, with the
    data of regular ones (None when it cannot be read)."""
    found: list[tuple[tarfile.TarInfo, bytes | None]] = []
    try:
        tf = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")
    except Exception:  # noqa: BLE001 - not even a first header: nothing to account for
        return found
    while True:
        try:
            info = tf.next()
        except Exception:  # noqa: BLE001
            break
        if info is None:
            break
        data = None
        if info.isreg() and info.size <= TAR_MAX_MEMBER_BYTES:
            try:
                member = tf.extractfile(info)
                data = member.read() if member is not None else None
            except Exception:  # noqa: BLE001
                data = None
        found.append((info, data))
    return found


def _name_aliases(raw: str) -> set[str]:
    """The forms a member name may take in samples and skip lists: as stored, escaped
    (``repr``) and normalised, whichever the reader uses."""
    from veil.pipelines import sources

    aliases = {raw, repr(raw)}
    escape = getattr(sources, "escape_name", None)
    if escape is not None:
        aliases.add(escape(raw))  # skip lists show long names cut short
    normalise = getattr(sources, "safe_relative_name", None)
    if normalise is not None:
        try:
            aliases.add(normalise(raw))
        except ValueError:
            pass
    return aliases


def check_tar(data: bytes, *, gz: bool = False, damaged_from: int | None = None) -> str:
    """TarSource.read_shard yields samples and quarantined samples and never raises; yielded
    keys are unique; every member tarfile can list is accounted for (its key yielded, or the
    member reported as skipped) unless a shard-level row says the shard breaks off before
    it; released bytes are the member's bytes.

    ``data`` is the uncompressed tar; ``gz`` gzips it for the reader. ``damaged_from`` is
    the offset of the first byte that was mutated (None: untouched, so no shard-level
    failure is acceptable).
    """
    from veil.pipelines.sources import TarSource, split_key
    from veil.transforms.stage import PENDING, QUARANTINED

    name = "shard.tar.gz" if gz else "shard.tar"
    fs, path = _memory_url(gzip.compress(data, mtime=0) if gz else data, name)
    try:
        source = TarSource([f"memory://{path}"], max_member_bytes=TAR_MAX_MEMBER_BYTES)
        (shard,) = source.list_shards()
        try:
            samples = list(source.read_shard(shard))
        except Exception as exc:  # noqa: BLE001
            raise PropertyViolation(f"read_shard raised {type(exc).__name__}: {exc}") from exc
        skipped = {s.path for s in source.skipped()}
    finally:
        fs.rm(path)

    shard_rows = [s for s in samples if s["__key__"].startswith(shard.id + "#")]
    keys = [s["__key__"] for s in samples]
    if len(set(keys)) != len(keys):
        raise PropertyViolation(f"duplicate keys yielded: {keys}")
    if [s["__index__"] for s in samples] != list(range(len(samples))):
        raise PropertyViolation(f"indices not 0..n-1: {[s['__index__'] for s in samples]}")
    for s in samples:
        if s["status"] == QUARANTINED:
            if ":" not in s["reason"] or not s["reason"].split(":", 1)[0]:
                raise PropertyViolation(f"quarantine without a reason code: {s['reason']!r}")
        elif s["status"] == PENDING:
            image = s["__image__"]
            if not isinstance(s.get(image), bytes) or image not in s["__fields__"]:
                raise PropertyViolation(f"pending sample {s['__key__']!r} without image bytes")
        else:
            raise PropertyViolation(f"unexpected status {s['status']!r}")
    if damaged_from is None and shard_rows:
        raise PropertyViolation(f"an intact shard got a shard-level row: {shard_rows[0]['reason']}")

    base_keys = {k.split("#", 1)[0] for k in keys}
    reference = _reference_members(data)
    ref_data: dict[str, bytes | None] = {}
    for info, member_data in reference:
        for alias in _name_aliases(info.name):
            ref_data.setdefault(alias, member_data)
        if info.isdir():
            continue
        aliases = _name_aliases(info.name)
        member_keys = {p[0] for p in map(split_key, aliases) if p is not None}
        member_keys |= {repr(k) for k in member_keys}  # unsafe names: keyed by the escaped key
        if aliases & skipped or member_keys & base_keys:
            continue
        end = info.offset_data + info.size
        if shard_rows and damaged_from is not None and end + 512 > damaged_from:
            continue  # at or after the damage: covered by the shard-level row
        if shard_rows and (gz or damaged_from is None):
            continue
        raise PropertyViolation(
            f"member {info.name!r} (header at byte {info.offset}) is neither yielded nor "
            f"skipped; shard rows: {[r['reason'] for r in shard_rows]}")
    for s in samples:
        if s["status"] != PENDING:
            continue
        for fname, member_name in s["__paths__"].items():
            expected = ref_data.get(member_name)
            if expected is not None and s[fname] != expected:
                raise PropertyViolation(
                    f"released bytes of {member_name!r} differ from the archive member")
    if shard_rows:
        return shard_rows[-1]["reason"].split(":", 1)[0]
    return "quarantined" if any(s["status"] == QUARANTINED for s in samples) else "read"


# -------------------------------------------------------------------------------------------
# Parquet files


def parquet_bytes(table: Any, **options: Any) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, **options)
    return buf.getvalue()


def parquet_seed_tables() -> dict[str, Any]:
    """Tables whose image column is right, wrong, nested, null or odd in every way a file
    from the wild may have it."""
    import pyarrow as pa

    images = _tiny_images()
    jpg, png = images["jpg"], images["png"]
    hf = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return {
        "binary": pa.table({"__key__": ["a", "b", "c"], "image": [jpg, png, b"junk"],
                            "caption": ["x", None, "z"]}),
        "large-binary-nulls": pa.table({"image": pa.array([jpg, None, b""], pa.large_binary()),
                                        "path": ["a.jpg", None, "c.png"]}),
        "hf-struct": pa.table({"image": pa.array(
            [{"bytes": jpg, "path": "a.jpg"}, {"bytes": None, "path": "b.png"}, None,
             {"bytes": png, "path": None}], hf)}),
        "struct-bytes-string": pa.table({"image": pa.array(
            [{"bytes": "not bytes", "path": "a.jpg"}, {"bytes": None, "path": None}],
            pa.struct([("bytes", pa.string()), ("path", pa.string())]))}),
        "struct-bytes-int": pa.table({"image": pa.array(
            [{"bytes": 7}, {"bytes": None}], pa.struct([("bytes", pa.int64())]))}),
        "struct-bytes-nested": pa.table({"image": pa.array(
            [{"bytes": {"bytes": jpg}}], pa.struct([("bytes", pa.struct([("bytes", pa.binary())]))]))}),
        "struct-no-bytes": pa.table({"image": pa.array([{"path": "a.jpg"}],
                                                       pa.struct([("path", pa.string())]))}),
        "list-of-binary": pa.table({"image": pa.array([[jpg, png], []], pa.list_(pa.binary()))}),
        "string-column": pa.table({"image": ["a.jpg", "b.jpg"]}),
        "int-column": pa.table({"image": [1, 2]}),
        "null-column": pa.table({"image": pa.nulls(2)}),
        "dictionary-binary": pa.table({"image": pa.array([jpg, jpg]).dictionary_encode()}),
        "fixed-size-binary": pa.table({"image": pa.array([b"\xff\xd8\xff\xe0"] * 2,
                                                         pa.binary(4))}),
        "binary-view": pa.table({"image": pa.array([jpg, png], pa.binary_view())}),
        "no-image-column": pa.table({"picture": [jpg]}),
        "odd-keys": pa.table({"key": pa.array([1, 1, None, 3]), "image": [jpg, jpg, png, jpg],
                              "format": pa.array([5, None, 7, 8]), "ext": ["png", "", None, "."]}),
        "key-binary": pa.table({"__key__": pa.array([b"\xff", b"\xff", b""]),
                                "image": [jpg, png, jpg]}),
        "key-float": pa.table({"__key__": pa.array([float("nan"), float("nan"), 1.0]),
                               "image": [jpg, png, jpg]}),
        "hint-list": pa.table({"image": [b"no magic here"], "path": pa.array([["a.jpg"]])}),
        "empty": pa.table({"image": pa.array([], pa.binary())}),
        "huge-binary": pa.table({"image": [jpg + bytes(3 << 20)]}),
        "many-rows": pa.table({"image": [jpg] * 200}),
    }


def check_parquet(data: bytes, *, image_column: str = "image", mutated: bool = False,
                  expected: Any = None) -> str:
    """ParquetSource.read_shard never raises; keys are unique; a well-formed file never gets
    a shard-level row, and every one of its rows is a sample (``expected`` is its table);
    a pending sample carries the row's image bytes under a field named by its format."""
    from veil.pipelines.sources import ParquetSource
    from veil.transforms.stage import PENDING, QUARANTINED

    fs, path = _memory_url(data, "part-0.parquet")
    try:
        source = ParquetSource([f"memory://{path}"], image_column=image_column)
        (shard,) = source.list_shards()
        try:
            samples = list(source.read_shard(shard))
            source.approx_num_samples(shard)
        except Exception as exc:  # noqa: BLE001
            raise PropertyViolation(f"read_shard raised {type(exc).__name__}: {exc}") from exc
    finally:
        fs.rm(path)

    keys = [s["__key__"] for s in samples]
    if len(set(keys)) != len(keys):
        raise PropertyViolation(f"duplicate keys yielded: {keys[:10]}")
    shard_rows = [s for s in samples if s["__key__"].startswith(shard.id + "#")]
    for s in samples:
        if s["status"] == QUARANTINED:
            if ":" not in s["reason"]:
                raise PropertyViolation(f"quarantine without a reason code: {s['reason']!r}")
        elif s["status"] == PENDING:
            image = s["__image__"]
            if not isinstance(s.get(image), bytes) or not s[image]:
                raise PropertyViolation(f"pending sample {s['__key__']!r} has no image bytes")
            if not isinstance(s.get("__row__"), dict):
                raise PropertyViolation(f"pending sample {s['__key__']!r} has no __row__")
        else:
            raise PropertyViolation(f"unexpected status {s['status']!r}")
    if not mutated and shard_rows:
        raise PropertyViolation(
            f"a well-formed Parquet file got a shard-level row: {shard_rows[0]['reason']}")
    if expected is not None and not shard_rows:
        if len(samples) != expected.num_rows:
            raise PropertyViolation(f"{expected.num_rows} rows but {len(samples)} samples")
        if image_column in expected.column_names:
            column = expected.column(image_column).to_pylist()
            for s, value in zip(samples, column, strict=True):
                if s["status"] != PENDING:
                    continue
                raw = value.get("bytes") if isinstance(value, dict) else value
                if s[s["__image__"]] != raw:
                    raise PropertyViolation(f"sample {s['__key__']!r} bytes differ from its row")
    if shard_rows:
        return shard_rows[-1]["reason"].split(":", 1)[0]
    reasons = {s["reason"].split(":", 1)[0] for s in samples if s["status"] == QUARANTINED}
    return ",".join(sorted(reasons)) or "read"


# -------------------------------------------------------------------------------------------
# Run configuration


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a *constructed* config value matches its field's type hint. Stricter than
    ``veil.config``'s input check on purpose (tuples must be tuples, sections dataclass
    instances), and written apart from it so the oracle does not share the code under test."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
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
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_conforms(v, a) for v, a in zip(value, args, strict=True)))
    if origin is dict:
        return isinstance(value, dict) and all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if dataclasses.is_dataclass(hint):
        return isinstance(value, hint)
    raise TypeError(f"no conformance rule for {hint!r}")


def check_config_value(config: Any) -> None:
    """Every field of a constructed config (sections included) has its declared type and
    finite numbers; the config survives a round trip through its dict form."""
    from veil.config import RunConfig

    def walk(obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if not _conforms(value, hints[f.name]):
                raise PropertyViolation(
                    f"{prefix}{f.name} = {value!r} does not match {hints[f.name]}")
            if isinstance(value, float) and not math.isfinite(value):
                raise PropertyViolation(f"{prefix}{f.name} = {value!r} is not finite")
            if dataclasses.is_dataclass(value):
                walk(value, f"{prefix}{f.name}.")

    walk(config, "")
    try:
        again = RunConfig.from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001
        raise PropertyViolation(
            f"a valid config does not survive to_dict/from_dict: {exc!r}") from exc
    if again != config:
        raise PropertyViolation("to_dict/from_dict changed the config")


def _check_config_load(load: Any, what: str) -> str:
    """``load()`` either builds a well-typed config or raises ConfigError (which the CLI turns
    into 'veil: configuration error: ...' and exit status 2); anything else is a violation."""
    from veil.config import ConfigError

    try:
        config = load()
    except ConfigError as exc:
        if not str(exc):
            raise PropertyViolation("ConfigError without a message") from exc
        return "config_error"
    except Exception as exc:  # noqa: BLE001
        raise PropertyViolation(f"{what} raised {type(exc).__name__}: {exc}") from exc
    check_config_value(config)
    return "valid"


def check_config_dict(data: Any) -> str:
    """RunConfig.from_dict on an arbitrary document: a valid config or a ConfigError."""
    from veil.config import RunConfig

    return _check_config_load(lambda: RunConfig.from_dict(data), "RunConfig.from_dict")


def check_config_yaml(text: bytes, tmp_dir: Path) -> str:
    """RunConfig.from_yaml on arbitrary file contents: a valid config or a ConfigError."""
    from veil.config import RunConfig

    path = tmp_dir / "run.yaml"
    path.write_bytes(text)
    return _check_config_load(lambda: RunConfig.from_yaml(path), "RunConfig.from_yaml")


def config_field_paths() -> dict[str, Any]:
    """Dotted name -> type hint of every field of RunConfig and its sections."""
    from veil.config import RunConfig

    paths: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                paths[prefix + f.name] = hints[f.name]

    walk(RunConfig, "")
    return paths


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"detect.max_side": 3} -> {"detect": {"max_side": 3}}."""
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[leaf] = value
    return out

