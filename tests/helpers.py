"""Small helpers shared by the tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def makefile_nodeps() -> list[str]:
    """The Makefile's NODEPS: pinned packages installed without their dependencies."""
    text = (REPO / "Makefile").read_text()
    return re.search(r"^NODEPS\s*:=\s*(.*)$", text, re.MULTILINE).group(1).split()


# Face boxes (x0, y0, x1, y1) in the original photos, where CenterFace, YuNet and MTCNN agree
# to within a few pixels (CenterFace's convention: forehead to chin).
REF_BOXES = {
    "astronaut.png": (181, 58, 269, 177),
    "grace_hopper.jpg": (173, 127, 358, 334),
    "obama.jpg": (374, 107, 602, 417),
    "biden.jpg": (431, 171, 698, 550),
    "obama2.jpg": (197, 214, 463, 658),
    "obama3.jpg": (647, 267, 901, 599),
    "obama_partial_face.jpg": (0, 72, 178, 437),
}


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


_ZYGOTE = """
import ctypes, json, os, resource, signal, sys, traceback
os.environ.setdefault("MPLBACKEND", "Agg")
import matplotlib.pyplot, onnx, onnxruntime, pyarrow.parquet, cv2, PIL.Image
import veil.cli, veil.pipelines.driver, veil.pipelines.runners, veil.validators.report
import veil.transforms.detect, veil.transforms.imageio, veil.transforms.anonymize
import veil.transforms.rescan
# The personal-data classes: OCR, Presidio and spaCy cost ~10 s of imports per process.
import rapidocr, presidio_analyzer, spacy, veil.transforms.text, veil.transforms.plates
import veil.transforms.metadata


def drop_dac_override():
    # Clear CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that permission bits bind root.
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        rc = 99
        try:
            os.environ.update(req["env"])
            fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            if req.get("fsize"):
                # Ignored, SIGXFSZ lets write() fail with EFBIG instead of killing us.
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
            if req.get("drop_dac"):
                drop_dac_override()
            rc = veil.cli.main(req["argv"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Zygote:
    """Runs ``veil.cli.main(argv)`` in a fresh fork of a Python that has already imported
    Veil and its heavy dependencies, one command at a time: the same code path as
    ``python -m veil.cli`` without ~4 s of imports per run, for tests that run Veil many times
    (kills, resource faults). The child may get a file-size limit (``fsize``, RLIMIT_FSIZE)
    or, when root, lose the capability to ignore permission bits (``drop_dac``)."""

    def __init__(self) -> None:
        import os
        import subprocess
        import sys

        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "MPLBACKEND": "Agg"})
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"

    def run(self, argv: list[str], log: Path, env: dict[str, str] | None = None, *,
            fsize: int | None = None, drop_dac: bool = False,
            kill_after: float | None = None) -> tuple[int, str]:
        """Exit status (negative: killed by that signal) and the output of one command;
        ``kill_after`` seconds: SIGKILL it then if it is still running."""
        import json
        import os
        import select
        import signal

        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = {"argv": argv, "env": env or {}, "log": str(log), "fsize": fsize, "drop_dac": drop_dac}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        pid = json.loads(self.proc.stdout.readline())["pid"]
        if kill_after is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], kill_after)
            if not ready:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:  # ended at that very moment
                    pass
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return rc, log.read_text(errors="replace")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
