"""The per-class policy: config, the policy anonymizer and stage, re-scan reasons, manifest
redaction counts."""

from __future__ import annotations

import numpy as np
import pytest

from veil.config import AnonymizeConfig, ConfigError, PIIConfig, RunConfig, merge_overrides
from veil.transforms.anonymize import Anonymizer
from veil.transforms.policy import PolicyAnonymizer, PolicyStage
from veil.transforms.regions import kind_methods
from veil.transforms.rescan import residual_reason
from veil.transforms.stage import ANONYMIZED, CLEAN


def _image(h: int = 200, w: int = 300) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------- config


def test_pii_config_defaults_and_policy():
    config = RunConfig()
    assert config.pii.classes == ["faces", "plates", "text", "metadata"]
    assert kind_methods(config.pii) == {"plate": "fill", "text": "fill"}
    assert config.pii.method_of("metadata") == "redact"
    config = RunConfig.from_dict({"pii": {"classes": "text,faces,persons,text",
                                          "policy": {"persons": "pixelate", "text": "keep"}}})
    assert config.pii.classes == ["faces", "persons", "text"]  # stage order, no repeats
    assert kind_methods(config.pii) == {"person": "pixelate", "text": "keep"}


def test_policy_faces_sets_the_face_method_and_cli_method_wins():
    config = RunConfig.from_dict({"pii": {"policy": {"faces": "pixelate", "plates": "blur"}}})
    assert config.anonymize.method == "pixelate"
    assert "faces" not in config.pii.policy
    config = merge_overrides(config, {"anonymize.method": "fill", "pii.classes": "faces,plates"})
    assert config.anonymize.method == "fill"
    assert config.pii.classes == ["faces", "plates"]
    assert config.pii.method_of("plates") == "blur"


@pytest.mark.parametrize("data, message", [
    ({"classes": ["faces", "tattoos"]}, "unknown class(es) tattoos"),
    ({"classes": []}, "at least one class"),
    ({"policy": {"plates": "fsap"}}, "pii.policy.plates: unknown method 'fsap'"),
    ({"policy": {"metadata": "blur"}}, "pii.policy.metadata: unknown method 'blur'"),
    ({"policy": {"cars": "blur"}}, "unknown class 'cars'"),
    ({"text_scope": "some"}, "text_scope"),
])
def test_pii_config_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_dict({"pii": data})


def test_face_features_need_the_faces_class():
    with pytest.raises(ConfigError, match="add faces to pii.classes"):
        RunConfig.from_dict({"pii": {"classes": ["text"]}, "pool": {"path": "/tmp/pool"}})


# ------------------------------------------------------------------------------ anonymizer


def test_person_is_obscured_around_its_face_which_keeps_the_face_policy():
    rgb = _image()
    person = {"kind": "person", "box": [50, 20, 250, 190], "score": 0.9}
    face = {"kind": "face", "box": [120, 30, 170, 90], "score": 0.9}
    policy = PolicyAnonymizer({"person": "fill"}, AnonymizeConfig(), face=None, face_expand=0.2)
    result = policy.apply(rgb, [person, face], rng=np.random.default_rng(0))
    # The face (already anonymized by the face stage, or synthesized) is left as it is ...
    assert np.array_equal(result.pixels[50:70, 135:155], rgb[50:70, 135:155])
    # ... while the rest of the person is filled with the fill colour.
    assert (result.pixels[150:180, 60:240] == 128).all()
    assert result.mask[160, 100] == 1.0 and result.mask[60, 145] == 0.0
    assert result.params["classes"]["person"]["method"] == "fill"
    # Outside the person nothing changes.
    assert np.array_equal(result.pixels[:, :30], rgb[:, :30])


def test_each_kind_gets_its_own_method_and_keep_leaves_it():
    rgb = _image()
    plate = {"kind": "plate", "box": [10, 150, 90, 180], "score": 0.8}
    text = {"kind": "text", "box": [150, 10, 290, 40], "score": 0.9, "entity": "EMAIL_ADDRESS"}
    face = {"kind": "face", "box": [120, 80, 170, 140], "score": 0.9}
    policy = PolicyAnonymizer({"plate": "fill", "text": "keep"}, AnonymizeConfig(),
                              face=Anonymizer(AnonymizeConfig(method="pixelate"), expand=0.2), face_expand=0.2)
    assert not policy.anonymizes(text) and policy.anonymizes(plate) and policy.anonymizes(face)
    result = policy.apply(rgb, [plate, text, face], rng=np.random.default_rng(0))
    assert (result.pixels[155:175, 15:85] == 128).all()          # plate filled
    assert np.array_equal(result.pixels[10:40, 150:290], rgb[10:40, 150:290])  # text kept
    assert not np.array_equal(result.pixels[90:130, 130:160], rgb[90:130, 130:160])  # face pixelated
    assert result.params["method"] == "pixelate" and result.params["classes"]["plate"]["method"] == "fill"
    # Strength raises every kind to the hard-box fill fallback.
    strong = policy.apply(rgb, [plate, face], rng=np.random.default_rng(0), strength=3)
    assert strong.params["classes"]["plate"]["fallback"] == "fill"
    assert strong.params["fallback"] == "fill"


def test_policy_stage_marks_samples_and_merges_masks():
    pii = PIIConfig(classes=["faces", "plates", "text"], policy={"text": "keep"})
    stage = PolicyStage(pii, AnonymizeConfig(), expand=0.2, seed=0)
    rgb = _image()
    sample = {"__key__": "a", "_pixels": rgb.copy(), "_mask": np.zeros(rgb.shape[:2], np.float32),
              "status": CLEAN, "params": {},
              "regions": [{"kind": "plate", "box": [10, 150, 90, 180], "score": 0.8},
                          {"kind": "text", "box": [150, 10, 290, 40], "score": 0.9, "entity": "PERSON"}]}
    [out] = stage.process_batch([sample])
    assert out["status"] == ANONYMIZED and out["method"] == "blur"
    assert out["_mask"][160, 50] == 1.0 and out["_mask"][20, 200] == 0.0
    assert [r["policy"] for r in out["regions"]] == ["fill", "keep"]
    # A sample with only kept regions stays clean and unchanged.
    only_kept = {"__key__": "b", "_pixels": rgb.copy(), "status": CLEAN,
                 "regions": [{"kind": "text", "box": [150, 10, 290, 40], "score": 0.9}]}
    [out] = stage.process_batch([only_kept])
    assert out["status"] == CLEAN and np.array_equal(out["_pixels"], rgb)


def test_residual_reasons_name_the_class_and_counts_not_contents():
    faces = [{"kind": "face", "score": 0.7, "box": [0, 0, 1, 1]}]
    text = [{"kind": "text", "score": 0.9, "entity": "EMAIL_ADDRESS", "box": [0, 0, 1, 1]}] * 2
    assert residual_reason(faces + text, 2).startswith("residual_face: 1 face(s)")
    assert residual_reason(faces + text, 2).endswith("also 2 text")
    assert residual_reason(text, 1) == "residual_text: 2 text region(s) still found in the output after 1 strengthening round(s)"


def test_manifest_counts_redactions_and_reads_older_manifests(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from veil.pipelines.manifest import MANIFEST_DIR, manifest_row, read_manifests

    row = manifest_row({"__key__": "k", "__shard__": "s", "status": "clean", "regions": [],
                        "redactions": {"EMAIL_ADDRESS": 2}})
    assert row["redactions"] == '{"EMAIL_ADDRESS":2}'
    old = pa.table({"key": ["k"], "shard": ["s"], "status": ["clean"]})
    (tmp_path / MANIFEST_DIR).mkdir()
    pq.write_table(old, tmp_path / MANIFEST_DIR / "s.parquet")
    table = read_manifests(tmp_path)
    assert table.column("redactions").to_pylist() == [None]


def test_rescan_reads_a_class_again_only_where_it_was_found_unless_scope_full():
    from veil.config import DetectConfig, ImageIOConfig, RescanConfig
    from veil.transforms.regions import RegionDetector
    from veil.transforms.rescan import RescanStage

    class Probe(RegionDetector):
        def __init__(self, pii_class, kind):
            self.pii_class, self.kind = pii_class, kind

        def detect(self, rgb, sample):
            return []

        def residual(self, rgb, sample, regions):
            return []

    text, plates = Probe("text", "text"), Probe("plates", "plate")

    def stage(scope):
        return RescanStage(rescan=RescanConfig(scope=scope), detect=DetectConfig(), anonymize=AnonymizeConfig(),
                           io=ImageIOConfig(), models={}, seed=0,
                           pii=PIIConfig(classes=["faces", "plates", "text"]), detectors=[plates, text])

    faces_only = [{"kind": "face", "box": [0, 0, 5, 5]}]
    with_text = [*faces_only, {"kind": "text", "box": [0, 0, 5, 5]}]
    assert stage("changed")._class_scans(faces_only) == []
    assert stage("changed")._class_scans(with_text) == [text]
    assert stage("full")._class_scans(faces_only) == [plates, text]
    # A class whose policy is keep is never re-scanned (its regions are released as they are).
    kept = RescanStage(rescan=RescanConfig(), detect=DetectConfig(), anonymize=AnonymizeConfig(),
                       io=ImageIOConfig(), models={}, seed=0,
                       pii=PIIConfig(classes=["text"], policy={"text": "keep"}), detectors=[text])
    assert kept.detectors == []
