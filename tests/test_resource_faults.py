"""Resource faults: a full disk or a read-only folder while `veil run` writes, and decoder
bombs that would exhaust time or memory on one sample.

A write fault must end the run with a clear message (no traceback) and a non-zero exit,
leaving only committed shards (no partial shard, no temp file, no manifest or data of an
uncommitted shard); once the fault is gone, a rerun completes to the same bytes as a clean
run. A decoder bomb must be refused quickly, before its pixels are decoded, and quarantined
with a reason.
"""

from __future__ import annotations

import functools
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import Zygote, face_photo, jpeg_bytes, write_tar
from PIL import Image
from test_crash_safety import assert_same_release, check_consistent, manifests, temp_files

FACE_FILES = ["obama.jpg", "biden.jpg", "grace_hopper.jpg", "obama2.jpg", "astronaut.png", "obama3.jpg"]


def run_args(inp: str, out: Path) -> list[str]:
    return ["run", "--input", inp, "--output", str(out), "--runner", "local", "--batch-size", "2",
            "--no-progress"]


def assert_clean_failure(rc: int, log: str, out: Path, committed: set[str]) -> None:
    """Non-zero exit with a one-line reason and what to do; only ``committed`` shards left."""
    assert rc == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "rerun the same command to resume" in log, log[-3000:]
    assert temp_files(out) == []
    assert set(manifests(out)) == {f"{s}.parquet" for s in committed}
    data = {p.name for p in (out / "data").iterdir()} if (out / "data").is_dir() else set()
    assert data == committed, "no data of an uncommitted shard"
    assert not (out / "RELEASE.json").exists()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def dataset(workspace, faces_dir) -> dict:
    """Three shards; the middle one holds two larger photos, so a file-size limit can fall
    between the other files and it."""
    root = workspace / "in"
    root.mkdir()
    small = [jpeg_bytes(face_photo(faces_dir, f, max_side=120)) for f in FACE_FILES]
    large = [jpeg_bytes(face_photo(faces_dir, f, max_side=480), quality=95) for f in FACE_FILES[2:4]]
    shards = [[("a0", small[0]), ("a1", small[1])], [("b0", large[0]), ("b1", large[1])],
              [("c0", small[4]), ("c1", small[5])]]
    for i, samples in enumerate(shards):
        write_tar(root / f"shard-{i:03d}.tar", [(k, {"jpg": b}) for k, b in samples])
    small_root = root / "small"  # only the small shards: the report page is the largest file
    small_root.mkdir()
    for i, samples in enumerate(shards[::2]):
        write_tar(small_root / f"shard-{i:03d}.tar", [(k, {"jpg": b}) for k, b in samples])
    return {"input": str(root / "shard-{000..002}.tar"), "shards": 3,
            "keys": {k for s in shards for k, _ in s},
            "small": {"input": str(small_root / "shard-{000..001}.tar"), "shards": 2,
                      "keys": {k for s in shards[::2] for k, _ in s}}}


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def reference(dataset, zygote, workspace) -> Path:
    out = workspace / "ref"
    rc, log = zygote.run(run_args(dataset["input"], out), workspace / "ref.log")
    assert rc == 0, log[-3000:]
    check_consistent(out, dataset["keys"], dataset["shards"])
    return out


def sizes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}


def test_disk_full_during_shard_write(dataset, reference, workspace, zygote):
    """RLIMIT_FSIZE between the small files and the big shard: shard 1 fails mid-write. A
    real `python -m veil.cli` process, as an operator would run it."""
    size = sizes(reference)
    big = size["data/shard-001.tar"]
    others = max(v for k, v in size.items() if k != "data/shard-001.tar" and not k.startswith("report/"))
    assert others < big, size
    limit = (others + big) // 2

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = workspace / "full-shard"
    cmd = [sys.executable, "-m", "veil.cli", *run_args(dataset["input"], out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=limit_file_size)
    log = result.stdout + result.stderr
    assert_clean_failure(result.returncode, log, out, {"shard-000.tar"})
    assert "File too large" in log and "shard-001.tar" in log
    rc, log = zygote.run(run_args(dataset["input"], out), workspace / "full-shard-2.log")
    assert rc == 0, log[-3000:]
    assert "(1 already done, skipped)" in log
    check_consistent(out, dataset["keys"], dataset["shards"])
    assert_same_release(out, reference)


def test_disk_full_during_report(dataset, workspace, zygote):
    """Every shard fits, the report page does not: shards stay committed, the rerun skips
    them all and writes the report."""
    spec = dataset["small"]
    reference = workspace / "small-ref"
    rc, log = zygote.run(run_args(spec["input"], reference), workspace / "small-ref.log")
    assert rc == 0, log[-3000:]
    size = sizes(reference)
    page = size["report/index.html"]
    others = max(v for k, v in size.items() if k != "report/index.html")
    assert 2 * others < page, size
    out = workspace / "full-report"
    rc, log = zygote.run(run_args(spec["input"], out), workspace / "full-report.log",
                         fsize=(others + page) // 2)
    assert rc == 1 and "Traceback" not in log and "index.html" in log, log[-3000:]
    assert "File too large" in log
    assert temp_files(out) == []
    assert len(manifests(out)) == 2
    rc, log = zygote.run(run_args(spec["input"], out), workspace / "full-report-2.log")
    assert rc == 0, log[-3000:]
    assert "(2 already done, skipped)" in log
    check_consistent(out, spec["keys"], spec["shards"])
    assert_same_release(out, reference)


def permission_bits_bind(zygote: Zygote, workspace: Path) -> bool:
    """Whether a read-only folder stops the Veil child: root ignores permission bits through
    CAP_DAC_OVERRIDE, which the child drops; skip if even then root can write there."""
    probe = workspace / "probe"
    probe.mkdir(exist_ok=True)
    probe.chmod(0o555)
    try:
        rc, _log = zygote.run(["report", str(probe)], workspace / "probe.log", drop_dac=True)
    finally:
        probe.chmod(0o755)
    # `veil report` first takes the output lock, a file it creates in the folder.
    return rc != 0 and "Permission denied" in _log


@pytest.mark.parametrize("folder", ["data", "manifest"])
def test_read_only_output_folder(folder, dataset, reference, workspace, zygote):
    """`data/` read-only: the first shard cannot start. `manifest/` read-only: the first
    shard's data are written, its manifest is not, and the data are taken back."""
    if not permission_bits_bind(zygote, workspace):
        pytest.skip("this process can write into read-only folders (root with CAP_DAC_OVERRIDE "
                    "that could not be dropped), so a read-only output cannot be simulated")
    out = workspace / f"read-only-{folder}"
    (out / folder).mkdir(parents=True)
    (out / folder).chmod(0o555)
    try:
        rc, log = zygote.run(run_args(dataset["input"], out), workspace / f"ro-{folder}.log",
                             drop_dac=os.geteuid() == 0)
    finally:
        (out / folder).chmod(0o755)
    assert "Permission denied" in log, log[-3000:]
    assert_clean_failure(rc, log, out, set())
    rc, log = zygote.run(run_args(dataset["input"], out), workspace / f"ro-{folder}-2.log")
    assert rc == 0, log[-3000:]
    check_consistent(out, dataset["keys"], dataset["shards"])
    assert_same_release(out, reference)


# ----------------------------------------------------------------------------- decoder bombs

MAX_PIXELS, MAX_BYTES = 80_000_000, 200 * 1024 * 1024


def decode_reason(data: bytes, ext: str, *, budget_s: float = 1.0) -> str:
    """The quarantine reason DecodeStage gives ``data``; fails if it took over ``budget_s``."""
    from veil.config import ImageIOConfig
    from veil.transforms.imageio import DecodeStage

    stage = DecodeStage(ImageIOConfig())
    start = time.perf_counter()
    sample = stage.process_sample({"__key__": "bomb", "__image__": ext, ext: data})
    elapsed = time.perf_counter() - start
    assert elapsed < budget_s, f"decoding took {elapsed:.1f} s"
    assert sample.get("status") == "quarantined", "a bomb must never be decoded"
    return sample["reason"]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png(width: int, height: int, extra: bytes = b"", idat: bytes | None = None) -> bytes:
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if idat is None:
        idat = zlib.compress(b"\x00" * (1 + 3 * width) * height)
    return b"\x89PNG\r\n\x1a\n" + header + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


@functools.cache
def deflated_zeros() -> bytes:
    """256 MB of zeros deflated (256 KB): Pillow inflates metadata up to 1 MB per chunk."""
    z = zlib.compressobj(9)
    block = b"\x00" * (1 << 24)
    return b"".join(z.compress(block) for _ in range(16)) + z.flush()


@pytest.mark.parametrize("chunk", [b"zTXt", b"iCCP", b"iTXt"])
def test_png_metadata_bomb_is_refused_without_inflating(chunk):
    """256 MB of zeros deflated into one metadata chunk."""
    prefix = {b"zTXt": b"k\x00\x00", b"iCCP": b"p\x00\x00", b"iTXt": b"k\x00\x01\x00\x00\x00"}[chunk]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    reason = decode_reason(png(8, 8, png_chunk(chunk, prefix + deflated_zeros())), "png")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert reason.startswith("corrupt_image:") and "too large" in reason.lower(), reason
    assert grown_mb < 100


@pytest.mark.parametrize(("data", "ext"), [
    (png(100_000, 100_000, idat=zlib.compress(b"\x00" * 1000)), "png"),  # 10 G pixels in 74 bytes
    (None, "jpg"),  # filled in below: a JPEG whose header claims 65000x65000
    (None, "webp"),
])
def test_huge_dimensions_in_a_tiny_file_are_refused_before_decoding(data, ext):
    if data is None:
        small = io.BytesIO()
        Image.new("RGB", (16, 16)).save(small, "JPEG" if ext == "jpg" else "WEBP")
        raw = bytearray(small.getvalue())
        if ext == "jpg":
            sof = raw.index(b"\xff\xc0")
            raw[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
        else:  # a VP8X canvas of 12000x12000 around a 16x16 picture
            vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x00\x00\x00\x00" + (11999).to_bytes(3, "little") * 2
            body = b"WEBP" + vp8x + bytes(raw[12:])
            raw = bytearray(b"RIFF" + struct.pack("<I", len(body)) + body)
        data = bytes(raw)
    reason = decode_reason(data, ext)
    assert reason.split(":")[0] in ("too_large", "corrupt_image"), reason


def many_frame_gif(n: int) -> bytes:
    """``n`` 1x1 frames of 15 bytes each, written directly (Pillow's writer is slow at this)."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return header + frame * n + b"\x3b"


def many_page_tiff(n: int) -> bytes:
    """``n`` 1x1 greyscale pages sharing one pixel: a chain of ``n`` 102-byte IFDs."""
    entries = [(256, 3, 1, 1), (257, 3, 1, 1), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (278, 3, 1, 1), (279, 4, 1, 1)]  # the strip is at offset 8
    size = 2 + 12 * len(entries) + 4
    table = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    ifds = [table + struct.pack("<I", 12 + (i + 1) * size if i + 1 < n else 0) for i in range(n)]
    return b"II*\x00" + struct.pack("<I", 12) + b"\x80\x00\x00\x00" + b"".join(ifds)


def test_gif_with_many_frames_is_refused_without_walking_them():
    """A million 1x1 frames (15 MB; max_bytes allows 200 MB): counting them took over 2 s."""
    reason = decode_reason(many_frame_gif(1_000_000), "png", budget_s=0.5)
    assert reason.startswith("unsupported_image: animated GIF with more than one frame"), reason


def test_tiff_with_many_pages_is_refused_without_walking_them():
    """20,000 pages (2 MB): counting them took 5 s; finding a second one is instant."""
    reason = decode_reason(many_page_tiff(20_000), "tif", budget_s=0.5)
    assert reason.startswith("unsupported_image: multi-page TIFF with more than one frame"), reason


def test_small_multi_frame_files_still_say_how_many_frames():
    assert "with 3 frames" in decode_reason(many_page_tiff(3), "tif")
    assert "with 3 frames" in decode_reason(many_frame_gif(3), "png")


def progressive_jpeg(side: int, extra_scans: int) -> bytes:
    """A progressive greyscale JPEG followed by ``extra_scans`` empty AC scans: each costs a
    pass over the whole image and one 9-byte marker segment."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=50)
    scan = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00" + bytes([1, 63, 0]) + b"\x00"
    return buf.getvalue()[:-2] + scan * extra_scans + b"\xff\xd9"


def test_jpeg_with_thousands_of_scans_is_refused_before_decoding():
    """3,000 scans over 4000x4000 pixels: a 96 KB file that took 17.5 s to decode."""
    reason = decode_reason(progressive_jpeg(4000, 3000), "jpg", budget_s=0.5)
    assert reason.startswith("too_large: the JPEG has 3") and "scans" in reason, reason


def test_ordinary_progressive_jpeg_still_decodes(faces_dir):
    from veil.transforms.imageio import decode_image

    photo = face_photo(faces_dir, "obama.jpg", max_side=200)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", progressive=True, optimize=True)
    decoded = decode_image(buf.getvalue(), ext="jpg", max_pixels=MAX_PIXELS, max_bytes=MAX_BYTES)
    assert decoded.rgb.shape == photo.shape
    assert np.abs(decoded.rgb.astype(int) - photo).mean() < 8
    # A few hundred redundant scans are within the limit: strange, but not a bomb.
    assert decode_image(progressive_jpeg(64, 300), ext="jpg", max_pixels=MAX_PIXELS,
                        max_bytes=MAX_BYTES).width == 64


def test_bomb_in_a_shard_is_quarantined_and_the_rest_released(tmp_path, faces_dir, zygote):
    """End to end: a shard with a scan bomb and a real photo; the bomb is quarantined with its
    reason, the photo released, and the run is not held up."""
    from veil.pipelines.manifest import read_manifests

    write_tar(tmp_path / "shard-000.tar",
              [("bomb", {"jpg": progressive_jpeg(4000, 3000)}),
               ("photo", {"jpg": jpeg_bytes(face_photo(faces_dir, "obama.jpg", max_side=160))})])
    out = tmp_path / "out"
    start = time.perf_counter()
    rc, log = zygote.run(run_args(str(tmp_path / "shard-000.tar"), out), tmp_path / "run.log")
    assert rc == 0, log[-3000:]
    assert time.perf_counter() - start < 60
    rows = {r["key"]: r for r in read_manifests(out).to_pylist()}
    assert rows["bomb"]["status"] == "quarantined" and rows["bomb"]["reason"].startswith("too_large")
    assert rows["photo"]["status"] == "anonymized"
    assert json.loads((out / "run.json").read_text())["phase"] == "finished"
