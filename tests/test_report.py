"""The audit report: numbers from the manifests, a page that renders in a real browser, and
only anonymized regions in its picture grid."""

from __future__ import annotations

import html
import json
import os
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
    from veil.orchestrate import run

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
    assert report["keys"] == {"manifest_rows": 3, "distinct": 3, "duplicated": []}
    assert report["verdict"]["status"] == "not_validated" and "veil validate" in report["verdict"]["why"]
    assert report["method"]["name"] == "blur" and report["method"]["kind"] == "obscuring"
    assert report["method"]["params"].startswith("Gaussian blur, sigma = 0.2")
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
    for section in ("verdict", "overview", "details", "summary", "quarantine", "shards", "detections",
                    "throughput", "grid", "models", "config"):
        assert f'id="{section}"' in dom, section
    # No validation: nothing failed or was skipped, and nothing claims the release is cleared.
    assert 'id="failing"' not in dom and 'id="not-evaluated"' not in dom
    assert 'class="verdict not_validated"' in dom and "NOT VALIDATED" in dom
    # One sample of each status, one image with a face and one without, one detector score:
    # bars of equal height and a histogram of a single value are not drawn.
    assert re.findall(r'data-plot="([^"]+)"', dom) == ["stages"]
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1280, 800)
        # A rendered page, not a blank one: text, tables and the band put many colours on screen.
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
                     attributes: bool = True, method: str = "blur", expression: bool = True) -> dict:
    """A validation folder as the engine writes it: summary.json and two shards' samples/faces
    Parquet tables (made-up but self-consistent numbers). Some metrics are NaN or None, as
    unmeasured ones are; without ``expression`` the expression classifier measured nothing."""
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
        "utility.accuracy_drop": None, "face.ssim_mean": float("nan"),
        "orientation.agreement": 1.0,
    }
    if not expression:
        metrics["attributes.expression_agreement"] = float("nan")
    if inception:
        metrics |= {"fid.inception": 88.0, "kid.inception": None}
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
        # A gate this report has never heard of: it must show up as any other.
        _gate("orientation", "orientation.agreement", "passed", lo=0.95, value=1.0),
        # A warning (Great Expectations severity): reported when it fails, never decides.
        _gate("photos-upright", "orientation_changed", "failed", table="samples", hi=0, mostly=1.0, value=0.9)
        | {"severity": "warning", "category": "utility", "blocking": False},
    ]
    details = {"identity": {}, "fd": {"mobilenetv2": {"name": "FD-MobileNetV2", "value": 12.5}},
               "detection": {"centerface": {"original": 14, "redetected": 13}},
               "attributes": None, "utility": None, "big": list(range(1000))}
    if attributes:
        details["attributes"] = {
            "age_mae": 4.1,
            "gender_confusion": {"labels": ["female", "male"], "matrix": [[5, 1], [0, 8]]},
            "expression_confusion": {"labels": ["happy", "neutral", "sad"],
                                     "matrix": [[3, 2, 0], [1, 6, 0], [0, 1, 1]] if expression else
                                     [[0, 0, 0], [0, 0, 0], [0, 0, 0]]},
        }
    summary = {
        "status": "failed" if failing else "passed", "method": method, "original": "in/{000..001}.tar",
        "anonymized": "out/data", "gates_file": "default", "metrics": metrics, "details": details,
        "gates": gates,
        "models": [{"name": "mobilefacenet_ms1m", "path": "/models/mobilefacenet.pt", "sha256": SHA,
                    "license": "MIT", "source": "foamliu/MobileFaceNet", "used_for": "recognizer mobilefacenet"}],
        "recognizers": RECOGNIZERS,
        # Shard 0 holds the re-identified faces of a failing validation.
        "per_shard": {s: {"pairs": 5, "identity.mobilefacenet.verification_rate": (0.25 if i == 0 else 0.04)
                          if failing else 0.0, "residual.faces": int(failing)}
                      for i, s in enumerate(shards)},
        "seconds": 3.5, "images_per_second": 2.9,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    if not failing:
        (root / "RELEASE.json").write_text(json.dumps({"releasable": True}))
    return summary




def _text(page: str) -> str:
    """The words on a page: no tags, no style, no embedded images (base64 can spell anything)."""
    page = re.sub(r"data:image/(png|jpeg);base64,[A-Za-z0-9+/=]+", "", page)
    page = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def _section(page: str, section_id: str) -> str:
    """One (non-nested) section of a page, as written or as Chromium serialises it."""
    match = re.search(rf"<section id=[\"']{re.escape(section_id)}[\"']", page)
    assert match, section_id
    return page[match.start():page.index("</section>", match.start())]


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
    assert [g["status"] for g in v["gates"]] == ["passed"] * 5 + ["not_evaluated", "passed", "failed"]
    assert v["pairing"] == {"pairs": 10, "missing_anonymized": 1, "missing_original": 0, "not_released": 1,
                            "errors": 0, "faces_original": 14}
    assert v["statuses"] == {"missing_anonymized": 1, "not_released": 1, "paired": 10}
    assert v["tables"] == {"samples": {"files": 2, "rows": 12}, "faces": {"files": 2, "rows": 14}}
    assert "per_shard" not in v and v["per_shard_count"] == 2  # bulky parts stay in summary.json
    assert v["details"]["big"] == {"omitted": "list of 1000 items, see validation/summary.json"}
    assert v["details"]["attributes"]["gender_confusion"]["matrix"] == [[5, 1], [0, 8]]
    assert v["metrics"]["fd.mobilenetv2"] == 12.5 and v["metrics"]["fid.inception"] == 88.0
    assert v["metrics"]["face.ssim_mean"] is None  # NaN in the summary
    assert v["recognizers"]["facenet-vggface2"]["available"] is False
    assert report["verdict"] == {"status": "released", "label": "RELEASED",
                                 "why": "Validation PASSED: all 6 evaluated gates passed; RELEASE.json was written."
                                        " 1 warning gate failed (reported, not blocking)."}
    assert report["method"] == {"name": "blur", "kind": "obscuring", "params": None, "detection": None}

    page = page_path.read_text()
    assert "id='summary'" not in page and "id='grid'" not in page and "<figure" not in page
    assert "class='verdict released'" in page and "validated as given" in _section(page, "overview")


def test_failing_validation_lists_the_failing_keys_and_no_pictures(tmp_path):
    from veil.validators.report import build_report

    write_validation(tmp_path, failing=True)
    page = build_report(tmp_path).read_text()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["validation"]["status"] == "failed" and report["validation"]["release_file"] is None
    assert report["verdict"]["status"] == "withheld" and "Validation FAILED: 3 gates failed" in report["verdict"]["why"]
    gates = {g["name"]: g for g in report["validation"]["gates"]}
    assert [n for n, g in gates.items() if g["status"] == "failed"] == [
        "no-reidentification", "background-kept", "no-residual-faces", "photos-upright"]
    # Evidence: the shard over the bound on its own (in-001.tar is under it), the shard with rows out.
    assert gates["no-reidentification"]["worst_shards"] == [{"shard": "in-000.tar", "value": 0.25}]
    assert gates["no-residual-faces"]["worst_shards"] == [{"shard": "in-000.tar", "value": 1},
                                                          {"shard": "in-001.tar", "value": 1}]
    assert [s["shard"] for s in gates["background-kept"]["worst_shards"]] == ["in-001.tar"]
    assert "worst_shards" not in gates["distribution"]  # only failed gates carry evidence
    failing = _section(page, "failing")
    for key in ("s000#0", "s100#0", "s003", "s101"):
        assert f"<code>{key}</code>" in failing, key
    assert "no single sample drove it" in failing  # the dataset-level residual gate
    imgs = re.findall(r"<img[^>]*>", page)
    assert imgs and all("data-plot=" in img and "data:image/png;base64," in img for img in imgs)
    assert "data:image/jpeg" not in page


def test_fd_mobilenetv2_is_never_called_fid(tmp_path):
    from veil.validators.report import build_report, metric_family, metric_label

    assert "FD-MobileNetV2" in metric_label("fd.mobilenetv2") and "FID" not in metric_label("fd.mobilenetv2")
    assert all("FID" not in metric_label(n) for n in ("kid.mobilenetv2", "fd.face.mobilefacenet", "kid.inception"))
    assert metric_label("fid.inception").startswith("FID")
    assert {metric_family(n) for n in ("fd.mobilenetv2", "kid.inception", "fid.inception")} == {"distribution"}
    assert metric_family("pairs") == "pairing" and metric_family("leakage.sim.mobilefacenet") == "leakage"

    write_validation(tmp_path, failing=False, inception=False)
    text = _text(build_report(tmp_path).read_text())
    assert "FD-MobileNetV2" in text and "FID" not in text
    with_inception = tmp_path / "with-inception"
    write_validation(with_inception, failing=False, inception=True)
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", build_report(with_inception).read_text())
    rows = [row for row in re.findall(r"<tr.*?</tr>", page) if "FID" in row]
    assert rows and all("fid.inception" in row for row in rows)


def test_validation_plots_are_skipped_cleanly_without_their_data(tmp_path):
    from veil.validators.report import build_report

    write_validation(tmp_path, failing=True, tables=False, attributes=False)
    page = build_report(tmp_path).read_text()
    plots = re.findall(r"data-plot='([^']+)'", page)
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


def test_verdict_needs_both_a_passed_validation_and_its_release_file():
    from veil.validators.report import verdict

    passed = [_gate("a", "m", "passed", hi=1.0, value=0.5)]
    warning = [_gate("w", "m", "failed", hi=0.1, value=0.5) | {"severity": "warning"}]
    optional = [_gate("opt", "n", "not_evaluated", hi=1.0, required=False, reason="model missing")]
    required = [_gate("req", "r", "not_evaluated", hi=1.0, reason="model missing")]

    def v(status, gates, release):
        return verdict({"validation": {"status": status, "gates": gates,
                                       "release_file": "OUT/RELEASE.json" if release else None}})

    assert v("passed", passed + optional, True)["status"] == "released"
    assert "1 warning gate failed" in v("passed", passed + warning, True)["why"]
    assert "(a)" in v("failed", [passed[0] | {"status": "failed"}] + warning, False)["why"]
    changed = v("passed", passed, False)
    assert changed["status"] == "withheld" and "RELEASE.json is missing" in changed["why"]
    stale = v("failed", passed + required, True)
    assert stale["status"] == "withheld" and "1 required gate could not be evaluated (req)" in stale["why"]
    assert "delete it" in stale["why"] and "opt" not in stale["why"]
    assert v("not_gated", [], False)["status"] == "not_validated"
    assert verdict({})["label"] == "NOT VALIDATED"
    demoted = [warning[0] | {"overridden": {"severity": ["critical", "warning"]}}]
    assert "1 gate changed by the gates file (w)" in v("passed", passed + demoted, True)["why"]


def test_gates_changed_by_the_gates_file_are_shown_where_they_decide_and_fail():
    """A reviewer sees a gate the user's file loosened: in the deciding-gates note, in the
    failing (warning) gate's card and in the full table."""
    from veil.validators.report_html import (
        all_gates,
        deciding_gates,
        failing_gates,
        overridden_text,
    )

    age = _gate("age-mae", "attributes.age_mae", "failed", hi=8.0, value=14.1, margin=6.1) | {
        "severity": "warning", "overridden": {"severity": ["critical", "warning"]}}
    lpips = _gate("face-lpips", "face.lpips_mean", "passed", hi=0.3, value=0.08) | {
        "overridden": {"max": [0.45, 0.3]}}
    reid = _gate("reid", "identity.dlib-resnet.verification_rate", "passed", hi=0.02, value=0.0) | {"overridden": {}}
    assert overridden_text(age) == "changed by the gates file: severity critical -> warning"
    assert overridden_text(lpips) == "changed by the gates file: max 0.45 -> 0.3"
    assert overridden_text(reid) == "" and overridden_text(_gate("old", "m", "passed", hi=1)) == ""
    validation = {"status": "passed", "gates": [reid, lpips, age]}
    def words(page: str) -> str:
        return " ".join(_text(page).split())

    note = words(deciding_gates(validation))
    assert "2 gates changed by the gates file (face-lpips, age-mae)" in note
    card = words(failing_gates(validation, {}, set()))
    assert "age-mae" in card and "severity critical -> warning" in card
    table = words(all_gates(validation["gates"]))
    assert table.count("changed by the gates file") == 2

    from veil.validators.report_html import _gates_files_cell

    files = [{"file": "mine.yaml", "sha256": "ab" * 32}, {"file": "veil/validators/gates.yaml", "sha256": "cd" * 32}]
    assert words(_gates_files_cell({"gates_file": "mine.yaml", "gates_files": files})) == (
        "mine.yaml sha256 abababababab extends veil/validators/gates.yaml sha256 cdcdcdcdcdcd")
    assert _gates_files_cell({"gates_file": "default"}) == "default"  # a summary from before the hashes


def test_unreadable_summary_and_empty_folder(tmp_path):
    from veil.validators.report import build_report

    with pytest.raises(FileNotFoundError, match="veil validate"):
        build_report(tmp_path)
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "summary.json").write_text("{not json")
    page = build_report(tmp_path).read_text()
    assert "class='verdict not_validated'" in page and "could not be read" in _text(page)


def _chromium_dom(url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    """The page as Chromium parsed it; with ``screenshot``, also a PNG of its first screen at
    1280x800 (the size a reviewer's laptop shows without scrolling)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (Debian package 'chromium')")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    if screenshot is not None:
        subprocess.run([chromium, *flags, "--window-size=1280,800", f"--screenshot={screenshot}", url],
                       capture_output=True, timeout=120)
    return dom


# ---------------------------------------------------------------------- layout in a browser

#: The verdict band's colours (report_html._CSS) and the rule that closes the first screen.
VERDICT_RGB = {"released": (0x1B, 0x7F, 0x3B), "withheld": (0xB4, 0x23, 0x18), "not_validated": (0x5B, 0x62, 0x70)}
RULE_RGB = (0x1F, 0x4E, 0x79)


@pytest.fixture(scope="module")
def three_reports(run_output, tmp_path_factory) -> dict[str, Path]:
    """A blur run whose gates passed, the same run with failing gates, and a failing
    ``veil validate`` of another tool's output (attributes measured, expression not)."""
    from veil.validators.report import build_report

    root = tmp_path_factory.mktemp("three")
    folders = {"pass": root / "pass", "fail": root / "fail", "validate": root / "validate"}
    for name in ("pass", "fail"):
        shutil.copytree(run_output, folders[name])
        write_validation(folders[name], failing=name == "fail")
    write_validation(folders["validate"], failing=True, method="unknown", expression=False)
    for folder in folders.values():
        build_report(folder)
    return folders


def _first_screen_shows(shot: Path, status: str) -> None:
    """The verdict's colour band spans the top of a 1280x800 screenshot, and the rule under
    the summary (verdict, release counts, method, deciding gates) is on it too."""
    import numpy as np
    from PIL import Image

    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape[:2] == (800, 1280)
    band = np.flatnonzero((pixels == VERDICT_RGB[status]).all(-1).sum(1) > 640)
    assert band.size >= 60 and band.min() == 0 and band.max() < 200, band
    for other, rgb in VERDICT_RGB.items():
        if other != status:
            assert not ((pixels == rgb).all(-1).sum(1) > 640).any(), other
    rule = np.flatnonzero((pixels == RULE_RGB).all(-1).sum(1) > 640)
    assert rule.size >= 3 and band.max() < rule.min(), "the summary does not fit the first screen"


EXPECTED = {
    "pass": ("released", set()),
    "fail": ("withheld", {"no-reidentification", "background-kept", "no-residual-faces"}),
    "validate": ("withheld", {"no-reidentification", "background-kept", "no-residual-faces"}),
}
WARNING_GATE = "photos-upright"


@pytest.mark.parametrize("name", list(EXPECTED))
def test_report_layout_in_headless_chromium(three_reports, name, tmp_path):
    status, failed = EXPECTED[name]
    out = three_reports[name]
    shot = tmp_path / f"{name}.png"
    dom = _chromium_dom((out / "report" / "index.html").as_uri(), tmp_path, shot)
    if os.environ.get("VEIL_REPORT_SHOTS"):  # for a person to look at
        Path(os.environ["VEIL_REPORT_SHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(os.environ["VEIL_REPORT_SHOTS"]) / f"{name}.png")
    _first_screen_shows(shot, status)

    # The verdict is the first thing in the page; then failures, skipped gates, details, pictures.
    assert re.search(r"<body>\s*<header id=\"verdict\" class=\"verdict " + status, dom)
    order = ["verdict", "overview", "failing", "not-evaluated", "details"] + (["grid"] if name != "validate" else [])
    positions = [dom.index(f'id="{part}"') for part in order]
    assert positions == sorted(positions), order
    summary = json.loads((out / "validation" / "summary.json").read_text())
    gates = {g["name"]: g for g in summary["gates"]}

    # First screen: every gate that decided the release, none of the optional skipped ones;
    # a gate the report does not know (orientation) is listed like the others.
    overview = _section(dom, "overview")
    deciding = set(re.findall(r'<tr class="gate" data-gate="([^"]+)"', overview))
    assert deciding == set(gates) - {"vggface2-anonymity", WARNING_GATE} and "orientation" in deciding
    # Failing gates are only those that failed, the warning apart after them; the optional
    # gate that was not evaluated is listed apart, with its reason, never as a failure.
    failing = _section(dom, "failing")
    listed = re.findall(r'data-failing-gate="([^"]+)"', failing)
    assert set(listed[:-1]) == failed and listed[-1] == WARNING_GATE
    assert failing.index('id="failing-warnings"') < failing.index(f'data-failing-gate="{WARNING_GATE}"')
    assert "vggface2-anonymity" not in failing
    skipped = _section(dom, "not-evaluated")
    assert 'data-not-evaluated="vggface2-anonymity"' in skipped
    assert "not evaluated: recognizer facenet-vggface2 not available" in _text(skipped)

    text = _text(dom)
    assert not re.search(r"\bnan\b", text, re.IGNORECASE), re.findall(r".{40}\bnan\b.{40}", text, re.I)
    plots = re.findall(r'data-plot="([^"]+)"', dom)
    assert len(plots) == len(set(plots))  # an evidence plot is not drawn twice
    assert len(re.findall(r"<img[^>]*>", dom)) == len(plots) + dom.count("data:image/jpeg")
    # Residual faces are all zero when the gates pass: no row of flat boxes.
    assert ("shards-residual_faces" in plots) == (name != "pass")
    if name == "validate":  # another tool's output: attributes measured are shown, if measured
        assert "confusion-gender" in plots and "confusion-expression" not in plots
        assert "attributes.gender_agreement" in text and "attributes.expression_agreement" not in text
        assert "Veil validation report" in text and "<figure" not in dom
    else:  # blur: attributes read off a blurred face mean nothing
        assert not any(p.startswith("confusion-") for p in plots)
        assert 'data-family="attributes"' not in dom and "gender_agreement" not in _section(dom, "details-utility")
        captions = [part.split("</figcaption>")[0] for part in dom.split("<figcaption>")[1:]]
        assert captions == ["face"] and dom.count("data:image/jpeg") == 1  # only the released crop
    if name == "fail":
        evidence = dom[dom.index('data-failing-gate="no-reidentification"'):]
        evidence = evidence[:evidence.index("</article>")]
        assert 'data-plot="verification-mobilefacenet"' in evidence and "in-000.tar" in evidence


def test_pairing_section_shows_synthetic_pool_faces_and_pseudo_counts_never_pool_ids(tmp_path):
    from PIL import Image

    from veil.validators.report import pairing_summary
    from veil.validators.report_html import pairing_block

    pool = tmp_path / "pool"
    pool.mkdir()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(pool / "contact_sheet.png")
    (pool / "pool.json").write_text(json.dumps({"generator": "dcgan-celeba32", "count": 4,
                                                "contact_sheet": "contact_sheet.png"}))
    config = {"pseudo": {"enabled": True, "pool": str(pool)}, "pool": {"path": None}}
    out = pairing_summary(["pid-1", "pid-1", "pid-2"], [0.5, 0.7, 0.9], config)
    assert out["pseudo_identities"] == 2
    assert out["faces_with_pseudo_identity"] == 3
    assert out["faces_per_pseudo_identity"] == {1: 1, 2: 1}
    assert out["pair_distance"]["median"] == pytest.approx(0.7)
    assert out["contact_sheet_png"] == "contact_sheet.png"
    page = pairing_block(out, "QUJD")
    assert "data:image/png;base64,QUJD" in page
    assert "2 face(s): 1" in page and "dcgan-celeba32" in page
    # A pool imported from photos (--from) has no contact sheet: the report shows no faces.
    (pool / "pool.json").write_text(json.dumps({"generator": "import", "count": 4}))
    out = pairing_summary([], [0.5], {"pool": {"path": str(pool)}})
    assert "contact_sheet_png" not in out and out["pseudo_identities"] is None
    assert "<img" not in pairing_block(out, None)
    assert pairing_summary([], [], {}) is None
