"""The audit report: numbers from the manifests, a page that renders in a real browser, and
only anonymized regions in its picture grid."""

from __future__ import annotations

import json
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
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (Debian package 'chromium')")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    url = (run_output / "report" / "index.html").as_uri()
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    for section in ("summary", "quarantine", "shards", "detections", "throughput", "grid", "models", "config"):
        assert f'id="{section}"' in dom, section
    for plot in ("status", "faces_per_image", "scores", "stages"):
        assert f'data-plot="{plot}"' in dom, plot
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--window-size=1200,2000", f"--screenshot={shot}", url],
                   capture_output=True, timeout=120)
    from PIL import Image

    with Image.open(shot) as img:
        assert img.size == (1200, 2000)
        # A rendered page, not a blank one: plots and tables put many colours on screen.
        assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
