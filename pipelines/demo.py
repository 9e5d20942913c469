"""Built-in sample data: a small WebDataset made only from images that ship inside installed
packages (scikit-image's astronaut, coffee and camera man, matplotlib's Grace Hopper), so the
demo runs offline on a fresh machine.

The samples are chosen to exercise what matters: a close-up that fills the frame, a small
face, a greyscale photo, a rotated photo, EXIF metadata with GPS and an orientation tag, a
PNG with alpha, a photo with no face, a photo with a sign and a caption that carry a name, an
e-mail address and a phone number (text and metadata classes), and a corrupt file that must be
quarantined.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg(img: Image.Image, *, exif: Image.Exif | None = None, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": quality}
    if exif is not None:
        kwargs["exif"] = exif.tobytes()
    img.convert("RGB").save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_images() -> dict[str, Image.Image]:
    """The source pictures, all from installed packages."""
    import matplotlib
    import skimage.data

    hopper_path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    return {
        "astronaut": Image.fromarray(skimage.data.astronaut()),
        "hopper": Image.open(hopper_path).convert("RGB"),
        "coffee": Image.fromarray(skimage.data.coffee()),
        "camera": Image.fromarray(skimage.data.camera()),  # greyscale, a man with a camera
    }


def _gps_exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "VeilDemoCam"          # Make
    exif[0x0110] = "Model X"              # Model
    exif[0x0132] = "2024:05:01 12:00:00"  # DateTime
    exif[0x0112] = orientation            # Orientation
    gps = {1: "N", 2: (52.0, 22.0, 10.0), 3: "E", 4: (4.0, 53.0, 20.0)}
    exif[0x8825] = gps                    # GPSInfo
    return exif


def build_samples() -> list[list[tuple[str, dict[str, bytes]]]]:
    """Two shards of (key, fields) samples."""
    imgs = sample_images()
    astro, hopper, coffee, camera = imgs["astronaut"], imgs["hopper"], imgs["coffee"], imgs["camera"]

    # A close-up: the astronaut's face filling the frame, upscaled as a phone selfie would be.
    closeup = astro.crop((150, 40, 330, 240)).resize((640, 712), Image.Resampling.BICUBIC)
    # A small face: Grace Hopper shrunk so her face is ~24 px, on a larger canvas.
    small = Image.new("RGB", (640, 480), (96, 120, 96))
    small.paste(hopper.resize((64, 78), Image.Resampling.LANCZOS), (420, 250))
    # Stored sideways with an EXIF orientation tag: readers must rotate it upright.
    sideways = astro.transpose(Image.Transpose.ROTATE_90)
    # RGBA PNG: transparent border around the portrait.
    rgba = hopper.resize((256, 320)).convert("RGBA")
    alpha = np.full((320, 256), 255, np.uint8)
    alpha[:12, :] = alpha[-12:, :] = alpha[:, :12] = alpha[:, -12:] = 0
    rgba.putalpha(Image.fromarray(alpha))

    # A notice pinned over the coffee photo: a name, an e-mail address and a phone number
    # (personal data in the image, for the text class), next to text that is not ("MENU").
    import cv2

    board = np.asarray(coffee.convert("RGB")).copy()
    cv2.rectangle(board, (30, 20), (590, 170), (245, 245, 240), -1)
    for y, line, scale in ((60, "MENU OF THE DAY", 1.0), (105, "Contact: Ada Lovelace", 0.9),
                           (150, "ada.lovelace@example.com  +44 20 7946 0958", 0.62)):
        cv2.putText(board, line, (45, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (20, 20, 20), 2, cv2.LINE_AA)
    sign = Image.fromarray(board)

    def meta(caption: str) -> bytes:
        return json.dumps({"caption": caption, "license": "public domain"}).encode()

    shard0 = [
        ("astronaut", {"jpg": _jpeg(astro, exif=_gps_exif()), "json": meta("astronaut, EXIF with GPS")}),
        ("hopper", {"jpg": _jpeg(hopper), "json": meta("portrait")}),
        ("closeup", {"jpg": _jpeg(closeup), "json": meta("close-up filling the frame")}),
        ("coffee", {"jpg": _jpeg(coffee), "json": meta("no person"), "cls": b"0"}),
        ("notice", {"jpg": _jpeg(sign), "txt": b"Cafe notice photographed by Charles Babbage, call 020 7946 0018"}),
    ]
    shard1 = [
        ("small-face", {"jpg": _jpeg(small), "json": meta("small face")}),
        ("camera-man", {"png": _png(camera), "json": meta("greyscale")}),
        ("sideways", {"jpg": _jpeg(sideways, exif=_gps_exif(orientation=8)), "json": meta("EXIF orientation 8")}),
        ("hopper-alpha", {"png": _png(rgba), "json": meta("RGBA PNG")}),
        ("corrupt", {"jpg": _jpeg(hopper)[:2000], "json": meta("truncated JPEG: must be quarantined")}),
    ]
    return [shard0, shard1]


def build_demo_dataset(folder: str | Path) -> str:
    """Write the demo shards into ``folder``; returns the brace pattern to pass to ``veil run``."""
    import webdataset as wds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, samples in enumerate(build_samples()):
        with wds.TarWriter(str(folder / f"demo-{i:03d}.tar")) as sink:
            for key, fields in samples:
                sink.write({"__key__": key, **fields})
    return str(folder / "demo-{000..001}.tar")
