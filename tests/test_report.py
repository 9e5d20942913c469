"""The audit report: numbers from the manifests, a page that renders in a real browser, and
only anonymized regions in its picture grid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers import face_photo, jpeg_bytes


@pytest.fixture(scope="module")
def run_output(tmp_path_factory, faces_dir) -> Path:
    import skimage.data
    import webdataset as wds

    from veil.config import RunConfig
    from veil.pipelines.driver import run

    root = tmp_path_factory.mktemp("report")
    with wds.TarWriter(str(root / "in-000.tar")) as sink:
        sink.write({"__key__": "face", "jpg": jpeg_bytes(face_photo(faces_dir, "obama.jpg", 400))})
        sink.write({"__key__": "scene", "jpg": jpeg_bytes(skimage.data.coffee())})
        sink.write({"__key__": "broken", "jpg": b"not an image"})
    out = root / "out"
    run(RunConfig(input=str(root / "in-000.tar"), output=str(out), runner="local", progress=False,
                  max_failure_ratio=1.0))
    return out


def test_report_json_counts_match_manifests(run_output):
    report = json.loads((run_output / "report" / "report.json").read_text())
    assert report["samples"] == 3
    assert report["counts"] == {"anonymized": 1, "clean": 1, "quarantined": 1}
    assert report["quarantine_reasons"] == {"not_an_image": 1}
    assert report["quarantined"][0]["key"] == "broken"
    assert report["faces"] == 1
    assert report["shards"][0]["shard"] == "in-000.tar"
    assert report["models"][0]["name"] == "centerface" and len(report["models"][0]["sha256"]) == 64
    assert report["config"]["anonymize"]["method"] == "blur"
    assert report["throughput"]["median_stage_seconds"]["detect"] > 0


def test_report_grid_shows_only_anonymized_samples(run_output):
    html = (run_output / "report" / "index.html").read_text()
    captions = [part.split("</figcaption>")[0] for part in html.split("<figcaption>")[1:]]
    assert captions == ["face"]  # not the clean scene, not the quarantined sample


def test_report_renders_in_headless_chromium(run_output, tmp_path):
    shot = tmp_path / "report.png"
    dom = _chromium_dom((run_output / "report" / "index.html").as_uri(), tmp_path, shot)
    for section in ("summary", "quarantine", "shards", "detections", "throughput", "grid", "models", "config"):
        assert f'id="{section}"' in dom, section
    for plot in ("status", "faces_per_image", "scores", "stages"):
        assert f'data-plot="{plot}"' in dom, plot
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1200, 2000)
        # A rendered page, not a blank one: plots and tables put many colours on screen.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


# ------------------------------------------------------------------------ validation section

RECOGNIZERS = {
    "mobilefacenet": {"available": True, "reason": None, "metric": "cosine", "threshold": 0.35},
    "dlib-resnet": {"available": True, "reason": None, "metric": "euclidean", "threshold": 0.6},
    "facenet-vggface2": {"available": False, "reason": "model file 'facenet_vggface2.pt' not found",
                         "metric": None, "threshold": None},
}
SHA = "ab" * 32


def _gate(name: str, metric: str, status: str, *, table: str = "dataset", lo=None, hi=None, mostly=None,
          value=None, required: bool = True, keys=(), margin=0.0, reason=None) -> dict:
    return {"name": name, "description": f"{name} gate", "table": table, "metric": metric, "min": lo,
            "max": hi, "mostly": mostly, "required": required, "value": value, "status": status,
            "margin": margin, "failing_keys": list(keys), "reason": reason}


def write_validation(root: Path, *, failing: bool, inception: bool = True, tables: bool = True,
                     attributes: bool = True) -> dict:
    """A validation folder as the engine writes it: summary.json and two shards' samples/faces
    Parquet tables (made-up but self-consistent numbers)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(7)
    folder = root / "validation"
    shards = ["in-000.tar", "in-001.tar"]
    for shard_index, shard in enumerate(shards):
        samples, faces = [], []
        for i in range(6):
            key = f"s{shard_index}{i:02d}"
            status = "paired" if i < 5 else ("not_released" if shard_index == 0 else "missing_anonymized")
            n_faces = 0 if status != "paired" else 1 + i % 2
            scores = rng.uniform(-0.1, 0.2, n_faces) + (0.5 if failing and i == 0 else 0.0)
            dists = rng.uniform(0.8, 1.2, n_faces) - (0.5 if failing and i == 0 else 0.0)
            samples.append({
                "key": key, "shard": shard, "status": status, "error": None, "width": 640, "height": 480,
                "faces_original": n_faces, "residual_faces": int(failing and i == 0),
                "background_psnr": None if status != "paired" else float(rng.uniform(25 if failing else 40, 60)),
                "background_ssim": None if status != "paired" else float(rng.uniform(0.9, 1.0)),
                "max_score_mobilefacenet": float(scores.max()) if n_faces else None,
                "reidentified_mobilefacenet": int((scores >= 0.35).sum()),
                "max_score_dlib-resnet": float(dists.min()) if n_faces else None,
                "reidentified_dlib-resnet": int((dists <= 0.6).sum()),
            })
            for j in range(n_faces):
                faces.append({
                    "face_key": f"{key}#{j}", "key": key, "shard": shard, "box": json.dumps([10, 10, 60, 70]),
                    "score_mobilefacenet": float(scores[j]), "reidentified_mobilefacenet": bool(scores[j] >= 0.35),
                    "score_dlib-resnet": float(dists[j]), "reidentified_dlib-resnet": bool(dists[j] <= 0.6),
                    "nmi": float(rng.uniform(0, 0.3)), "detected_centerface": bool(j == 0),
                })
        if tables:
            (folder / "samples").mkdir(parents=True, exist_ok=True)
            (folder / "faces").mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(samples), folder / "samples" / f"{shard}.parquet")
            pq.write_table(pa.Table.from_pylist(faces), folder / "faces" / f"{shard}.parquet")
    metrics = {
        "pairs": 10, "missing_anonymized": 1, "missing_original": 0, "not_released": 1, "errors": 0,
        "faces_original": 14,
        "identity.mobilefacenet.verification_rate": 0.14 if failing else 0.0,
        "identity.mobilefacenet.verification_ci95_high": 0.4 if failing else 0.21,
        "identity.mobilefacenet.top1_rate": 0.07, "identity.mobilefacenet.top5_rate": 0.3,
        "identity.mobilefacenet.top1_chance": 1 / 14,
        "identity.facenet-vggface2.verification_rate": None,
        "fd.mobilenetv2": 12.5, "kid.mobilenetv2": 0.004, "fd.face.mobilefacenet": 3.2,
        "attributes.age_mae": 4.1, "attributes.gender_agreement": 0.89, "attributes.expression_agreement": 0.5,
        "detection.centerface.rate": 0.93, "detection.yunet.rate": 0.71, "detection.mtcnn.rate": None,
        "detection.landmark_displacement": 0.08,
        "background.psnr_mean": 38.0 if failing else 50.0, "background.psnr_min": 25.3 if failing else 40.2,
        "background.ssim_mean": 0.95, "background.ssim_min": 0.9,
        "leakage.nmi_mean": 0.12, "leakage.sim.mobilefacenet": 0.05,
        "residual.faces": 2 if failing else 0, "residual.samples": 2 if failing else 0,
        "utility.accuracy_drop": None,
    }
    if inception:
        metrics |= {"fid.inception": None, "kid.inception": None}
    gates = [
        _gate("no-reidentification", "identity.mobilefacenet.verification_rate", "failed" if failing else "passed",
              hi=0.05, value=metrics["identity.mobilefacenet.verification_rate"], margin=0.09 if failing else 0.0,
              keys=["s000#0", "s100#0"] if failing else []),
        _gate("background-kept", "background_psnr", "failed" if failing else "passed", table="samples", lo=30.0,
              mostly=0.95, value=0.8 if failing else 1.0, margin=0.15 if failing else 0.0,
              keys=["s003", "s101"] if failing else []),
        _gate("no-residual-faces", "residual.faces", "failed" if failing else "passed", hi=0,
              value=metrics["residual.faces"], margin=2.0 if failing else 0.0),
        _gate("distribution", "fd.mobilenetv2", "passed", hi=50.0, value=12.5),
        _gate("attributes-kept", "attributes.gender_agreement", "passed", lo=0.8, value=0.89),
        _gate("vggface2-anonymity", "identity.facenet-vggface2.verification_rate", "not_evaluated",
              hi=0.05, required=False, reason="recognizer facenet-vggface2 not available"),
    ]
    details = {"identity": {}, "fd": {"mobilenetv2": {"name": "FD-MobileNetV2", "value": 12.5}},
               "detection": {"centerface": {"original": 14, "redetected": 13}},
               "attributes": None, "utility": None, "big": list(range(1000))}
    if attributes:
        details["attributes"] = {
            "age_mae": 4.1,
            "gender_confusion": {"labels": ["female", "male"], "matrix": [[5, 1], [0, 8]]},
            "expression_confusion": {"labels": ["happy", "neutral", "sad"],
                                     "matrix": [[3, 2, 0], [1, 6, 0], [0, 1, 1]]},
        }
    summary = {
        "status": "failed" if failing else "passed", "method": "blur", "original": "in/{000..001}.tar",
        "anonymized": "out/data", "gates_file": "default", "metrics": metrics, "details": details,
        "gates": gates,
        "models": [{"name": "mobilefacenet_ms1m", "path": "/models/mobilefacenet.pt", "sha256": SHA,
                    "license": "MIT", "source": "foamliu/MobileFaceNet", "used_for": "recognizer mobilefacenet"}],
        "recognizers": RECOGNIZERS,
        "per_shard": {s: {"pairs": 5} for s in shards},
        "seconds": 3.5, "images_per_second": 2.9,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    if not failing:
        (root / "RELEASE.json").write_text(json.dumps({"releasable": True}))
    return summary


def _validation_section(page: str, *, text_only: bool = False) -> str:
    start = page.index('<section id="validation">') if '<section id="validation">' in page else \
        page.index("<section id='validation'>")
    section = page[start:page.index("</section>", start)]
    # The plots' base64 can spell anything: drop it where the words on the page are checked.
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", section) if text_only else section


def test_validation_only_folder_gets_a_report_of_the_validation_alone(tmp_path):
    from veil.validators.report import build_report

    write_validation(tmp_path, failing=False)
    page_path = build_report(tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["contents"] == ["validation"]
    assert "samples" not in report and "counts" not in report  # no run sections
    v = report["validation"]
    assert v["status"] == "passed" and v["method"] == "blur"
    assert v["release_file"] == str(tmp_path / "RELEASE.json")
    assert [g["status"] for g in v["gates"]] == ["passed"] * 5 + ["not_evaluated"]
    assert v["pairing"] == {"pairs": 10, "missing_anonymized": 1, "missing_original": 0, "not_released": 1,
                            "errors": 0, "faces_original": 14}
    assert v["tables"] == {"samples": {"files": 2, "rows": 12}, "faces": {"files": 2, "rows": 14}}
    assert "per_shard" not in v and v["per_shard_count"] == 2  # bulky parts stay in summary.json
    assert v["details"]["big"] == {"omitted": "list of 1000 items, see validation/summary.json"}
    assert v["details"]["attributes"]["gender_confusion"]["matrix"] == [[5, 1], [0, 8]]
    assert v["metrics"]["fd.mobilenetv2"] == 12.5 and v["metrics"]["fid.inception"] is None
    assert v["recognizers"]["facenet-vggface2"]["available"] is False

    page = page_path.read_text()
    assert "id='summary'" not in page and "id='grid'" not in page and "<figure" not in page
    section = _validation_section(page)
    assert "<strong>PASSED</strong>" in section and "RELEASE.json was written" in section


def test_failing_validation_lists_the_failing_keys_and_no_pictures(tmp_path):
    from veil.validators.report import build_report

    write_validation(tmp_path, failing=True)
    page = build_report(tmp_path).read_text()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["validation"]["status"] == "failed" and report["validation"]["release_file"] is None
    failed = [g["name"] for g in report["validation"]["gates"] if g["status"] == "failed"]
    assert failed == ["no-reidentification", "background-kept", "no-residual-faces"]
    section = _validation_section(page)
    assert "<strong>FAILED</strong>" in section and "RELEASE.json was not written" in section
    for key in ("s000#0", "s100#0", "s003", "s101"):
        assert f"<code>{key}</code>" in section, key
    assert "no single sample drove it" in section  # the dataset-level residual gate
    imgs = re.findall(r"<img[^>]*>", section)
    assert imgs and all("data-plot=" in img and "data:image/png;base64," in img for img in imgs)
    assert "data:image/jpeg" not in section


def test_fd_mobilenetv2_is_never_called_fid(tmp_path):
    from veil.validators.report import build_report, metric_family, metric_label

    assert "FD-MobileNetV2" in metric_label("fd.mobilenetv2") and "FID" not in metric_label("fd.mobilenetv2")
    assert all("FID" not in metric_label(n) for n in ("kid.mobilenetv2", "fd.face.mobilefacenet", "kid.inception"))
    assert metric_label("fid.inception").startswith("FID")
    assert {metric_family(n) for n in ("fd.mobilenetv2", "kid.inception", "fid.inception")} == {"distribution"}
    assert metric_family("pairs") == "pairing" and metric_family("leakage.sim.mobilefacenet") == "leakage"

    write_validation(tmp_path, failing=False, inception=False)
    section = _validation_section(build_report(tmp_path).read_text(), text_only=True)
    assert "FD-MobileNetV2" in section and "FID" not in section
    with_inception = tmp_path / "with-inception"
    write_validation(with_inception, failing=False, inception=True)
    section = _validation_section(build_report(with_inception).read_text(), text_only=True)
    rows = [row for row in re.findall(r"<tr.*?</tr>", section) if "FID" in row]
    assert rows and all("fid.inception" in row for row in rows)


def test_validation_plots_are_skipped_cleanly_without_their_data(tmp_path):
    from veil.validators.report import build_report

    write_validation(tmp_path, failing=True, tables=False, attributes=False)
    section = _validation_section(build_report(tmp_path).read_text())
    plots = re.findall(r"data-plot='([^']+)'", section)
    assert plots == ["detection-rate"]  # no tables: no histograms, no box plots; no confusion matrices
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["validation"]["tables"]["samples"]["rows"] == 0


def test_box_plots_keep_the_worst_shards_in_the_metric_direction():
    from veil.validators.report import worst_by_median

    stats = [{"label": f"shard-{i}", "med": m} for i, m in enumerate([40.0, 25.0, 55.0, 25.0, 31.0])]
    assert [s["label"] for s in worst_by_median(stats, worse="low", limit=3)] == ["shard-1", "shard-3", "shard-4"]
    assert [s["label"] for s in worst_by_median(stats, worse="high", limit=2)] == ["shard-2", "shard-0"]
    with pytest.raises(ValueError, match="worse"):
        worst_by_median(stats, worse="up", limit=2)


def test_unreadable_summary_and_empty_folder(tmp_path):
    from veil.validators.report import build_report

    with pytest.raises(FileNotFoundError, match="veil validate"):
        build_report(tmp_path)
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "summary.json").write_text("{not json")
    section = _validation_section(build_report(tmp_path).read_text())
    assert "<strong>UNKNOWN</strong>" in section and "could not be read" in section


def _chromium_dom(url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (Debian package 'chromium')")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    if screenshot is not None:
        subprocess.run([chromium, *flags, "--window-size=1200,2000", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120)
    return dom


def test_failing_validation_renders_in_headless_chromium(tmp_path):
    from veil.validators.report import build_report

    out = tmp_path / "audit"
    write_validation(out, failing=True)
    shot = tmp_path / "validation.png"
    dom = _chromium_dom(build_report(out).as_uri(), tmp_path, shot)
    section = _validation_section(dom)
    for part in ("validation-gates", "validation-failing", "validation-pairing", "validation-metrics",
                 "validation-plots", "validation-recognizers", "validation-models"):
        assert f'id="{part}"' in section, part
    assert 'id="summary"' not in dom and 'id="grid"' not in dom
    assert 'class="banner failed" data-status="failed"' in section
    gates = dict(re.findall(r'<tr class="gate" data-gate="([^"]+)" data-status="([^"]+)"', section))
    assert gates == {"no-reidentification": "failed", "background-kept": "failed", "no-residual-faces": "failed",
                     "distribution": "passed", "attributes-kept": "passed", "vggface2-anonymity": "not_evaluated"}
    plots = re.findall(r'data-plot="([^"]+)"', section)
    assert set(plots) == {"verification-mobilefacenet", "verification-dlib-resnet", "confusion-gender",
                          "confusion-expression", "shards-background_psnr", "shards-residual_faces",
                          "shards-max_score_mobilefacenet", "shards-max_score_dlib-resnet", "detection-rate"}
    imgs = re.findall(r"<img[^>]*>", section)
    assert len(imgs) == len(plots)  # no picture other than the plots
    for key in ("s000#0", "s100#0", "s003", "s101"):
        assert f"<code>{key}</code>" in section, key
    for family in ("identity", "distribution", "attributes", "detection", "background", "leakage", "residual"):
        assert f'data-family="{family}"' in section, family
    assert f'title="{SHA}"' in section and SHA[:12] in section
    assert "model file 'facenet_vggface2.pt' not found" in section
    from PIL import Image

    with Image.open(shot) as img:
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50


def test_run_output_with_validation_puts_the_gates_near_the_top(run_output, tmp_path):
    from veil.validators.report import build_report

    out = tmp_path / "out"
    shutil.copytree(run_output, out)
    write_validation(out, failing=False)
    dom = _chromium_dom(build_report(out).as_uri(), tmp_path)
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["contents"] == ["run", "validation"]
    assert report["samples"] == 3 and report["validation"]["status"] == "passed"
    assert dom.index('id="validation"') < dom.index('id="summary"') < dom.index('id="grid"')
    section = _validation_section(dom)
    assert 'data-status="passed"' in section
    assert len(re.findall(r"<img[^>]*>", section)) == len(re.findall(r'data-plot="', section))
    captions = [part.split("</figcaption>")[0] for part in dom.split("<figcaption>")[1:]]
    assert captions == ["face"]  # the run's picture grid is unchanged, outside the validation section
