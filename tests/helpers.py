"""Small helpers shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def face_photo(faces_dir: Path, name: str, max_side: int = 640) -> np.ndarray:
    """A real face photo as RGB uint8, downscaled so tests stay fast."""
    from PIL import Image, ImageOps

    img = ImageOps.exif_transpose(Image.open(faces_dir / name)).convert("RGB")
    img.thumbnail((max_side, max_side))
    return np.asarray(img)


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """A WebDataset shard of (key, {field: bytes}) samples."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as sink:
        for key, fields in samples:
            sink.write({"__key__": key, **fields})
