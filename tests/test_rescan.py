"""The re-scan stage fails closed: a face still found in the encoded output is re-anonymized
more strongly or the sample is quarantined, never released as is."""

from __future__ import annotations

import numpy as np
import pytest

from veil.config import AnonymizeConfig, DetectConfig, ImageIOConfig, RescanConfig
from veil.transforms.anonymize import AnonymizeStage
from veil.transforms.detect import Region
from veil.transforms.imageio import DecodeStage, EncodeStage
from veil.transforms.rescan import RescanStage
from veil.transforms.stage import ANONYMIZED, QUARANTINED

BOX = [40.0, 40.0, 120.0, 140.0]


class ScriptedDetector:
    """Returns the scripted detections call by call (then none), recording each input."""

    def __init__(self, script: list[list[Region]]) -> None:
        self.script = list(script)
        self.calls: list[np.ndarray] = []

    def detect(self, rgb: np.ndarray) -> list[Region]:
        self.calls.append(rgb.copy())
        return self.script.pop(0) if self.script else []


def face(box=BOX, score=0.4) -> Region:
    return Region(kind="face", box=tuple(box), score=score, landmarks=None, detector="scripted")


def prepared_sample(method: str = "blur", **anon) -> tuple[dict, AnonymizeConfig]:
    """A sample decoded, 'detected' with one face, anonymized and encoded."""
    from helpers import jpeg_bytes

    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, size=(180, 160, 3), dtype=np.uint8)
    io_cfg = ImageIOConfig()
    cfg = AnonymizeConfig(method=method, **anon)
    sample = {"__key__": "k", "__shard__": "s", "__index__": 0, "__image__": "jpg",
              "jpg": jpeg_bytes(rgb), "status": "pending", "reason": ""}
    [sample] = DecodeStage(io_cfg).process_batch([sample])
    sample["regions"] = [face(score=0.9).to_dict()]
    [sample] = AnonymizeStage(cfg, expand=0.2, seed=0).process_batch([sample])
    [sample] = EncodeStage(io_cfg).process_batch([sample])
    assert sample["status"] == ANONYMIZED
    return sample, cfg


def make_stage(cfg: AnonymizeConfig, detector: ScriptedDetector, **rescan) -> RescanStage:
    from veil.transforms.anonymize import Anonymizer

    stage = RescanStage(rescan=RescanConfig(**rescan), detect=DetectConfig(), anonymize=cfg,
                        io=ImageIOConfig(), models={}, seed=0)
    stage._detector = detector
    stage._anonymizer = Anonymizer(cfg, expand=0.2)
    return stage


def test_clean_output_passes_untouched():
    sample, cfg = prepared_sample()
    before = sample["jpg"]
    detector = ScriptedDetector([])
    [out] = make_stage(cfg, detector).process_batch([sample])
    assert out["status"] == ANONYMIZED and out["rescan_rounds"] == 0
    assert out["jpg"] == before
    assert len(detector.calls) == 1


def test_residual_face_is_strengthened_then_released():
    sample, cfg = prepared_sample()
    before = sample["jpg"]
    detector = ScriptedDetector([[face(score=0.35)]])
    [out] = make_stage(cfg, detector).process_batch([sample])
    assert out["status"] == ANONYMIZED
    assert out["rescan_rounds"] == 1 and out["anonymize_round"] == 1
    assert out["jpg"] != before
    # The re-found face overlaps the anonymized one: kept for strengthening, marked redetected.
    assert out["regions"][-1]["redetected"] is True and out["regions"][-1]["rescan_round"] == 1
    # The second scan saw the strengthened output, not the first release.
    assert len(detector.calls) == 2 and not np.array_equal(detector.calls[0], detector.calls[1])


def test_new_face_found_by_rescan_is_counted():
    sample, cfg = prepared_sample()
    other = [2.0, 150.0, 30.0, 178.0]
    [out] = make_stage(cfg, ScriptedDetector([[face(box=other)]])).process_batch([sample])
    assert out["status"] == ANONYMIZED
    assert out["regions"][-1]["redetected"] is False
    from veil.pipelines.manifest import manifest_row

    assert manifest_row(out)["n_faces"] == 2


def test_persistent_face_is_quarantined_after_max_rounds():
    sample, cfg = prepared_sample()
    detector = ScriptedDetector([[face()]] * 10)
    [out] = make_stage(cfg, detector, max_rounds=2).process_batch([sample])
    assert out["status"] == QUARANTINED
    assert out["reason"].startswith("residual_face") and "2 strengthening" in out["reason"]
    assert len(detector.calls) == 3


def test_quarantine_policy_does_not_strengthen():
    sample, cfg = prepared_sample()
    before = sample["jpg"]
    [out] = make_stage(cfg, ScriptedDetector([[face()]]), policy="quarantine").process_batch([sample])
    assert out["status"] == QUARANTINED and out["rescan_rounds"] == 0
    assert out["jpg"] == before  # nothing was re-anonymized; the sink never writes it anyway


@pytest.mark.parametrize("method", ["dp-pixelate"])
def test_dp_budget_is_unchanged_by_strengthening(method):
    """Strengthening re-processes the released (DP) pixels: post-processing spends no budget."""
    sample, cfg = prepared_sample(method, epsilon=0.7)
    assert sample["epsilon"] == pytest.approx(0.7)
    sample_params_before = dict(sample["params"])
    [out] = make_stage(cfg, ScriptedDetector([[face()]])).process_batch([sample])
    assert out["status"] == ANONYMIZED and out["epsilon"] == pytest.approx(0.7)
    # Stronger round: larger DP cells than configured; the budget itself is never changed.
    assert sample_params_before["dp_cell"] == cfg.dp_cell
    assert out["params"]["dp_cell"] > cfg.dp_cell
    assert out["params"]["epsilon"] == pytest.approx(0.7)


def test_disabled_rescan_and_clean_samples_skip_detection():
    sample, cfg = prepared_sample()
    detector = ScriptedDetector([[face()]])
    [out] = make_stage(cfg, detector, enabled=False).process_batch([sample])
    assert out["status"] == ANONYMIZED and detector.calls == []
    sample["status"] = "clean"
    [out] = make_stage(cfg, detector).process_batch([sample])
    assert out["status"] == "clean" and detector.calls == []
    [out] = make_stage(cfg, detector, include_clean=True).process_batch([sample])
    assert out["status"] == ANONYMIZED and len(detector.calls) == 2
