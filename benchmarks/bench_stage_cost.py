"""CPU cost per image of each stage of the default chain, and the evidence for the re-scan
restricted to changed pixels (issue 11: detection and re-scan cost).

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_stage_cost.py --images 300
    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_stage_cost.py --images 100 --strength --ort

Data: ``bench_pipeline.build_dataset`` (640x480 scenes with 1-3 real faces of about 7-200 px
pasted in, and 1280x960 close-ups; face boxes known by construction), built once under
``--work``.

What it prints:

* **stages**: per-stage CPU milliseconds per image (median and mean) of the default chain
  (decode -> detect -> blur -> encode -> re-scan) with ``rescan.scope`` "full" (every level on
  the whole image, as before) and "changed" (fine levels only around changed pixels). Both
  chains run in this one process, alternating which goes first per image, so machine load
  hits both alike. CPU time is ``time.process_time`` (this process; onnxruntime and OpenCV
  are pinned to one thread, so it is the work done, not the wait for a shared core). Also the
  re-scan's round distribution and quarantines per scope.
* **agreement**: for every re-scan the "changed" chain makes, the whole-image scan of the
  same released pixels is run too, and compared: samples the full scan flags that the
  restricted scan does not, and full-scan faces no restricted face overlaps. Then each final
  "changed" release is scanned whole once more (what the release would show to the old
  re-scan), and both releases are checked against the ground truth (face-scale SSIM, as in
  bench_pipeline: >= 0.6 counts as exposed).
* ``--strength``: share of anonymized images whose first (round-0) blur is re-detected, for
  candidate first-round settings (sigma, expand, feather, mask), and how much area each
  changes.
* ``--ort``: onnxruntime session variants on a 640x480 CenterFace input, alternated, with the
  largest output difference against the default session.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

import bench_pipeline  # noqa: E402  (the data builder lives beside this script)

STAGES = ("decode", "detect", "anonymize", "encode", "rescan")


def _load_dataset(work: Path, n: int) -> tuple[list[Path], dict]:
    # Any dataset bench_pipeline built with at least n images will do (its first n images).
    built = sorted((int(d.name[5:]), d) for d in work.glob("data-*")
                   if d.name[5:].isdigit() and (d / "truth.json").exists() and int(d.name[5:]) >= n)
    data_dir = built[0][1] if built else work / f"data-{n}"
    if not (data_dir / "truth.json").exists():
        print(f"building {n} images in {data_dir} ...", file=sys.stderr)
        bench_pipeline.build_dataset(data_dir, n)
    files = sorted((data_dir / "jpg").iterdir())[:n]
    return files, json.loads((data_dir / "truth.json").read_text())


def _chains(scopes: tuple[str, ...]) -> dict[str, list]:
    from veil.config import RunConfig
    from veil.pipelines.driver import build_stages

    chains = {}
    for scope in scopes:
        cfg = RunConfig()
        cfg.rescan = replace(cfg.rescan, scope=scope)
        stages = build_stages(cfg)
        for stage in stages:
            stage.setup()
        chains[scope] = stages
    return chains


def _sample(path: Path) -> dict:
    return {"__key__": path.stem, "__shard__": "bench", "__index__": 0, "__image__": "jpg",
            "jpg": path.read_bytes(), "status": "pending", "reason": ""}


def _face_ssim(orig: np.ndarray, released: np.ndarray, box: list[float]) -> float | None:
    import cv2
    from skimage.metrics import structural_similarity

    x0, y0, x1, y1 = box
    sl = (slice(int(y0), int(np.ceil(y1))), slice(int(x0), int(np.ceil(x1))))
    if orig[sl].size == 0:
        return None
    a = cv2.resize(cv2.cvtColor(orig[sl], cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA)
    b = cv2.resize(cv2.cvtColor(released[sl], cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA)
    return float(structural_similarity(a, b, data_range=255))


def stage_costs(files: list[Path], truth: dict) -> dict:
    """Both scopes on every image, alternating; per-stage CPU ms; agreement evidence."""
    from veil.transforms.imageio import decode_image
    from veil.transforms.rescan import _overlaps

    chains = _chains(("full", "changed"))
    restricted = chains["changed"][-1]
    detector = restricted._detector
    whole_image_scan = detector.detect
    evidence = {"rescans": 0, "full_flags": 0, "restricted_flags": 0, "flags_missed": 0,
                "faces_missed": 0, "extra_flags": 0, "missed_keys": [],
                "full_ms": [], "restricted_ms": []}
    restricted_detect_near = detector.detect_near

    def compared(rgb, areas, *, margin, **kw):
        # The restricted scan the stage asked for, and the whole-image scan of the same pixels.
        t0 = time.process_time()
        near = restricted_detect_near(rgb, areas, margin=margin, **kw)
        evidence["restricted_ms"].append((time.process_time() - t0) * 1000)
        t0 = time.process_time()
        full = whole_image_scan(rgb)
        evidence["full_ms"].append((time.process_time() - t0) * 1000)
        evidence["rescans"] += 1
        evidence["full_flags"] += bool(full)
        evidence["restricted_flags"] += bool(near)
        evidence["extra_flags"] += bool(near) and not full
        if full and not near:
            evidence["flags_missed"] += 1
            evidence["missed_keys"].append(current["key"])
        for face in full:
            a = list(face.box)
            if not any(_overlaps(a, list(r.box)) or _overlaps(list(r.box), a) for r in near):
                evidence["faces_missed"] += 1
        return near

    detector.detect_near = compared
    current: dict = {}
    cost = {scope: {s: [] for s in STAGES} for scope in chains}
    outcome = {scope: {} for scope in chains}
    released = {scope: {} for scope in chains}
    for i, path in enumerate(files):
        order = ("full", "changed") if i % 2 == 0 else ("changed", "full")
        current["key"] = path.stem
        for scope in order:
            batch = [_sample(path)]
            for stage in chains[scope]:
                comparisons = len(evidence["full_ms"])
                t0 = time.process_time()
                batch = stage.process_batch(batch)
                # The comparison scans are evidence, not part of the chain's cost.
                ms = (time.process_time() - t0) * 1000 - sum(evidence["full_ms"][comparisons:])
                cost[scope][stage.name].append(ms)
            out = batch[0]
            outcome[scope][path.stem] = (out["status"], out.get("rescan_rounds"))
            if out["status"] != "quarantined":
                released[scope][path.stem] = out["jpg"]

    # Every final restricted release, scanned whole: what the old re-scan would say about it.
    residual = []
    for key, data in released["changed"].items():
        rgb = decode_image(data, ext="jpg", max_pixels=10**9, max_bytes=10**10).rgb
        if whole_image_scan(rgb):
            residual.append(key)

    privacy = {}
    data_dir = files[0].parent
    for scope in chains:
        exposed = {"scene": 0, "closeup": 0}
        total = {"scene": 0, "closeup": 0}
        for path in files:
            t = truth[path.stem]
            total[t["kind"]] += len(t["faces"])
            data = released[scope].get(path.stem)
            if data is None:
                continue
            orig = decode_image((data_dir / path.name).read_bytes(), ext="jpg", max_pixels=10**9,
                                max_bytes=10**10).rgb
            rel = decode_image(data, ext="jpg", max_pixels=10**9, max_bytes=10**10).rgb
            for box in t["faces"]:
                ssim = _face_ssim(orig, rel, box)
                exposed[t["kind"]] += int(ssim is not None and ssim >= 0.6)
        privacy[scope] = {k: f"{exposed[k]}/{total[k]}" for k in exposed}

    def table(values: list[float]) -> dict:
        return {"median": round(float(np.median(values)), 1), "mean": round(float(np.mean(values)), 1)}

    rounds = {}
    for scope in chains:
        counts: dict[str, int] = {}
        for status, r in outcome[scope].values():
            label = "quarantined" if status == "quarantined" else f"{status} r{r}"
            counts[label] = counts.get(label, 0) + 1
        rounds[scope] = dict(sorted(counts.items()))
    same_bytes = sum(released["full"].get(k) == v for k, v in released["changed"].items())
    return {
        "images": len(files),
        "cpu_ms_per_image": {scope: {s: table(v) for s, v in cost[scope].items() if v} for scope in cost},
        "chain_cpu_ms_per_image": {scope: table([sum(x) for x in zip(*cost[scope].values(), strict=True)])
                                   for scope in cost},
        "rescan_rounds": rounds,
        "agreement": {**{k: v for k, v in evidence.items() if not k.endswith("_ms")},
                      "full_scan_ms": table(evidence["full_ms"]),
                      "restricted_scan_ms": table(evidence["restricted_ms"]),
                      "final_releases_where_a_whole_image_scan_finds_a_face": residual,
                      "releases_identical_to_full_scope": f"{same_bytes}/{len(released['changed'])}"},
        "ground_truth_faces_exposed": privacy,
    }


def strength_variants(files: list[Path]) -> list[dict]:
    """Round-0 re-detection rate of candidate first-round settings (whole-image scans)."""
    from veil.config import AnonymizeConfig, RunConfig
    from veil.pipelines.execution import limit_threads
    from veil.transforms.anonymize import Anonymizer, sample_rng
    from veil.transforms.detect import build_detector
    from veil.transforms.imageio import decode_image, encode_image
    from veil.transforms.models import ModelRegistry

    limit_threads(1)
    cfg = RunConfig()
    det = build_detector(cfg.detect, ModelRegistry())
    data = []
    for path in files:
        dec = decode_image(path.read_bytes(), ext="jpg", max_pixels=cfg.io.max_pixels, max_bytes=cfg.io.max_bytes)
        regions = [r.to_dict() for r in det.detect(dec.rgb)]
        if regions:
            data.append((path.stem, dec, regions))
    variants = [
        ("today: sigma 0.2, expand 0.2, feather 0.1, ellipse", {}, 0.2, 0),
        ("today's round 1: sigma 0.4, expand 0.3", {}, 0.2, 1),
        ("sigma 0.3", {"blur_strength": 0.3}, 0.2, 0),
        ("sigma 0.4", {"blur_strength": 0.4}, 0.2, 0),
        ("expand 0.3", {}, 0.3, 0),
        ("box mask", {"mask": "box"}, 0.2, 0),
        ("feather 0.2", {"feather": 0.2}, 0.2, 0),
        ("sigma 0.4, feather 0.2", {"blur_strength": 0.4, "feather": 0.2}, 0.2, 0),
        ("sigma 0.3, feather 0.2", {"blur_strength": 0.3, "feather": 0.2}, 0.2, 0),
        ("sigma 0.4, expand 0.3, feather 0.2", {"blur_strength": 0.4, "feather": 0.2}, 0.3, 0),
    ]
    rows = []
    for name, kwargs, expand, strength in variants:
        anonymizer = Anonymizer(AnonymizeConfig(**kwargs), expand=expand)
        flagged, area = 0, 0.0
        for key, dec, regions in data:
            res = anonymizer.apply(dec.rgb, regions, rng=sample_rng(0, key), strength=strength)
            area += float((res.mask > 0).sum())
            out = encode_image(dec, res.pixels, mask=res.mask, ext="jpg", jpeg_quality=cfg.io.jpeg_quality)
            flagged += bool(det.detect(decode_image(out, ext="jpg", max_pixels=cfg.io.max_pixels,
                                                    max_bytes=cfg.io.max_bytes).rgb))
        rows.append({"first round": name, "re-detected at round 0": f"{flagged}/{len(data)}",
                     "changed px per image": round(area / len(data))})
    return rows


def ort_variants(repeats: int = 8) -> list[dict]:
    """onnxruntime session settings for CenterFace on a 640x480 input, alternated."""
    import onnxruntime as ort

    from veil.transforms import detect
    from veil.transforms.models import ModelRegistry

    path = ModelRegistry().resolve("centerface")
    captured = {}
    real = ort.InferenceSession

    class _Capture:  # the detector's graph edits, without building its session
        def __init__(self, model: bytes, options, providers) -> None:
            captured["model"] = model

    ort.InferenceSession = _Capture
    try:
        detect._centerface_session(path, 1)
    finally:
        ort.InferenceSession = real

    def options(**settings) -> ort.SessionOptions:
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
        o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        o.log_severity_level = 3
        for key, value in settings.items():
            if key.startswith("config:"):
                o.add_session_config_entry(key[len("config:"):], value)
            else:
                setattr(o, key, value)
        return o

    variants = {
        "Veil's session (ORT_ENABLE_ALL, arena, 1 thread)": options(),
        "no spinning": options(**{"config:session.intra_op.allow_spinning": "0"}),
        "denormals as zero": options(**{"config:session.set_denormal_as_zero": "1"}),
        "no CPU memory arena": options(enable_cpu_mem_arena=False),
        "ORT_ENABLE_EXTENDED": options(graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
    }
    sessions = {k: ort.InferenceSession(captured["model"], o, providers=["CPUExecutionProvider"])
                for k, o in variants.items()}
    rng = np.random.default_rng(0)
    single = rng.integers(0, 256, (1, 3, 480, 640)).astype(np.float32)
    batch4 = rng.integers(0, 256, (4, 3, 480, 640)).astype(np.float32)
    times = {k: [] for k in sessions}
    times["batch of 4 in one call (per image)"] = []
    name = next(iter(sessions.values())).get_inputs()[0].name
    reference = next(iter(sessions.values())).run(None, {name: single})
    diffs = {}
    for s in sessions.values():
        s.run(None, {name: single})
    for _ in range(repeats):
        for key, s in sessions.items():
            t0 = time.process_time()
            out = s.run(None, {name: single})
            times[key].append((time.process_time() - t0) * 1000)
            diffs[key] = max(float(np.abs(a - b).max()) for a, b in zip(reference, out, strict=True))
        s = next(iter(sessions.values()))
        t0 = time.process_time()
        s.run(None, {name: batch4})
        times["batch of 4 in one call (per image)"].append((time.process_time() - t0) * 1000 / 4)
    return [{"session": k, "cpu_ms_median": round(float(np.median(v)), 1),
             "max_output_diff": diffs.get(k, "n/a")} for k, v in times.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--work", default=str(ROOT.parent / "bench-out"))
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage table and agreement")
    ap.add_argument("--strength", action="store_true", help="also measure first-round blur settings")
    ap.add_argument("--ort", action="store_true", help="also measure onnxruntime session settings")
    args = ap.parse_args()

    from veil.pipelines.execution import limit_threads

    limit_threads(1)
    files, truth = _load_dataset(Path(args.work), args.images)
    # Each section is printed as soon as it is done: a long run on a busy machine still
    # leaves its finished figures behind.
    if not args.no_stages:
        print(json.dumps({"stages": stage_costs(files, truth)}, indent=2), flush=True)
    if args.strength:
        print(json.dumps({"strength": strength_variants(files)}, indent=2), flush=True)
    if args.ort:
        print(json.dumps({"ort": ort_variants()}, indent=2), flush=True)


if __name__ == "__main__":
    main()
