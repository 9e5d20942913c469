"""Personal data besides faces through the whole pipeline: text on signs, licence plates and
captions in a WebDataset shard, anonymized by class policy, re-scanned, validated.

After a run, an independent OCR pass over the released images reads none of the planted PII
strings or plate characters, the released captions and JSON hold none of the planted values,
and nothing read (text, plates, values) appears in the manifest, run.json or the report.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from helpers import jpeg_bytes, write_tar
from pii_images import benign_scene, blank_scene, plate_scene, sign_scene

from veil.config import RunConfig

CAPTION = "Maria Garcia at the Berlin office, call +49 30 1234567 or write maria.garcia@example.com"
META = {"photographer": "John Smith", "contact": {"email": "j.smith@mailbox.org"}, "tags": ["street", "sign"],
        "width": 640}
PLANTED_FIELD_VALUES = ("Maria Garcia", "+49 30 1234567", "maria.garcia@example.com", "John Smith",
                        "j.smith@mailbox.org")


def _normalise(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """One shard: three PII signs, two plates, a benign sign, a blank scene, a face photo;
    captions and JSON on some; one caption that is not UTF-8 text."""
    root = tmp_path_factory.mktemp("pii")
    scenes = {"sign0": sign_scene(0), "sign1": sign_scene(1), "sign2": sign_scene(2),
              "plate0": plate_scene(0), "plate1": plate_scene(3), "benign0": benign_scene(0),
              "blank0": blank_scene(0)}
    samples = []
    for key, (rgb, _truth) in scenes.items():
        fields = {"jpg": jpeg_bytes(rgb, quality=95)}
        if key == "sign0":
            fields["txt"] = CAPTION.encode()
            fields["json"] = json.dumps(META).encode()
        samples.append((key, fields))
    samples.append(("badcaption", {"jpg": jpeg_bytes(blank_scene(1)[0]), "txt": b"\xff\xfe caption \xc3"}))
    write_tar(root / "shard-000.tar", samples)
    return root / "shard-000.tar", {k: t for k, (_, t) in scenes.items()}


def _run(inp: Path, out: Path, runner: str, **kw) -> dict:
    from veil.orchestrate import run

    config = RunConfig(input=str(inp), output=str(out), runner=runner, progress=False, batch_size=4,
                       workers=2 if runner != "local" else None, **kw)
    return run(config)


def _released(out: Path) -> dict[str, dict[str, bytes]]:
    found: dict[str, dict[str, bytes]] = {}
    with tarfile.open(out / "data" / "shard-000.tar") as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return found


@pytest.fixture(scope="module")
def local_run(dataset, tmp_path_factory):
    shard, truth = dataset
    out = tmp_path_factory.mktemp("pii-out") / "out"
    summary = _run(shard, out, "local")
    return out, summary, truth


def test_released_images_hold_no_planted_pii_text_or_plates(local_run):
    from PIL import Image

    from veil.transforms.ocr import OCREngine

    out, _summary, truth = local_run
    released = _released(out)
    # Independent read: a fresh engine at twice the default resolution cap.
    engine = OCREngine(max_side=3200, min_score=0.3)
    engine.setup()
    read_any_benign = False
    for key, scene_truth in truth.items():
        assert key in released, f"{key} was not released"
        rgb = np.asarray(Image.open(io.BytesIO(released[key]["jpg"])).convert("RGB"))
        text = _normalise(" ".join(line.text for line in engine.read(rgb)))
        for item in scene_truth:
            planted = _normalise(item["text"])
            if item["class"] in ("text", "plate"):
                assert planted not in text, f"{key}: planted {item['class']} still readable"
            elif key == "benign0" and planted in text:
                read_any_benign = True
    # Text that is not personal data stays: scope "pii" keeps shop signs readable.
    assert read_any_benign


def test_fields_redacted_counts_recorded_and_nothing_read_is_written(local_run):
    import pyarrow.parquet as pq

    out, _summary, _truth = local_run
    released = _released(out)
    caption = released["sign0"]["txt"].decode()
    meta = json.loads(released["sign0"]["json"])
    for value in PLANTED_FIELD_VALUES:
        assert value not in caption and value not in json.dumps(meta)
    assert "<PERSON>" in caption and "<EMAIL_ADDRESS>" in caption and "office" in caption
    assert meta["tags"] == ["street", "sign"] and meta["width"] == 640
    rows = {r["key"]: r for r in pq.read_table(out / "manifest" / "shard-000.tar.parquet").to_pylist()}
    assert json.loads(rows["sign0"]["redactions"])["EMAIL_ADDRESS"] == 2
    counts = {k: json.loads(r["region_counts"] or "{}") for k, r in rows.items()}
    assert all(counts[k].get("text", 0) >= 1 for k in ("sign0", "sign1", "sign2"))
    assert all(counts[k].get("plate", 0) >= 1 for k in ("plate0", "plate1"))
    assert counts["blank0"] == {} and rows["blank0"]["status"] == "clean"
    assert rows["badcaption"]["status"] == "quarantined"
    assert rows["badcaption"]["reason"].startswith("metadata_error")
    assert "badcaption" not in released
    # Nothing that was read is written anywhere: manifest, run.json, report.
    blobs = [(out / "manifest" / "shard-000.tar.parquet").read_bytes(), (out / "run.json").read_bytes(),
             *(p.read_bytes() for p in (out / "report").rglob("*") if p.is_file())]
    secrets = [*PLANTED_FIELD_VALUES, "KA 1234", "MW 4521", "7ABC123", "Garcia", "DE89"]
    for blob in blobs:
        for secret in secrets:
            assert secret.encode() not in blob
    report = json.loads((out / "report" / "report.json").read_text())
    by_class = {c["class"]: c for c in report["pii"]["classes"]}
    assert by_class["text"]["regions"] >= 3 and by_class["plates"]["regions"] >= 2
    assert by_class["metadata"]["redactions"] >= 5
    assert "EMAIL_ADDRESS" in report["pii"]["text_entities"]


def test_gates_check_residual_pii_per_class(local_run, dataset, tmp_path, monkeypatch):
    from veil.transforms.ocr import OCREngine, pixel_digest
    from veil.validators.validate import ValidateConfig, validate

    # Text and plates share one OCR reading per released image, as in the run.
    reads: list[str] = []
    real_read = OCREngine.read

    def counting_read(self, rgb):
        reads.append(pixel_digest(rgb))
        return real_read(self, rgb)

    monkeypatch.setattr(OCREngine, "read", counting_read)

    out, _summary, _truth = local_run
    shard, _ = dataset
    result = validate(ValidateConfig(original=str(shard), anonymized=str(out), output=str(tmp_path / "audit"),
                                     runner="local", progress=False, measure="gated", report=False))
    metrics = result.metrics
    assert metrics["residual.text_samples"] == 0
    assert metrics["residual.plates_samples"] == 0
    assert metrics["residual.metadata_samples"] == 0
    gates = {g["name"]: g for g in result.gates}
    assert gates["residual-text"]["status"] == "passed"
    assert gates["residual-metadata"]["status"] == "passed"
    # The originals, audited as if released, fail all three.
    raw = validate(ValidateConfig(original=str(shard), anonymized=str(shard), output=str(tmp_path / "raw"),
                                  runner="local", progress=False, measure="gated", report=False,
                                  pii={"classes": ["faces", "plates", "text", "metadata"]}))
    assert raw.metrics["residual.text_samples"] >= 3
    assert raw.metrics["residual.plates_samples"] >= 2
    assert raw.metrics["residual.metadata_samples"] >= 1
    assert reads and len(reads) == len(set(reads)), "an image was read by OCR more than once"
    failed = {g["name"] for g in raw.gates if g["status"] == "failed"}
    assert {"residual-text", "residual-plates", "residual-metadata"} <= failed


def test_text_scope_all_and_keep_policy(dataset, tmp_path):
    import pyarrow.parquet as pq

    shard, _ = dataset
    out = tmp_path / "out"
    _run(shard, out, "local", pii={"classes": ["text"], "text_scope": "all", "policy": {"text": "keep"}})
    rows = {r["key"]: r for r in pq.read_table(out / "manifest" / "shard-000.tar.parquet").to_pylist()}
    # Every line is found (benign too), kept unchanged: released bytes equal a re-encode.
    benign = json.loads(rows["benign0"]["regions"])
    assert benign and all(r["policy"] == "keep" and r["kind"] == "text" for r in benign)
    assert rows["benign0"]["status"] == "clean"
    # Only text was asked for: no face detector ran, captions are left alone.
    assert rows["badcaption"]["status"] != "quarantined"


def test_a_class_whose_models_cannot_load_is_an_error(dataset, tmp_path, monkeypatch):
    from veil.transforms.textpii import AnalyzerUnavailableError

    shard, _ = dataset
    with pytest.raises(AnalyzerUnavailableError, match="spaCy pipeline"):
        _run(shard, tmp_path / "out", "local", pii={"classes": ["text"], "spacy_model": "xx_missing_model"})


@pytest.mark.slow
def test_ray_and_beam_release_the_same_bytes(local_run, dataset, tmp_path):
    out, _summary, _truth = local_run
    shard, _ = dataset
    local = (out / "data" / "shard-000.tar").read_bytes()
    for runner in ("ray", "beam"):
        other = tmp_path / runner
        _run(shard, other, runner)
        assert (other / "data" / "shard-000.tar").read_bytes() == local, runner


def test_an_ocr_failure_on_one_sample_quarantines_it_and_the_rest_goes_on():
    """A detector that fails on one image quarantines that sample with a reason; a setup
    failure (a broken install) stops the batch instead of quarantining every sample."""
    from veil.transforms.ocr import OCRUnavailableError
    from veil.transforms.regions import RegionDetector, RegionDetectStage

    class Flaky(RegionDetector):
        pii_class, kind = "text", "text"

        def detect(self, rgb, sample):
            if sample["__key__"] == "bad":
                raise RuntimeError("onnxruntime: invalid input")
            return [{"box": [0, 0, 4, 4], "score": 0.9, "detector": "flaky"}]

        def residual(self, rgb, sample, regions):
            return []

    def sample(key):
        return {"__key__": key, "_pixels": np.zeros((8, 8, 3), np.uint8), "status": "pending", "regions": []}

    stage = RegionDetectStage(Flaky())
    out = stage.process_batch([sample("a"), sample("bad"), sample("c")])
    assert [s["status"] for s in out] == ["pending", "quarantined", "pending"]
    assert out[1]["reason"].startswith("detect_text_error: RuntimeError")
    assert out[0]["regions"][0]["kind"] == "text"

    class Broken(Flaky):
        def detect(self, rgb, sample):
            raise OCRUnavailableError("the OCR engine could not be loaded: no onnxruntime")

    with pytest.raises(OCRUnavailableError):
        RegionDetectStage(Broken()).process_batch([sample("a"), sample("c")])
