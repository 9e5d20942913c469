"""FSAP's GPU throughput: faces per second, GPU memory and utilisation, by face batch size.

The GPU stage of an FSAP run is :class:`veil.transforms.fsap.FSAPOptimizer` on batches of
aligned 128 px face crops (faces of many samples together, each stopping on its own). This
script times exactly that, with the default configuration and real weights (TAEF2 latent,
MobileFaceNet, the FaceNet-CASIA ensemble member, LPIPS-AlexNet in the attribute loss), on
the 7 shared face photos' crops repeated to fill each batch (each copy mirrored or shifted by
a pixel or two, so no two faces of a batch are the same). Certification (dlib, on CPU) and
the CPU stages are not part of it; a lent GPU machine has none of Veil's other dependencies.

Two steps, because a GPU machine here has PyTorch but nothing else of Veil's, and no network:

1. ``pack`` (here): write the kit, everything the run needs besides PyTorch and numpy, into
   one folder (under 64 MiB: the FaceNet-CASIA weights as a float16 state dict, LPIPS-AlexNet
   likewise, TAEF2 and MobileFaceNet as registered, facenet-pytorch's module, the face crops)::

       VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap_gpu.py pack --kit .gpukit

2. ``run`` (on the GPU machine, or here with ``--device cpu`` to check the kit)::

       python3 benchmarks/bench_fsap_gpu.py run --kit .gpukit --device cuda --batches 1,16,64 --out fsap_gpu.json

   Per batch size: wall seconds of ``optimise`` (after one warm-up batch), faces per second,
   iterations per face, peak GPU memory (``torch.cuda.max_memory_allocated``) and GPU
   utilisation sampled every 100 ms through NVML (when ``pynvml`` is importable). The
   weights are float32 on the device, as in a run; FaceNet-CASIA and LPIPS went through
   float16 on the way, which moves their outputs by about 1e-3 (printed by ``pack``), not the
   work per iteration. ``--precision bfloat16`` times ``fsap.precision: bfloat16`` (the
   networks under autocast); run it beside the float32 default on the same machine.

3. ``compare`` (either machine): the precisions interleaved face by face, one face at a
   time, as a CPU stage optimises them (one thread on a CPU)::

       .venv/bin/python benchmarks/bench_fsap_gpu.py compare --kit .gpukit --device cpu --out fsap_precision.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FACES = ("astronaut.png", "biden.jpg", "grace_hopper.jpg", "obama.jpg", "obama2.jpg", "obama3.jpg",
         "obama_partial_face.jpg")


def _import_veil() -> None:
    """Make the repository importable as ``veil`` where it is not installed (the GPU machine)."""
    try:
        import veil  # noqa: F401
    except ImportError:
        link_dir = Path(tempfile.mkdtemp(prefix="veil-import-"))
        (link_dir / "veil").symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(link_dir))


# ------------------------------------------------------------------------------------- pack


def pack(kit: Path, faces_dir: Path) -> None:
    import torch

    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.fsap import extract_crop, face_box_in_crop, face_crop_matrix
    from veil.transforms.latent import TAEF2_DECODER, TAEF2_ENCODER
    from veil.transforms.models import ModelRegistry, package_file_path
    from veil.transforms.perceptual import LPIPS
    from veil.transforms.recognizers import (
        MOBILEFACENET_MODEL,
        FaceNetCasiaRecognizer,
        build_recognizer,
    )

    kit.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry()
    for name in (TAEF2_ENCODER, TAEF2_DECODER, MOBILEFACENET_MODEL):
        path = registry.resolve(name)
        shutil.copyfile(path, kit / path.name)
    casia = build_recognizer("facenet-casia", registry)
    assert isinstance(casia, FaceNetCasiaRecognizer)
    torch.save({k: v.half() for k, v in casia.model.state_dict().items()}, kit / "facenet_casia_fp16.pt")
    lpips = LPIPS.from_registry(registry, net="alex")
    torch.save({k: v.half() for k, v in lpips.state_dict().items()}, kit / "lpips_alex_fp16.pt")
    source = package_file_path("facenet_pytorch", "models/inception_resnet_v1.py")
    if source is None:
        raise SystemExit("facenet-pytorch is not installed here (make install)")
    site = kit / "site" / "facenet_pytorch"
    if site.exists():
        shutil.rmtree(site)
    shutil.copytree(source.parents[1], site, ignore=shutil.ignore_patterns("data", "__pycache__"))

    # The faces: each photo's most confident face, aligned as FSAP aligns it.
    from PIL import Image

    detector = build_detector(DetectConfig(), registry)
    crops, boxes = [], []
    for name in FACES:
        rgb = np.asarray(Image.open(faces_dir / name).convert("RGB"))
        region = max((r.to_dict() for r in detector.detect(rgb)), key=lambda r: r["score"])
        matrix = face_crop_matrix(region, 128)
        crops.append(extract_crop(rgb, matrix, 128))
        boxes.append(face_box_in_crop(region, matrix))
    np.savez_compressed(kit / "faces.npz", crops=np.stack(crops), boxes=np.array(boxes, np.float32))

    # How far the float16 trip moves the two networks' outputs on these faces.
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
    half_casia = _facenet(kit, "cpu")
    half_lpips = _lpips(kit, "cpu")
    with torch.no_grad():
        faces160 = torch.nn.functional.interpolate(x, size=(160, 160), mode="bilinear") * 255.0
        e0 = casia.model((faces160 - 127.5) / 128.0)
        e1 = half_casia((faces160 - 127.5) / 128.0)
        cos = torch.nn.functional.cosine_similarity(e0, e1).min().item()
        y = x.flip(0)
        d = (lpips(x, y) - half_lpips(x, y)).abs().max().item()
    size = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
    print(f"kit {kit}: {size / 2**20:.1f} MiB; float16 trip: FaceNet-CASIA embeddings cos >= {cos:.5f}, "
          f"LPIPS within {d:.1e}")


# -------------------------------------------------------------------------------------- run


def _facenet(kit: Path, device: str):
    import torch

    sys.path.insert(0, str(kit / "site"))
    from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

    model = InceptionResnetV1(classify=False)
    state = torch.load(kit / "facenet_casia_fp16.pt", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False).to(device)


def _lpips(kit: Path, device: str):
    import torch

    from veil.transforms.perceptual import LPIPS

    model = LPIPS("alex")
    state = torch.load(kit / "lpips_alex_fp16.pt", map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.eval().requires_grad_(False).to(device)


class _CasiaStandIn:
    """What :class:`~veil.transforms.fsap.FaceNetCropSurrogate` reads of a recognizer."""

    def __init__(self, model) -> None:
        from veil.transforms.recognizers import FaceNetCasiaRecognizer

        self.model = model
        self.image_size = 160
        self.margin = 32
        self.threshold = FaceNetCasiaRecognizer.threshold
        self.margin_growth = lambda box: FaceNetCasiaRecognizer.margin_growth(self, box)


class _UtilisationSampler:
    """GPU utilisation and memory in use, every ``period`` s, through NVML (if present)."""

    def __init__(self, device_index: int = 0, period: float = 0.1) -> None:
        self.samples: list[tuple[float, float]] = []
        self.period = period
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
        except Exception:  # noqa: BLE001 - no NVML: no utilisation figures
            self._nvml = None
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rates = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
            used = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.samples.append((float(rates.gpu), used / 2**30))
            time.sleep(self.period)

    def __enter__(self) -> _UtilisationSampler:
        if self._nvml is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._nvml is not None:
            self._thread.join()

    def summary(self) -> dict[str, float | None]:
        if not self.samples:
            return {"gpu_util_mean": None, "gpu_util_median": None, "gpu_mem_used_gib_max": None}
        util = np.array([s[0] for s in self.samples])
        return {"gpu_util_mean": float(util.mean()), "gpu_util_median": float(np.median(util)),
                "gpu_mem_used_gib_max": max(s[1] for s in self.samples)}


def _batch(crops: np.ndarray, boxes: np.ndarray, n: int) -> tuple[np.ndarray, list]:
    """``n`` faces: the photos' crops in turn, each later copy mirrored and/or shifted."""
    out, out_boxes = [], []
    for i in range(n):
        j, copy = i % len(crops), i // len(crops)
        crop, (x0, y0, x1, y1) = crops[j], boxes[j]
        if copy % 2:
            crop = crop[:, ::-1]
            x0, x1 = crop.shape[1] - x1, crop.shape[1] - x0
        shift = (copy // 2) % 3
        if shift:
            crop = np.roll(crop, shift, axis=1)
            x0, x1 = x0 + shift, x1 + shift
        out.append(np.ascontiguousarray(crop))
        out_boxes.append((float(x0), float(y0), float(x1), float(y1)))
    return np.stack(out), out_boxes


def _sync(device: str) -> None:
    """Wait for the GPU's queued work, so that wall time covers it (nothing to do on a CPU)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or platform.machine()


def _optimizer(kit: Path, device: str, precision: str):
    """The FSAP optimiser of a run with the default configuration, from the kit's weights."""
    import torch

    from veil.config import FSAPConfig
    from veil.transforms.fsap import FaceNetCropSurrogate, FSAPOptimizer
    from veil.transforms.latent import build_latent_space
    from veil.transforms.models import ModelRegistry, load_torch_state_dict
    from veil.transforms.recognizers import _mobilefacenet_class

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    if device == "cpu":
        torch.set_num_threads(1)  # as the stage runs on CPU
    registry = ModelRegistry(models_dir=str(kit))
    config = FSAPConfig(precision=precision)
    latent = build_latent_space(config.latent, registry).to(device)
    mfn = _mobilefacenet_class()()
    mfn.load_state_dict(load_torch_state_dict(kit / "mobilefacenet_ms1m.pt"), strict=True)
    mfn.eval().requires_grad_(False).to(device)
    casia = FaceNetCropSurrogate(_CasiaStandIn(_facenet(kit, device)), config.crop_size, device)
    return FSAPOptimizer(latent, mfn, _lpips(kit, device), config, device, ensemble={"facenet-casia": casia})


def run(kit: Path, device: str, batches: list[int], out: Path | None, repeats: int,
        precision: str = "float32") -> None:
    import torch

    optimizer = _optimizer(kit, device, precision)
    config = optimizer.config
    data = np.load(kit / "faces.npz")
    crops, boxes = data["crops"], data["boxes"]

    rows = []
    warm, warm_boxes = _batch(crops, boxes, min(batches))
    optimizer.optimise(warm, boxes=warm_boxes, steps=2)  # kernels, allocator, cudnn choices
    for n in batches:
        batch, batch_boxes = _batch(crops, boxes, n)
        times, iterations, peaks = [], [], []
        sampler = _UtilisationSampler() if device.startswith("cuda") else None
        with sampler or _Null():
            for _ in range(repeats):
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                _sync(device)
                start = time.perf_counter()
                result = optimizer.optimise(batch, boxes=batch_boxes)
                _sync(device)
                times.append(time.perf_counter() - start)
                iterations.append([f.iterations for f in result.faces])
                if device.startswith("cuda"):
                    peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        seconds = float(np.median(times))
        its = np.array(iterations[-1])
        row = {"faces": n, "repeats": repeats, "seconds_median": seconds, "seconds_all": times,
               "faces_per_second": n / seconds, "seconds_per_face": seconds / n,
               "iterations_median": float(np.median(its)), "iterations_max": int(its.max()),
               "reached_goal": int(sum(f.stopped for f in result.faces)),
               "peak_gpu_memory_gib": max(peaks) if peaks else None,
               **(sampler.summary() if sampler else {})}
        rows.append(row)
        print(f"{n:4d} faces: {seconds:7.2f} s, {row['faces_per_second']:7.2f} faces/s, "
              f"{row['seconds_per_face']:.3f} s/face, iterations median {row['iterations_median']:.0f} "
              f"max {row['iterations_max']}, reached goal {row['reached_goal']}/{n}, "
              f"peak memory {row['peak_gpu_memory_gib'] or 0:.2f} GiB, "
              f"utilisation mean {row.get('gpu_util_mean') or 0:.0f} %", flush=True)
    report = {"device": device, "device_name": _device_name(device), "torch": torch.__version__,
              "config": {"latent": config.latent, "ensemble": config.ensemble, "tau": config.tau,
                         "steps": config.steps, "inner_steps": config.inner_steps,
                         "precision": config.precision},
              "rows": rows}
    if out is not None:
        out.write_text(json.dumps(report, indent=2))


def compare(kit: Path, device: str, precisions: list[str], out: Path | None) -> None:
    """The kit's faces one at a time (a CPU stage's batch), the precisions interleaved face by
    face in one process, so that a shared machine's drifting speed touches each alike."""
    import torch

    optimizers = {p: _optimizer(kit, device, p) for p in precisions}
    data = np.load(kit / "faces.npz")
    crops, boxes = data["crops"], data["boxes"]
    for optimizer in optimizers.values():
        optimizer.optimise(crops[:1], boxes=[tuple(map(float, boxes[0]))], steps=2)  # warm-up
    faces: dict[str, list[dict]] = {p: [] for p in precisions}
    for j in range(len(crops)):
        for precision, optimizer in optimizers.items():
            _sync(device)
            start = time.perf_counter()
            face = optimizer.optimise(crops[j:j + 1], boxes=[tuple(map(float, boxes[j]))]).faces[0]
            _sync(device)
            seconds = time.perf_counter() - start
            faces[precision].append({"seconds": seconds, "iterations": face.iterations,
                                     "similarity": face.similarity, "stopped": face.stopped})
            print(f"face {j} {precision:9s} {seconds:6.1f} s, {face.iterations:3d} iterations, "
                  f"{seconds / face.iterations:.3f} s/iteration, similarity {face.similarity:+.3f}", flush=True)
    summary = {}
    for precision, rows in faces.items():
        seconds = np.array([r["seconds"] for r in rows])
        its = np.array([r["iterations"] for r in rows])
        summary[precision] = {"seconds_total": float(seconds.sum()),
                              "seconds_per_face_median": float(np.median(seconds)),
                              "seconds_per_iteration_median": float(np.median(seconds / its)),
                              "iterations": its.tolist()}
    base = summary[precisions[0]]["seconds_total"]
    for precision, row in summary.items():
        row["speed_vs_first"] = base / row["seconds_total"]
        print(f"{precision:9s} total {row['seconds_total']:6.0f} s, median {row['seconds_per_face_median']:.1f} "
              f"s/face, {row['seconds_per_iteration_median']:.3f} s/iteration, "
              f"{row['speed_vs_first']:.2f}x {precisions[0]}")
    if out is not None:
        out.write_text(json.dumps({"device": device, "device_name": _device_name(device), "torch": torch.__version__,
                                   "faces": faces, "summary": summary}, indent=2))


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the kit (here)")
    p.add_argument("--kit", type=Path, default=REPO / ".gpukit")
    p.add_argument("--faces", type=Path, default=REPO.parent / "shared" / "data" / "faces")
    r = sub.add_parser("run", help="time FSAP on the kit's faces")
    r.add_argument("--kit", type=Path, default=REPO / ".gpukit")
    r.add_argument("--device", default="cuda")
    r.add_argument("--batches", default="1,16,64", help="face batch sizes, comma-separated")
    r.add_argument("--repeats", type=int, default=2)
    r.add_argument("--out", type=Path)
    r.add_argument("--precision", default="float32",
                   help="fsap.precision: the networks' arithmetic, float32 (default) or bfloat16")
    c = sub.add_parser("compare", help="precisions interleaved face by face, one face at a time")
    c.add_argument("--kit", type=Path, default=REPO / ".gpukit")
    c.add_argument("--device", default="cpu")
    c.add_argument("--precisions", default="float32,bfloat16", help="fsap.precision values, comma-separated")
    c.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    _import_veil()
    if args.command == "pack":
        pack(args.kit, args.faces)
    elif args.command == "compare":
        compare(args.kit, args.device, args.precisions.split(","), args.out)
    else:
        run(args.kit, args.device, [int(b) for b in args.batches.split(",")], args.out, args.repeats,
            args.precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
