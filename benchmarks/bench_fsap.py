"""Quality and cost of FSAP next to blur (issue 7: realistic anonymization).

Builds two small datasets from the public-domain photos in ../shared/data/faces:

  photos  the 7 shared photos as they are (one WebDataset shard, original bytes);
  scenes  ``--scenes`` images of 640x480, each with 2-4 faces pasted at 60-200 px (face box
          height), placed without overlap on scikit-image backgrounds (deterministic seed);
          the pasted face boxes are saved in truth.json.

For each dataset it runs, as subprocesses of the ``veil`` command line (``--runner local``):

  fsap       ``veil run --method fsap`` (the default: certified by dlib's ResNet, re-optimised
             up to ``fsap.certify_rounds`` times, then re-scanned), then ``veil validate``;
  blur       ``veil run --method blur``, then ``veil validate --method blur``;
  fsap-raw   FSAP's raw transfer: one optimisation round and no re-optimisation
             (``fsap: {certify: [dlib-resnet], certify_rounds: 0, certify_margin: 0,
             certify_restorations: []}``,
             ``rescan: {enabled: false}``); a face dlib still matches at its own 0.6 threshold
             quarantines its sample, and every face's round-0 dlib verdict is kept in the
             manifest. This is dlib re-identification *before* certification: FSAP's identity
             step optimises against MobileFaceNet and the ``fsap.ensemble`` (FaceNet-CASIA by
             default), never dlib, so it measures the transfer to a recognizer left out.

For the FSAP release it also measures dlib re-identification after an attacker's attempts to
undo the perturbation (JPEG q50, Gaussian blur, down- then up-scaling of the released image):
a change made of fragile high-frequency detail would come undone there.

Then it writes ``WORK/results.json`` (raw figures), ``WORK/results.md`` (the table) and
``WORK/fsap_vs_blur.png`` (FSAP and blurred faces side by side, never an original, and the
per-face dlib distances of both with the 0.6 threshold). Finished steps are recorded in
``WORK/steps.json`` and skipped on a rerun (``--fresh`` redoes them).

    VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap.py --scenes 12
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FACES = ROOT.parent / "shared" / "data" / "faces"
DATASETS = ("photos", "scenes")
#: dlib ResNet's verification threshold (euclidean distance): <= 0.6 is "the same person".
DLIB_THRESHOLD = 0.6
#: Recognizers whose verdicts the table reports: the certifier, the optimised one, and one
#: FSAP neither optimises against nor certifies with (the independent verdict).
RECOGNIZERS = ("dlib-resnet", "mobilefacenet", "facenet-casia", "facenet-msceleb")


# ------------------------------------------------------------------------------ datasets


def _largest_face(rgb: np.ndarray, detector: Any) -> tuple[float, float, float, float] | None:
    """The largest face box the default detectors find in a photo, or None."""
    boxes = [tuple(r.box) for r in detector.detect(rgb)]
    if not boxes:
        return None
    return max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))


def build_photos(folder: Path) -> str:
    """One WebDataset shard with the shared photos, original bytes, keyed by file stem."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    shard = folder / "photos-0000.tar"
    with wds.TarWriter(str(shard)) as writer:
        for p in sorted(FACES.iterdir()):
            ext = p.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            writer.write({"__key__": p.stem, ext: p.read_bytes()})
    return str(shard)


def build_scenes(folder: Path, n: int, *, seed: int = 7) -> str:
    """``n`` JPEGs of 640x480 with 2-4 real faces each, pasted without overlap.

    Each face is a crop of a shared photo around its largest detected face (the face box
    grown 1.5x), scaled so that the face box is 60-200 px high (uniform; the first face of
    every scene is at least 100 px) and possibly mirrored. Placement is by rejection
    sampling so no crop covers another; a face that does not fit after 60 tries is left
    out. Face boxes go to truth.json."""
    import skimage.data
    import webdataset as wds
    from PIL import Image, ImageOps

    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    detector = build_detector(DetectConfig(detectors=["centerface", "mtcnn"]), ModelRegistry())
    rng = np.random.default_rng(seed)
    sources = []
    for p in sorted(FACES.iterdir()):
        img = ImageOps.exif_transpose(Image.open(p)).convert("RGB")
        img.thumbnail((1000, 1000))
        box = _largest_face(np.asarray(img), detector)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        cx, cy, h = (x0 + x1) / 2, (y0 + y1) / 2, y1 - y0
        half = 0.75 * max(h, x1 - x0)
        crop = (int(max(0, cx - half)), int(max(0, cy - half)), int(min(img.width, cx + half)),
                int(min(img.height, cy + half)))
        face = (x0 - crop[0], y0 - crop[1], x1 - crop[0], y1 - crop[1])
        sources.append((p.stem, img.crop(crop), face))
    backgrounds = [skimage.data.coffee(), skimage.data.rocket(), skimage.data.hubble_deep_field(),
                   skimage.data.immunohistochemistry(), skimage.data.astronaut()[:, 300:]]
    folder.mkdir(parents=True, exist_ok=True)
    shard = folder / "scenes-0000.tar"
    truth: dict[str, list[dict]] = {}
    with wds.TarWriter(str(shard)) as writer:
        for i in range(n):
            key = f"scene{i:03d}"
            bg = backgrounds[i % len(backgrounds)]
            sh, sw = bg.shape[:2]
            y, x = rng.integers(0, max(1, sh - 240)), rng.integers(0, max(1, sw - 320))
            canvas = Image.fromarray(bg[y:y + 240, x:x + 320]).resize((640, 480))
            placed: list[tuple[int, int, int, int]] = []
            faces: list[dict] = []
            for j in range(int(rng.integers(2, 5))):
                name, tile, (fx0, fy0, fx1, fy1) = sources[rng.integers(len(sources))]
                height = float(rng.uniform(100 if j == 0 else 60, 200))
                k = height / (fy1 - fy0)
                tile = tile.resize((max(8, round(tile.width * k)), max(8, round(tile.height * k))),
                                   Image.Resampling.LANCZOS)
                fx0, fy0, fx1, fy1 = fx0 * k, fy0 * k, fx1 * k, fy1 * k
                if rng.random() < 0.5:
                    tile = ImageOps.mirror(tile)
                    fx0, fx1 = tile.width - fx1, tile.width - fx0
                for _ in range(60):
                    px = int(rng.integers(0, max(1, 640 - tile.width)))
                    py = int(rng.integers(0, max(1, 480 - tile.height)))
                    rect = (px, py, px + tile.width, py + tile.height)
                    if rect[2] <= 640 and rect[3] <= 480 and not any(_intersects(rect, r) for r in placed):
                        break
                else:
                    continue
                canvas.paste(tile, (px, py))
                placed.append(rect)
                faces.append({"source": name, "box": [round(px + fx0, 1), round(py + fy0, 1),
                                                      round(px + fx1, 1), round(py + fy1, 1)]})
            truth[key] = faces
            buf = io.BytesIO()
            canvas.save(buf, format="JPEG", quality=92)
            writer.write({"__key__": key, "jpg": buf.getvalue()})
    (folder / "truth.json").write_text(json.dumps(truth, indent=1))
    return str(shard)


def _intersects(a: tuple, b: tuple) -> bool:
    """True when two (x0, y0, x1, y1) rectangles overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


# ------------------------------------------------------------------------------ runs


def veil_cmd() -> list[str]:
    """The ``veil`` command line of this interpreter's environment."""
    exe = Path(sys.executable).with_name("veil")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "veil.cli"]


def plan_steps(work: Path, inputs: dict[str, str], datasets: list[str]) -> list[dict]:
    """Every subprocess of the benchmark, in order: runs and their validations."""
    raw_yaml = work / "fsap-raw.yaml"
    raw_yaml.write_text(
        "# FSAP's raw transfer: one optimisation round, no re-optimisation, no re-scan.\n"
        "# Margin 0: a face counts as re-identified at dlib's own threshold (0.6), as the\n"
        "# validation judges it, not at the release's stricter 0.6 + certify_margin.\n"
        "# No restoration attack either: this is the plain transfer (the restorations are\n"
        "# measured on the certified release).\n"
        "fsap: {certify: [dlib-resnet], certify_rounds: 0, certify_margin: 0, certify_restorations: []}\n"
        "rescan: {enabled: false}\n"
        "max_failure_ratio: 1.0\n"
    )
    common = ["--runner", "local", "--no-progress"]
    steps = []
    for ds in datasets:
        for method in ("blur", "fsap"):
            out, audit = work / "out" / f"{ds}-{method}", work / "audit" / f"{ds}-{method}"
            steps.append({"name": f"{ds}/{method}/run", "output": str(out),
                          "cmd": veil_cmd() + ["run", "--input", inputs[ds], "--output", str(out),
                                               "--method", method, *common]})
            steps.append({"name": f"{ds}/{method}/validate", "output": str(audit),
                          "cmd": veil_cmd() + ["validate", "--original", inputs[ds], "--anonymized",
                                               str(out), "--output", str(audit), "--method", method,
                                               *common]})
    for ds in datasets:
        out = work / "out" / f"{ds}-fsap-raw"
        steps.append({"name": f"{ds}/fsap-raw/run", "output": str(out),
                      "cmd": veil_cmd() + ["run", "--config", str(raw_yaml), "--input", inputs[ds],
                                           "--output", str(out), "--method", "fsap", *common]})
    return steps


def run_steps(work: Path, steps: list[dict], *, fresh: bool) -> dict[str, dict]:
    """Run each step as a subprocess and record its wall time, exit status and the tail of its
    output in WORK/steps.json; a step recorded there with exit status 0 or 4 (gates failed:
    the measurements exist) is not run again unless ``fresh``."""
    record_path = work / "steps.json"
    done: dict[str, dict] = json.loads(record_path.read_text()) if record_path.exists() else {}
    for step in steps:
        prev = done.get(step["name"])
        if prev and not fresh and prev["rc"] in (0, 4) and prev["cmd"] == shlex.join(step["cmd"]):
            print(f"[skip] {step['name']} (done: {prev['wall_s']} s)", file=sys.stderr, flush=True)
            continue
        shutil.rmtree(step["output"], ignore_errors=True)
        print(f"[run ] {step['name']}: {shlex.join(step['cmd'])}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(step["cmd"], capture_output=True, text=True)
        wall = time.perf_counter() - start
        tail = (proc.stdout + "\n" + proc.stderr).strip()[-3000:]
        done[step["name"]] = {"cmd": shlex.join(step["cmd"]), "rc": proc.returncode,
                              "wall_s": round(wall, 1), "tail": tail,
                              "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        record_path.write_text(json.dumps(done, indent=1))
        print(f"[done] {step['name']}: rc {proc.returncode}, {wall:.1f} s", file=sys.stderr, flush=True)
        if proc.returncode not in (0, 4):
            print(tail, file=sys.stderr, flush=True)
    return done


# ------------------------------------------------------------------------------ figures


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of values (linear interpolation), or None when there are none."""
    return float(np.quantile(values, q)) if values else None


def manifest_figures(out: Path) -> dict[str, Any]:
    """What a run's manifests say: samples by status, quarantine reasons, faces, FSAP records
    (per-face iterations of the final round, rounds needed, fallbacks, round-0 dlib verdicts
    where kept) and the summed FSAP stage time."""
    from veil.pipelines.manifest import read_manifests

    rows = read_manifests(out).to_pylist()
    status: dict[str, int] = {}
    reasons: dict[str, int] = {}
    faces = fsap_faces = fallback = 0
    iterations: list[int] = []
    rounds: dict[int, int] = {}
    certify_scores: list[float] = []
    certify_matched = 0
    fsap_seconds = 0.0
    for row in rows:
        status[row["status"]] = status.get(row["status"], 0) + 1
        if row["status"] == "quarantined":
            code = (row["reason"] or "unknown").split(":", 1)[0]
            reasons[code] = reasons.get(code, 0) + 1
        faces += row["n_faces"] or 0
        fsap_seconds += json.loads(row["timings"] or "{}").get("fsap", 0.0)
        for region in json.loads(row["regions"] or "[]"):
            rec = region.get("fsap")
            if not rec or "status" not in rec:
                continue
            if rec["status"] == "fallback":
                fallback += 1
                continue
            fsap_faces += 1
            iterations.append(int(rec["iterations"]))
            rounds[int(rec["round"])] = rounds.get(int(rec["round"]), 0) + 1
            verdict = (rec.get("certify") or {}).get("dlib-resnet")
            if verdict is not None and int(rec["round"]) == 0:
                certify_scores.append(float(verdict["score"]))
                certify_matched += bool(verdict["matched"])
    return {
        "samples": len(rows), "status": status, "quarantine_reasons": reasons, "faces": faces,
        "fsap_faces": fsap_faces, "fsap_fallback_faces": fallback,
        "fsap_iterations_final_round": {"median": _quantile(iterations, 0.5), "p90": _quantile(iterations, 0.9),
                                        "max": max(iterations) if iterations else None},
        "fsap_rounds": {str(k): v for k, v in sorted(rounds.items())},
        "fsap_seconds_total": round(fsap_seconds, 2),
        "fsap_seconds_per_face": round(fsap_seconds / fsap_faces, 2) if fsap_faces else None,
        "round0_dlib": {"faces": len(certify_scores), "matched": certify_matched, "scores": certify_scores},
    }


def validation_figures(audit: Path) -> dict[str, Any]:
    """The metrics of a ``veil validate`` summary this benchmark reports, and the per-face
    dlib distances of the faces identity was scored on."""
    import pyarrow.parquet as pq

    summary = json.loads((audit / "validation" / "summary.json").read_text())
    m = summary["metrics"]
    ident = summary["details"].get("identity", {})
    reid = {}
    for rec in RECOGNIZERS:
        ver = ident.get(rec, {}).get("verification")
        reid[rec] = None if not ver else {"rate": ver["rate"], "reidentified": ver["reidentified"],
                                          "pairs": ver["pairs"], "ci95": ver["ci95"]}
    fd = summary["details"].get("fd", {})
    fid = ({"name": "FID (Inception)", "value": m.get("fid.inception")} if m.get("fid.inception") is not None
           else {"name": "FD-MobileNetV2", "value": m.get("fd.mobilenetv2")} if m.get("fd.mobilenetv2") is not None
           else None)
    dlib_scores: list[float] = []
    for f in sorted((audit / "validation" / "faces").glob("*.parquet")):
        table = pq.read_table(f)
        if "score_dlib-resnet" in table.column_names:
            dlib_scores += [v for v in table.column("score_dlib-resnet").to_pylist() if v is not None]
    return {
        "status": summary.get("status"),
        "failed_gates": [g["name"] for g in summary.get("gates", []) if g.get("status") == "failed"],
        "faces_original": m.get("faces_original"), "faces_identity": m.get("faces_identity"),
        "not_released": m.get("not_released"), "pairs": m.get("pairs"),
        "reid": reid,
        "top1": {rec: {"rate": m.get(f"identity.{rec}.top1_rate"), "chance": m.get(f"identity.{rec}.top1_chance")}
                 for rec in RECOGNIZERS},
        "restored_reid": {rec: m.get(f"restored.{rec}.verification_rate") for rec in RECOGNIZERS},
        "roles": {rec: (summary.get("recognizers", {}).get(rec) or {}).get("role") for rec in RECOGNIZERS},
        "detection": {d: m.get(f"detection.{d}.rate") for d in ("centerface", "mtcnn")},
        "face_ssim": m.get("face.ssim_mean"), "face_lpips": m.get("face.lpips_mean"),
        "color_shift": [m.get("face.color_shift_mean"), m.get("face.color_shift_max"),
                        m.get("face.lightness_shift_mean")],
        "fid": fid, "fd_images": {k: v.get("n_real") for k, v in fd.items()},
        "gender_agreement": m.get("attributes.gender_agreement"),
        "expression_agreement": m.get("attributes.expression_agreement"),
        "age_mae": m.get("attributes.age_mae"),
        "age_wideresnet_mae": m.get("attributes.age_wideresnet_mae"),
        "residual_faces": m.get("residual.faces"),
        "dlib_scores": dlib_scores,
        "seconds": summary.get("seconds"),
    }


def _restorations() -> tuple[str, ...]:
    """The restoration attacks validation scores (JPEG, blur, down/up-scaling)."""
    from veil.validators.identity import RESTORATIONS

    return RESTORATIONS


def restoration_figures(original_input: str, out: Path) -> dict[str, Any]:
    """dlib re-identification of the faces FSAP replaced, as released and after each of
    validation's restoration attacks (``veil.validators.identity.RESTORATIONS``): does the
    identity change survive an attacker's clean-up, or was it fragile high-frequency detail?
    Faces are compared at the run's regions (validation uses its own detections, so the two
    may differ by a face); the original's own JPEG q50 and down/up x0.25 are the reference
    (a restoration that leaves an untouched face recognisable)."""
    from veil.transforms.models import ModelRegistry
    from veil.transforms.recognizers import build_recognizer
    from veil.validators.identity import restore
    from veil.validators.pairing import read_veil_output

    originals = _shard_images(Path(original_input))
    released = _released(out)
    regions = read_veil_output(out).regions
    dlib = build_recognizer("dlib-resnet", ModelRegistry())
    attacks = ("released", *_restorations(), "original-jpeg-q50", "original-rescale-0.25")
    scores: dict[str, list[float]] = {a: [] for a in attacks}
    for key in sorted(released):
        faces = [r for r in regions.get(key, []) if (r.get("fsap") or {}).get("status") == "optimised"]
        if not faces or key not in originals:
            continue
        rgb_o, rgb_a = originals[key], released[key]
        for attack in attacks:
            if attack == "released":
                probe = rgb_a
            elif attack.startswith("original-"):
                probe = restore(rgb_o, attack.removeprefix("original-"))
            else:
                probe = restore(rgb_a, attack)
            e_o, e_a = dlib.embed_pair(rgb_o, probe, faces)
            scores[attack] += [float(d) for d in np.linalg.norm(e_o - e_a, axis=1)]
    return {a: {"faces": len(v), "reidentified": int(sum(d <= DLIB_THRESHOLD for d in v)),
                "median": _quantile(v, 0.5)} for a, v in scores.items()}


def collect(work: Path, datasets: list[str], steps: dict[str, dict], inputs: dict[str, str]) -> dict[str, Any]:
    """Figures of every finished step, by dataset and method; what is missing is said so."""
    results: dict[str, Any] = {}
    for ds in datasets:
        results[ds] = {}
        for method in ("fsap", "blur", "fsap-raw"):
            rec: dict[str, Any] = {}
            run_step, val_step = steps.get(f"{ds}/{method}/run"), steps.get(f"{ds}/{method}/validate")
            if run_step is None:
                rec["missing"] = "run not done"
            elif run_step["rc"] != 0:
                rec["missing"] = f"run failed (exit {run_step['rc']}): {run_step['tail'][-600:]}"
            else:
                rec["run_wall_s"] = run_step["wall_s"]
                rec["manifest"] = manifest_figures(work / "out" / f"{ds}-{method}")
                if method == "fsap":
                    rec["restoration"] = restoration_figures(inputs[ds], work / "out" / f"{ds}-{method}")
            if method != "fsap-raw":
                if val_step is None:
                    rec["validation_missing"] = "validation not done"
                elif val_step["rc"] not in (0, 4):
                    rec["validation_missing"] = f"validation failed (exit {val_step['rc']}): {val_step['tail'][-600:]}"
                else:
                    rec["validate_wall_s"] = val_step["wall_s"]
                    rec["validation"] = validation_figures(work / "audit" / f"{ds}-{method}")
            results[ds][method] = rec
    return results


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{100 * rate:.1f} %"


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _reid_cell(reid: dict | None) -> str:
    if not reid:
        return "n/a"
    return f"{_pct(reid['rate'])} ({reid['reidentified']}/{reid['pairs']})"


def _worst_restoration(figures: dict[str, dict]) -> str:
    """The restoration that re-identifies most FSAP faces, with its count and median distance."""
    attack = max(_restorations(), key=lambda a: (figures[a]["reidentified"], -(figures[a]["median"] or 9.0)))
    f = figures[attack]
    if not f["faces"]:
        return "-"
    return f"{_pct(f['reidentified'] / f['faces'])} ({f['reidentified']}/{f['faces']}, {attack}, median {f['median']:.3f})"


def table_markdown(results: dict[str, Any]) -> str:
    """The benchmark table (one column per dataset and method) and the targets."""
    cols: list[tuple[str, str, dict]] = [(ds, m, results[ds][m]) for ds in results for m in ("fsap", "blur")]
    header = "| | " + " | ".join(f"{ds}: {m}" for ds, m, _ in cols) + " |"
    lines = [header, "|---|" + "---:|" * len(cols)]

    def row(label: str, fn) -> None:
        cells = []
        for _ds, _m, rec in cols:
            try:
                cells.append(fn(rec))
            except (KeyError, TypeError):
                cells.append("-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    def v(rec: dict) -> dict:
        return rec["validation"]

    def mf(rec: dict) -> dict:
        return rec["manifest"]

    row("images", lambda r: str(mf(r)["samples"]))
    row("faces detected by the run (manifest)", lambda r: str(mf(r)["faces"]))
    row("faces in the originals (validation, CenterFace) / scored for identity",
        lambda r: f"{v(r)['faces_original']} / {v(r)['faces_identity']}")
    row("quarantined samples (reason)", lambda r: str(mf(r)["status"].get("quarantined", 0))
        + ("" if not mf(r)["quarantine_reasons"] else " (" + ", ".join(
            f"{k} {n}" for k, n in mf(r)["quarantine_reasons"].items()) + ")"))
    row("part in the release of dlib / MobileFaceNet / FaceNet-CASIA / FaceNet-MS-Celeb (validation, from run.json)",
        lambda r: " / ".join(v(r)["roles"].get(rec) or "-" for rec in RECOGNIZERS))
    row("re-ID by dlib-resnet (released faces)", lambda r: _reid_cell(v(r)["reid"]["dlib-resnet"]))
    row("re-ID by MobileFaceNet", lambda r: _reid_cell(v(r)["reid"]["mobilefacenet"]))
    row("re-ID by FaceNet-CASIA", lambda r: _reid_cell(v(r)["reid"]["facenet-casia"]))
    row("FaceNet-CASIA re-ID after validation's restoration attack (worst restoration per face)",
        lambda r: _pct(v(r)["restored_reid"]["facenet-casia"]))
    row("top-1 identification, FaceNet-CASIA (chance)",
        lambda r: f"{_pct(v(r)['top1']['facenet-casia']['rate'])} ({_pct(v(r)['top1']['facenet-casia']['chance'])})")
    row("re-ID by FaceNet-MS-Celeb (independent: no method sees it)",
        lambda r: _reid_cell(v(r)["reid"]["facenet-msceleb"]))
    row("FaceNet-MS-Celeb re-ID after validation's restoration attack",
        lambda r: _pct(v(r)["restored_reid"]["facenet-msceleb"]))
    row("top-1 identification, FaceNet-MS-Celeb (chance)",
        lambda r: f"{_pct(v(r)['top1']['facenet-msceleb']['rate'])} ({_pct(v(r)['top1']['facenet-msceleb']['chance'])})")
    row("top-1 identification among all original faces, dlib (chance)",
        lambda r: f"{_pct(v(r)['top1']['dlib-resnet']['rate'])} ({_pct(v(r)['top1']['dlib-resnet']['chance'])})")
    row("top-1 identification, MobileFaceNet (chance)",
        lambda r: f"{_pct(v(r)['top1']['mobilefacenet']['rate'])} ({_pct(v(r)['top1']['mobilefacenet']['chance'])})")
    row("dlib distance of released faces (min / median; match <= 0.6)",
        lambda r: f"{min(v(r)['dlib_scores']):.3f} / {float(np.median(v(r)['dlib_scores'])):.3f}")
    row("dlib re-ID before certification (raw transfer, fsap-raw run)",
        lambda r: "-")
    row("dlib re-ID after an attacker's restoration, worst of " + ", ".join(_restorations()),
        lambda r: _worst_restoration(r["restoration"]))
    row("reference: the same on the untouched original, JPEG q50 / down-up x0.25",
        lambda r: " / ".join(f"{r['restoration'][a]['reidentified']}/{r['restoration'][a]['faces']}"
                             for a in ("original-jpeg-q50", "original-rescale-0.25")))
    row("detection rate, CenterFace", lambda r: _pct(v(r)["detection"]["centerface"]))
    row("detection rate, MTCNN", lambda r: _pct(v(r)["detection"]["mtcnn"]))
    row("face-region SSIM (mean)", lambda r: _num(v(r)["face_ssim"]))
    row("face-region LPIPS-alex (mean, lower = closer)", lambda r: _num(v(r)["face_lpips"]))
    row("face-centre colour shift, CIE76 delta E of mean CIELAB (mean / max; lightness change L*)",
        lambda r: "-" if v(r).get("color_shift", [None])[0] is None else
        "{:.2f} / {:.2f} ({:+.2f})".format(*v(r)["color_shift"]))
    row("FID / FD (whole images)", lambda r: f"{v(r)['fid']['name']} {v(r)['fid']['value']:.1f}")
    row("gender agreement", lambda r: _pct(v(r)["gender_agreement"]))
    row("expression agreement", lambda r: _pct(v(r)["expression_agreement"]))
    row("age MAE (years), the gate's network (Cydral)", lambda r: _num(v(r)["age_mae"], "{:.1f}"))
    row("age MAE (years), second opinion (WideResNet, not gated)",
        lambda r: _num(v(r).get("age_wideresnet_mae"), "{:.1f}"))
    row("FSAP iterations per face, final round (median / p90)",
        lambda r: "-" if not mf(r)["fsap_faces"] else
        f"{mf(r)['fsap_iterations_final_round']['median']:.0f} / {mf(r)['fsap_iterations_final_round']['p90']:.0f}")
    row("faces by rounds needed (0 = first round passed)",
        lambda r: "-" if not mf(r)["fsap_faces"] else
        ", ".join(f"r{k}: {n}" for k, n in mf(r)["fsap_rounds"].items()))
    row("FSAP faces / fallback (< min_face)",
        lambda r: "-" if not mf(r)["fsap_faces"] and not mf(r)["fsap_fallback_faces"] else
        f"{mf(r)['fsap_faces']} / {mf(r)['fsap_fallback_faces']}")
    row("FSAP stage s per face (CPU, manifest timings)",
        lambda r: "-" if not mf(r)["fsap_faces"] else f"{mf(r)['fsap_seconds_per_face']:.1f}")
    row("run wall time", lambda r: f"{r['run_wall_s']:.0f} s")
    row("validation wall time", lambda r: f"{r['validate_wall_s']:.0f} s")
    row("gates (method-aware defaults)", lambda r: v(r)["status"] + (
        "" if not v(r)["failed_gates"] else " (failed: " + ", ".join(v(r)["failed_gates"]) + ")"))
    # The raw-transfer row: filled in from the fsap-raw run, in the fsap columns only.
    raw_line = next(i for i, ln in enumerate(lines) if ln.startswith("| dlib re-ID before certification"))
    cells = []
    for ds, m, _rec in cols:
        raw = results[ds].get("fsap-raw", {})
        if m != "fsap":
            cells.append("-")
        elif "manifest" not in raw:
            cells.append(raw.get("missing", "-")[:80])
        else:
            r0 = raw["manifest"]["round0_dlib"]
            cells.append(f"{_pct(r0['matched'] / r0['faces']) if r0['faces'] else '-'} ({r0['matched']}/{r0['faces']})")
    lines[raw_line] = "| dlib re-ID before certification (raw transfer, fsap-raw run) | " + " | ".join(cells) + " |"
    lines += ["", *targets_markdown(results)]
    return "\n".join(lines)


def targets_markdown(results: dict[str, Any]) -> list[str]:
    """Targets met or not, per dataset: dlib re-ID <= 2 % with faces still detected >= 95 %
    (by both detectors), and FSAP's face LPIPS clearly below blur's (at most half)."""
    out = ["| target | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    reid_cells, raw_cells, lpips_cells, independent_cells = [], [], [], []
    for ds in results:
        f, b, raw = results[ds]["fsap"], results[ds]["blur"], results[ds].get("fsap-raw", {})
        try:
            fv = f["validation"]
            rate = fv["reid"]["dlib-resnet"]["rate"]
            det = min(fv["detection"]["centerface"], fv["detection"]["mtcnn"])
            ok = rate <= 0.02 and det >= 0.95
            reid_cells.append(f"{'met' if ok else 'NOT met'}: {_pct(rate)} re-ID, "
                              f"detected {_pct(fv['detection']['centerface'])} / {_pct(fv['detection']['mtcnn'])}")
        except (KeyError, TypeError):
            reid_cells.append("n/a")
        try:
            r0 = raw["manifest"]["round0_dlib"]
            rate0 = r0["matched"] / r0["faces"]
            raw_cells.append(f"{'met' if rate0 <= 0.02 else 'NOT met'}: {_pct(rate0)} ({r0['matched']}/{r0['faces']})")
        except (KeyError, TypeError, ZeroDivisionError):
            raw_cells.append("n/a")
        try:
            rate = f["validation"]["reid"]["facenet-msceleb"]["rate"]
            independent_cells.append(f"{'met' if rate <= 0.02 else 'NOT met'}: {_pct(rate)}")
        except (KeyError, TypeError):
            independent_cells.append("n/a")
        try:
            lf, lb = f["validation"]["face_lpips"], b["validation"]["face_lpips"]
            lpips_cells.append(f"{'met' if lf <= 0.5 * lb else 'NOT met'}: {lf:.3f} vs {lb:.3f}")
        except (KeyError, TypeError):
            lpips_cells.append("n/a")
    out.append("| FSAP release: dlib re-ID <= 2 % with faces detected >= 95 % (CenterFace / MTCNN) | "
               + " | ".join(reid_cells) + " |")
    out.append("| same re-ID bound before certification (one round, raw transfer) | " + " | ".join(raw_cells) + " |")
    out.append("| same re-ID bound for FaceNet-MS-Celeb, the independent recognizer (released faces) | "
               + " | ".join(independent_cells) + " |")
    out.append("| FSAP face LPIPS clearly below blur's (<= half) | " + " | ".join(lpips_cells) + " |")
    return out


def _shard_images(tar_path: Path) -> dict[str, np.ndarray]:
    """key -> RGB pixels of every image of one WebDataset shard."""
    import tarfile

    from PIL import Image

    images: dict[str, np.ndarray] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar.getmembers():
            stem, _, ext = m.name.rpartition(".")
            if ext in ("jpg", "jpeg", "png"):
                images[stem] = np.asarray(Image.open(tar.extractfile(m)).convert("RGB"))
    return images


def _released(out: Path) -> dict[str, np.ndarray]:
    """key -> released RGB pixels of a Veil output (quarantined samples are absent)."""
    images: dict[str, np.ndarray] = {}
    for tar_path in sorted((out / "data").glob("*.tar")):
        images.update(_shard_images(tar_path))
    return images


def make_figure(work: Path, results: dict[str, Any], *, n_faces: int = 4) -> Path | None:
    """FSAP and blurred faces of the same people side by side (released pixels only, never an
    original), and the per-face dlib distances of both against the 0.6 threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    # Faces to show: from the scenes if present, one per sample, spread over face sizes.
    picks: list[tuple[str, str, list[float]]] = []
    for ds in ("scenes", "photos"):
        audit = work / "audit" / f"{ds}-fsap" / "validation" / "faces"
        if not audit.exists() or not (work / "out" / f"{ds}-blur" / "data").exists():
            continue
        fsap_img, blur_img = _released(work / "out" / f"{ds}-fsap"), _released(work / "out" / f"{ds}-blur")
        rows = [r for f in sorted(audit.glob("*.parquet")) for r in pq.read_table(f).to_pylist()
                if r["key"] in fsap_img and r["key"] in blur_img]
        rows.sort(key=lambda r: -(json.loads(r["box"])[3] - json.loads(r["box"])[1]))
        by_key = list({r["key"]: r for r in reversed(rows)}.values())[::-1]  # largest face per sample
        if by_key:
            idx = sorted({round(i) for i in np.linspace(0, len(by_key) - 1, min(n_faces, len(by_key)))})
            picks = [(ds, by_key[i]["key"], json.loads(by_key[i]["box"])) for i in idx]
            break
    dists = {m: [s for ds in results for s in (results[ds][m].get("validation") or {}).get("dlib_scores", [])]
             for m in ("fsap", "blur")}
    raw = [s for ds in results for s in ((results[ds].get("fsap-raw") or {}).get("manifest") or {})
           .get("round0_dlib", {}).get("scores", [])]
    if not picks and not any(dists.values()):
        return None
    fig = plt.figure(figsize=(3.0 * max(len(picks), 2), 8.5))
    grid = fig.add_gridspec(3, max(len(picks), 1), height_ratios=[1, 1, 1.2])
    cache: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for j, (ds, key, (x0, y0, x1, y1)) in enumerate(picks):
        for i, method in enumerate(("fsap", "blur")):
            if (ds, method) not in cache:
                cache[(ds, method)] = _released(work / "out" / f"{ds}-{method}")
            img = cache[(ds, method)][key]
            m = 0.25 * max(x1 - x0, y1 - y0)
            crop = img[int(max(0, y0 - m)):int(min(img.shape[0], y1 + m)), int(max(0, x0 - m)):int(min(img.shape[1], x1 + m))]
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(crop)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{method.upper()} {key} ({y1 - y0:.0f} px)", fontsize=9)
    ax = fig.add_subplot(grid[2, :])
    bins = np.linspace(0.3, 1.1, 41)
    for label, values, color in (("FSAP release", dists["fsap"], "tab:blue"), ("blur release", dists["blur"], "tab:orange"),
                                 ("FSAP, one round, before certification", raw, "tab:green")):
        if values:
            ax.hist(values, bins=bins, alpha=0.5, color=color, label=f"{label} (n={len(values)})")
    ax.axvline(DLIB_THRESHOLD, color="k", linestyle="--", label=f"dlib threshold {DLIB_THRESHOLD}")
    ax.set_xlabel("dlib ResNet distance, anonymized face vs original (<= 0.6: same person)")
    ax.set_ylabel("faces")
    ax.legend(fontsize=8)
    fig.suptitle("Released pixels only: FSAP (top) and blur (middle); no original is shown", fontsize=10)
    fig.tight_layout()
    path = work / "fsap_vs_blur.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ driver


def main() -> None:
    """Build the datasets, run every step, then collect figures, table and plot."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "bench-fsap"), help="work folder (default: bench-fsap/)")
    ap.add_argument("--scenes", type=int, default=12, help="scene images of 640x480 (default: 12)")
    ap.add_argument("--datasets", default="photos,scenes", help="comma-separated: photos, scenes")
    ap.add_argument("--seed", type=int, default=7, help="seed of the scene builder")
    ap.add_argument("--fresh", action="store_true", help="rebuild the data and redo every step")
    ap.add_argument("--report-only", action="store_true", help="only collect figures from finished steps")
    args = ap.parse_args()
    if not os.environ.get("VEIL_MODELS"):
        os.environ["VEIL_MODELS"] = str(ROOT.parent / "shared" / "models")
    work = Path(args.work).resolve()
    datasets = [d for d in args.datasets.split(",") if d]
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        ap.error(f"unknown dataset(s): {', '.join(sorted(unknown))}")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    inputs = {"photos": str(work / "data" / "photos" / "photos-0000.tar"),
              "scenes": str(work / "data" / f"scenes-{args.scenes}-s{args.seed}" / "scenes-0000.tar")}
    if "photos" in datasets and not Path(inputs["photos"]).exists():
        build_photos(Path(inputs["photos"]).parent)
    if "scenes" in datasets and not Path(inputs["scenes"]).exists():
        build_scenes(Path(inputs["scenes"]).parent, args.scenes, seed=args.seed)
    steps = plan_steps(work, inputs, datasets)
    if args.report_only:
        record = work / "steps.json"
        done = json.loads(record.read_text()) if record.exists() else {}
    else:
        done = run_steps(work, steps, fresh=args.fresh)
    results = collect(work, datasets, done, inputs)
    command = "VEIL_MODELS=../shared/models .venv/bin/python benchmarks/bench_fsap.py " + shlex.join(
        a for a in sys.argv[1:] if a != "--report-only")
    table = table_markdown(results)
    figure = make_figure(work, results)
    meta = {"command": command.strip(), "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "figure": None if figure is None else str(figure), "steps": {k: {kk: vv for kk, vv in v.items()
                                                                             if kk != "tail"} for k, v in done.items()}}
    (work / "results.json").write_text(json.dumps({**meta, "results": results}, indent=1, default=str))
    (work / "results.md").write_text(f"Command: `{meta['command']}` ({meta['date']})\n\n{table}\n")
    print(f"    {meta['command']}\n")
    print(table)
    if figure is not None:
        print(f"\nfigure: {figure}")
    for ds in results:
        for m, rec in results[ds].items():
            for k in ("missing", "validation_missing"):
                if k in rec:
                    print(f"{ds}/{m}: {rec[k]}", file=sys.stderr)


if __name__ == "__main__":
    main()
