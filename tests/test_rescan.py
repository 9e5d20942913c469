"""The re-scan stage fails closed: a face still found in the encoded output is re-anonymized
more strongly or the sample is quarantined, never released as is."""

from __future__ import annotations

import numpy as np
import pytest

from veil.config import AnonymizeConfig, DetectConfig, ImageIOConfig, RescanConfig
from veil.transforms.anonymize import AnonymizeStage
from veil.transforms.detect import Region, scan_fingerprint
from veil.transforms.imageio import DecodeStage, EncodeStage
from veil.transforms.rescan import RescanStage
from veil.transforms.stage import ANONYMIZED, QUARANTINED

BOX = [40.0, 40.0, 120.0, 140.0]


class ScriptedDetector:
    """Returns the scripted detections call by call (then none), recording each input."""

    def __init__(self, script: list[list[Region]]) -> None:
        self.script = list(script)
        self.calls: list[np.ndarray] = []
        #: Per call, the areas a restricted scan was asked to search (None: the whole image).
        self.areas: list[list | None] = []

    def detect(self, rgb: np.ndarray) -> list[Region]:
        self.calls.append(rgb.copy())
        self.areas.append(None)
        return self.script.pop(0) if self.script else []

    def detect_near(self, rgb: np.ndarray, areas, *, margin: int) -> list[Region]:
        found = self.detect(rgb)
        self.areas[-1] = list(areas)
        return found


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
    # What the detect stage leaves: the whole image was searched with the default config.
    sample["_scanned_with"] = scan_fingerprint(DetectConfig())
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


def _covers(areas: list, box: list[float]) -> bool:
    return any(a[0] <= box[0] and a[1] <= box[1] and a[2] >= box[2] and a[3] >= box[3] for a in areas)


def test_rescan_searches_around_every_changed_pixel_by_default():
    sample, cfg = prepared_sample()
    changed = np.any(sample["_pixels"] != sample["_decoded"].rgb, axis=2) | (sample["_mask"] > 0)
    ys, xs = np.nonzero(changed)
    detector = ScriptedDetector([[face(score=0.35)]])
    [out] = make_stage(cfg, detector).process_batch([sample])
    assert out["status"] == ANONYMIZED and len(detector.areas) == 2
    first, second = detector.areas
    assert first is not None and _covers(first, BOX)
    assert _covers(first, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    # After strengthening the changed area grew (expand and sigma rise per round): the second
    # scan's areas cover the strengthened mask, not the first one.
    mask = out["_mask"]
    ys, xs = np.nonzero(mask > 0)
    assert _covers(second, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert not _covers(first, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def test_pixels_changed_outside_the_mask_are_searched_too():
    """The restriction never trusts the mask alone: a pixel that differs from the original
    although the mask says 0 is a changed pixel."""
    sample, cfg = prepared_sample()
    sample["_pixels"] = sample["_pixels"].copy()
    sample["_pixels"][170:175, 150:155] = 255 - sample["_decoded"].rgb[170:175, 150:155]
    assert (sample["_mask"][170:175, 150:155] == 0).all()
    detector = ScriptedDetector([])
    make_stage(cfg, detector).process_batch([sample])
    assert _covers(detector.areas[0], [150, 170, 155, 175])


@pytest.mark.parametrize(
    "setting", ["scope_full", "method_none", "clean", "no_first_pass", "other_detect_config"]
)
def test_whole_image_rescan_where_the_first_pass_cannot_vouch(setting):
    """Scope "full", the debug method "none" (faces stay in place), clean samples re-scanned
    on request, and regions no detect stage with this configuration produced (set by hand,
    or found with other settings) are searched whole."""
    sample, cfg = prepared_sample("none" if setting == "method_none" else "blur")
    kwargs = {"scope": "full"} if setting == "scope_full" else {}
    if setting == "clean":
        sample["status"] = "clean"
        kwargs["include_clean"] = True
    if setting == "no_first_pass":
        del sample["_scanned_with"]
    if setting == "other_detect_config":
        sample["_scanned_with"] = scan_fingerprint(DetectConfig(min_face=32))
    detector = ScriptedDetector([])
    make_stage(cfg, detector, **kwargs).process_batch([sample])
    assert detector.areas == [None]


def test_changed_areas_are_the_boxes_of_changed_blobs_and_regions():
    from veil.transforms.rescan import changed_areas

    changed = np.zeros((60, 80), dtype=bool)
    changed[5:10, 7:20] = True
    changed[40:50, 60:62] = True
    areas = changed_areas(changed, [{"box": [30.5, 20.2, 35.1, 25.0]}])
    assert sorted(areas) == [(7, 5, 20, 10), (30, 20, 36, 25), (60, 40, 62, 50)]
    assert changed_areas(np.zeros((4, 4)), []) == []


@pytest.mark.slow
def test_real_chain_restricts_the_rescan_and_agrees_with_the_whole_image_scan(faces_dir, models_dir):
    """With real models: the detect stage vouches for the original, so the re-scan searches
    around the blurred face only, and on this photo finds what a whole-image scan of the same
    released pixels finds."""
    from helpers import face_photo, jpeg_bytes

    from veil.transforms.detect import DetectStage
    from veil.transforms.imageio import decode_image

    io_cfg, detect_cfg, cfg = ImageIOConfig(), DetectConfig(), AnonymizeConfig()
    models = {"models_dir": str(models_dir)}
    rgb = face_photo(faces_dir, "obama.jpg")
    canvas = np.full((480, 640, 3), 90, np.uint8)
    small = rgb[::4, ::4][:200, :200]
    canvas[40 : 40 + small.shape[0], 400 : 400 + small.shape[1]] = small
    sample = {"__key__": "k", "__shard__": "s", "__index__": 0, "__image__": "jpg",
              "jpg": jpeg_bytes(canvas), "status": "pending", "reason": ""}
    batch = [sample]
    for stage in (DecodeStage(io_cfg), DetectStage(detect_cfg, models=models),
                  AnonymizeStage(cfg, expand=detect_cfg.expand, seed=0), EncodeStage(io_cfg)):
        batch = stage.process_batch(batch)
    assert batch[0]["status"] == ANONYMIZED and batch[0]["_scanned_with"] == scan_fingerprint(detect_cfg)
    rescan = RescanStage(rescan=RescanConfig(), detect=detect_cfg, anonymize=cfg, io=io_cfg,
                         models=models, seed=0)
    rescan.setup()
    detector = rescan._detector
    seen = []
    real_near = detector.detect_near

    def spy(rgb, areas, *, margin):
        found = real_near(rgb, areas, margin=margin)
        seen.append((rgb.copy(), list(areas), found))
        return found

    detector.detect_near = spy
    [out] = rescan.process_batch(batch)
    assert out["status"] in (ANONYMIZED, QUARANTINED) and seen
    for released, areas, found in seen:
        assert all(a[0] >= 350 and a[3] <= 300 for a in areas)  # around the face, not everywhere
        assert bool(found) == bool(detector.detect(released))
    if out["status"] == ANONYMIZED:
        final = decode_image(out["jpg"], ext="jpg", max_pixels=io_cfg.max_pixels, max_bytes=io_cfg.max_bytes)
        assert detector.detect(final.rgb) == []
