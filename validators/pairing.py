"""Pair original and anonymized samples by key, shard by shard.

Validation compares each anonymized image with its original, so both datasets must be read
side by side. The unit of work stays the original shard (as in ``veil run``): a
:class:`ShardPair` names one original shard and the anonymized shards that hold its keys.

How the anonymized shards of an original shard are found:

* **Same shard ids on both sides** (Veil's own output, or any tool that keeps shard names):
  shard ``x`` pairs with shard ``x``; nothing is read in advance.
* **Otherwise** both sides' keys are listed first. Folder trees list keys from file names
  (free); tar and Parquet shards are read once for their keys (the cost of one extra pass,
  paid only when shard names differ). Each original shard then pairs with exactly the
  anonymized shards holding its keys; folder shards are narrowed to the files needed.

Keys on one side only are never dropped silently: an anonymized key with no original is a
``missing_original`` row (an image released without anything to check it against, a gate
failure by default) and an original with no anonymized copy is ``missing_anonymized``.
A Veil output folder (``run.json`` + ``data/`` + ``manifest/``) may be given as the
anonymized side: its quarantined samples are then ``not_released``, not missing. A released
sample that carries metadata but no image (a tool dropped a broken image and kept its
``.json``) is ``no_image_released``: it publishes no face, so it is counted, not an error.

Geometry (:func:`match_geometry`): many tools write an image's *stored* pixels without its
EXIF orientation tag, or downsize it. A released image whose size differs from its displayed
original is matched against the original in each of the 8 EXIF orientations, exactly or as a
uniform scaling; the match is recorded and measured instead of failing the pair.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from veil.pipelines.sources import FolderSource, Shard, Source, open_source
from veil.pipelines.storage import OutputStore
from veil.transforms.stage import QUARANTINED, Sample

#: Rows of the pairing: status of an input key in the validation table.
PAIRED = "paired"
MISSING_ANONYMIZED = "missing_anonymized"
MISSING_ORIGINAL = "missing_original"
NOT_RELEASED = "not_released"
NO_IMAGE_RELEASED = "no_image_released"

#: Reasons (prefixes) of a source for a sample that has fields but no image: tar and folder
#: samples without an image file, Parquet rows whose image column is null.
NO_IMAGE_REASONS = ("no_image_field", "missing_image")
#: What a folder source says of files that have no image of the same name.
_FOLDER_NO_IMAGE = "no image file with the same name"


@dataclass(frozen=True)
class ShardPair:
    """One unit of validation work: an original shard and where its anonymized copies are.

    ``original`` is None for anonymized keys that match no original shard. ``keys`` (when
    set) restricts the anonymized shards to those keys: shards listed for several pairs are
    shared, and each pair takes only its own keys.
    """

    id: str
    original: Shard | None
    anonymized: tuple[Shard, ...]
    keys: frozenset[str] | None = None


@dataclass
class VeilOutput:
    """What a ``veil run`` output (a folder or an object-store URL) tells the validator about
    its own release."""

    #: The output as a store (its manifests are listed and hashed through it).
    root: OutputStore
    #: The release's ``data/`` folder, as a path or URL that ``open_source`` reads.
    data: str
    #: key -> status for every manifest row (anonymized, clean, quarantined).
    statuses: dict[str, str] = field(default_factory=dict)
    #: key -> regions Veil anonymized (JSON list), for the background-fidelity mask.
    regions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    method: str | None = None
    run_input: str | None = None
    #: How far (fraction of a face box per side) Veil's anonymization may reach beyond a
    #: region's box: the configured expand, the widening of every re-scan round and the
    #: outward feather. Background fidelity is measured outside that.
    mask_expand: float = 0.25
    #: The run's detect configuration (run.json), to tell whether its detections can stand
    #: in for the validator's own on the originals.
    detect: dict[str, Any] = field(default_factory=dict)
    #: The run's ``pii`` configuration (run.json): which classes it anonymized, and how.
    pii: dict[str, Any] = field(default_factory=dict)
    #: Recognizers the run's method used, by name: "optimised against" (FSAP's recognizer
    #: and its ensemble) or "certifies" (fsap/diffusion ``certify``). A recognizer not named
    #: here took no part in making the release: its verdict is an independent one.
    recognizer_roles: dict[str, str] = field(default_factory=dict)


#: A recognizer's part in making a release (validation reports it with each verdict).
OPTIMISED, CERTIFIES, INDEPENDENT = "optimised against", "certifies", "independent"


def recognizer_roles(method: str | None, config: dict[str, Any]) -> dict[str, str]:
    """Which recognizers a run's method used, and how, from its run.json ``config``: FSAP
    optimises against ``fsap.recognizer`` and ``fsap.ensemble``; FSAP and diffusion certify
    with their ``certify`` lists (the config's defaults when a section is absent)."""
    from veil.config import DiffusionConfig, FSAPConfig

    roles: dict[str, str] = {}
    if method not in ("fsap", "diffusion"):
        return roles
    default = FSAPConfig() if method == "fsap" else DiffusionConfig()
    section = config.get(method) or {}
    if method == "fsap":
        for name in [section.get("recognizer", default.recognizer), *section.get("ensemble", default.ensemble)]:
            roles[name] = OPTIMISED
    for name in section.get("certify", default.certify):
        roles.setdefault(name, CERTIFIES)
    return roles


def read_veil_output(path: str | Path) -> VeilOutput | None:
    """The run information of a Veil output folder, or None when ``path`` is not one."""
    from veil.pipelines.manifest import read_manifests
    from veil.pipelines.storage import as_store
    from veil.transforms.anonymize import STRENGTH_EXPAND_STEP

    root = as_store(path)
    if root.is_local:
        local = root.local_path()
        if not (local / "run.json").is_file() or not (local / "data").is_dir():
            return None
    elif not root.exists("run.json") or not root.list_files("data"):
        return None
    info = json.loads(root.read_bytes("run.json"))
    config = info.get("config") or {}
    anonymize = config.get("anonymize") or {}
    rescan = config.get("rescan") or {}
    expand = float((config.get("detect") or {}).get("expand", 0.2))
    expand += STRENGTH_EXPAND_STEP * int(rescan.get("max_rounds", 2) if rescan.get("enabled", True) else 0)
    feather = float(anonymize.get("feather") or 0.0)
    # The feather is a fraction of the expanded box's shorter side; 0.05 more covers the
    # JPEG blocks that straddle the mask's edge.
    out = VeilOutput(root=root, data=root.display("data"), method=anonymize.get("method"),
                     run_input=config.get("input"),
                     mask_expand=expand + feather * (1 + 2 * expand) + 0.05,
                     detect=dict(config.get("detect") or {}), pii=dict(config.get("pii") or {}),
                     recognizer_roles=recognizer_roles(anonymize.get("method"), config))
    if root.list_files("manifest"):
        for row in read_manifests(root).to_pylist():
            out.statuses[row["key"]] = row["status"]
            regions = json.loads(row.get("regions") or "[]")
            if regions:
                out.regions[row["key"]] = regions
    return out


class Pairing:
    """Plans :class:`ShardPair` units for two sources and reads them side by side."""

    def __init__(self, original: Source, anonymized: Source) -> None:
        self.original = original
        self.anonymized = anonymized
        #: Anonymized keys with metadata files but no image (folder sources skip them, so
        #: they are known from the listing; set by :meth:`plan`, travels with the pairing).
        self.metadata_only: frozenset[str] = frozenset()

    # ---------------------------------------------------------------------------- plan

    def plan(self) -> list[ShardPair]:
        orig = self.original.list_shards()
        anon = self.anonymized.list_shards()
        self.metadata_only = frozenset(
            s.path.rsplit(".", 1)[0] for s in self.anonymized.skipped()
            if s.reason == _FOLDER_NO_IMAGE and "." in s.path)
        if not orig:
            raise FileNotFoundError("the original dataset has no shards")
        orig_ids = {s.id for s in orig}
        anon_ids = {s.id for s in anon}
        if orig_ids == anon_ids and not isinstance(self.anonymized, FolderSource):
            by_id = {s.id: s for s in anon}
            return [ShardPair(s.id, s, (by_id[s.id],)) for s in orig]
        return self._plan_by_keys(orig, anon)

    def _plan_by_keys(self, orig: list[Shard], anon: list[Shard]) -> list[ShardPair]:
        anon_index: dict[str, tuple[Shard, list[str]]] = {}  # key -> (shard, its files)
        for shard in anon:
            for key, files in self._keys(self.anonymized, shard):
                anon_index.setdefault(key, (shard, files))
        pairs: list[ShardPair] = []
        seen: set[str] = set()
        for shard in orig:
            keys = [k for k, _ in self._keys(self.original, shard)]
            seen.update(keys)
            needed = [anon_index[k] for k in keys if k in anon_index]
            pairs.append(ShardPair(shard.id, shard, self._narrow(needed), frozenset(keys)))
        extra = [anon_index[k] for k in sorted(anon_index) if k not in seen]
        if extra:
            extra_keys = frozenset(k for k in anon_index if k not in seen)
            pairs.append(ShardPair("#unmatched", None, self._narrow(extra), extra_keys))
        return pairs

    @staticmethod
    def _keys(source: Source, shard: Shard) -> Iterator[tuple[str, list[str]]]:
        """(key, files) of a shard; files are known without reading only for folders."""
        if isinstance(source, FolderSource):
            for key, files in source._groups(shard):
                yield key, [path for _ext, path in files]
            return
        for sample in source.read_shard(shard):
            yield sample["__key__"], []

    @staticmethod
    def _narrow(entries: list[tuple[Shard, list[str]]]) -> tuple[Shard, ...]:
        """The distinct shards of ``entries``; folder shards cut down to the listed files."""
        members: dict[str, list[str]] = defaultdict(list)
        shards: dict[str, Shard] = {}
        for shard, files in entries:
            shards.setdefault(shard.id, shard)
            members[shard.id].extend(files)
        out = []
        for sid, shard in shards.items():
            if shard.kind == "folder" and members[sid]:
                wanted = set(members[sid])
                shard = Shard(id=shard.id, url=shard.url, kind=shard.kind,
                              members=tuple(m for m in shard.members if m in wanted))
            out.append(shard)
        return tuple(out)

    # ---------------------------------------------------------------------------- read

    def read(self, pair: ShardPair) -> Iterator[tuple[str, Sample | None, Sample | None]]:
        """(key, original sample, anonymized sample) for every key of the pair, originals in
        input order first, then anonymized keys without an original (sorted)."""
        anonymized: dict[str, Sample] = {}
        for shard in pair.anonymized:
            for sample in self.anonymized.read_shard(shard):
                key = sample["__key__"]
                if pair.keys is not None and key not in pair.keys:
                    continue
                anonymized.setdefault(key, sample)
        if pair.original is not None:
            for sample in self.original.read_shard(pair.original):
                key = sample["__key__"]
                yield key, sample, anonymized.pop(key, None)
        for key in sorted(anonymized):
            yield key, None, anonymized[key]


def open_pairing(original: str, anonymized: str, *, image_column: str = "image",
                 folder_shard_size: int = 1000, max_member_bytes: int | None = None,
                 follow_symlinks: bool = False) -> tuple[Pairing, VeilOutput | None]:
    """Open both datasets; a Veil output folder on the anonymized side is read through its
    ``data/`` folder and its manifests."""
    veil_out = read_veil_output(anonymized)
    anon_spec = veil_out.data if veil_out is not None else anonymized
    kwargs = {"image_column": image_column, "folder_shard_size": folder_shard_size,
              "max_member_bytes": max_member_bytes, "follow_symlinks": follow_symlinks}
    return Pairing(open_source(original, **kwargs), open_source(anon_spec, **kwargs)), veil_out


def is_unreadable(sample: Sample | None) -> bool:
    """A sample the source could not read (truncated tar member, missing shard, ...)."""
    return sample is not None and sample.get("status") == QUARANTINED


def released_without_image(sample: Sample | None) -> bool:
    """A released sample the source read as fields without an image (metadata only)."""
    return (is_unreadable(sample)
            and str(sample.get("reason") or "").startswith(NO_IMAGE_REASONS))  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ geometry

#: The 8 EXIF orientations as transforms of an HxW[xC] array, named after PIL's
#: ``Image.Transpose`` members (rotations counter-clockwise, as PIL and ``numpy.rot90``).
ORIENTATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "same": lambda a: a,
    "flip-left-right": lambda a: a[:, ::-1],
    "flip-top-bottom": lambda a: a[::-1],
    "rotate-90": lambda a: np.rot90(a, 1),
    "rotate-180": lambda a: np.rot90(a, 2),
    "rotate-270": lambda a: np.rot90(a, 3),
    "transpose": lambda a: np.swapaxes(a, 0, 1),
    "transverse": lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
}
_INVERSE = {"rotate-90": "rotate-270", "rotate-270": "rotate-90"}
_SWAPS_AXES = frozenset({"rotate-90", "rotate-270", "transpose", "transverse"})
SAME = "same"
#: Orientation label of a release that kept the original's stored pixels without its tag.
STORED = "stored"
#: A size within this many pixels of a uniform scaling counts as one (tools round, floor or
#: fit the longer side to a bound, each off by up to a pixel on the other side).
SCALE_TOLERANCE_PX = 2
#: Side of the grey thumbnails that choose between orientations of the same size.
_THUMB = 32
#: Thumbnail distances (mean absolute grey difference, 0-255) closer than this are a tie,
#: decided for the more likely orientation (same, then stored): a symmetric or flat image
#: must not come out flipped because of the anonymized faces.
_TIE = 0.5


class GeometryMismatch(ValueError):
    """The released image is not its original in any orientation, at any uniform scale."""


@dataclass(frozen=True)
class Geometry:
    """How a released image's pixels relate to its original as displayed (EXIF applied).

    ``transform`` (an :data:`ORIENTATIONS` name) turns the displayed original into the
    release's orientation; ``scale`` is the released size over the original's, per axis, in
    the original's orientation.
    """

    transform: str = SAME
    scale: tuple[float, float] = (1.0, 1.0)
    exif_orientation: int = 1

    @property
    def orientation(self) -> str:
        """``same``, ``stored`` (the stored pixels without their tag) or the transform."""
        if self.transform == SAME:
            return SAME
        if self.exif_orientation != 1 and self.transform == stored_transform(self.exif_orientation):
            return STORED
        return self.transform

    @property
    def orientation_changed(self) -> bool:
        return self.transform != SAME

    @property
    def resized(self) -> bool:
        return self.scale != (1.0, 1.0)

    def upright(self, released: np.ndarray) -> np.ndarray:
        """The released pixels turned back into the original's orientation (lossless)."""
        import cv2

        name = _INVERSE.get(self.transform, self.transform)
        if name == SAME:
            return released
        # OpenCV's blocked copies: copying a numpy rot90 view of a 12 MP photo takes ~6x
        # longer (~200 ms against ~30, cache misses; benchmarks/bench_geometry.py).
        a = np.ascontiguousarray(released)
        turned = {
            "flip-left-right": lambda: cv2.flip(a, 1),
            "flip-top-bottom": lambda: cv2.flip(a, 0),
            "rotate-90": lambda: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
            "rotate-180": lambda: cv2.rotate(a, cv2.ROTATE_180),
            "rotate-270": lambda: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
            "transpose": lambda: cv2.transpose(a),
            "transverse": lambda: cv2.transpose(cv2.rotate(a, cv2.ROTATE_180)),
        }[name]()
        return turned if turned.ndim == a.ndim else turned[..., None]

    def to_dict(self) -> dict[str, Any]:
        return {"orientation": self.orientation, "transform": self.transform,
                "exif_orientation": self.exif_orientation, "scale": list(self.scale)}


def stored_transform(exif_orientation: int) -> str:
    """The transform from the displayed image to its stored pixels for an EXIF orientation."""
    from veil.transforms.imageio import _ORIENTATION_TRANSPOSE

    applied = _ORIENTATION_TRANSPOSE.get(exif_orientation)
    if applied is None:
        return SAME
    name = applied.name.lower().replace("_", "-")
    return _INVERSE.get(name, name)


def uniform_scale(width: int, height: int, to_width: int, to_height: int, *,
                  tolerance: float = SCALE_TOLERANCE_PX) -> tuple[float, float] | None:
    """Per-axis scale from ``width x height`` to ``to_width x to_height`` when that is one
    uniform scaling (within ``tolerance`` pixels of rounding), else None."""
    if (width, height) == (to_width, to_height):
        return 1.0, 1.0
    # The longer side's ratio is the more precise one; the shorter side must follow it.
    s = to_width / width if width >= height else to_height / height
    if abs(width * s - to_width) <= tolerance and abs(height * s - to_height) <= tolerance:
        return to_width / width, to_height / height
    return None


def match_geometry(original: np.ndarray, released: np.ndarray, *, exif_orientation: int = 1) -> Geometry:
    """The orientation and scale that make ``released`` line up with ``original`` (displayed,
    EXIF orientation ``exif_orientation`` already applied).

    An image of the original's size with no orientation tag is taken as it is. Otherwise each
    of the 8 orientations whose size matches (exactly, else by a uniform scaling) is a
    candidate, and several (same-size flips, square images) are told apart by their agreement
    on a grey thumbnail. Raises :class:`GeometryMismatch` with the reason when none fits.
    """
    height, width = original.shape[:2]
    rel_h, rel_w = released.shape[:2]
    if (rel_h, rel_w) == (height, width) and exif_orientation == 1:
        return Geometry()
    stored = stored_transform(exif_orientation)
    order = [SAME, stored] + [n for n in ORIENTATIONS if n not in (SAME, stored)]
    exact: list[tuple[str, tuple[float, float]]] = []
    scaled: list[tuple[str, tuple[float, float]]] = []
    for name in dict.fromkeys(order):
        w, h = (height, width) if name in _SWAPS_AXES else (width, height)
        scale = uniform_scale(w, h, rel_w, rel_h)
        if scale is not None:
            # The scale is expressed in the original's orientation, where boxes are mapped.
            scale = (scale[1], scale[0]) if name in _SWAPS_AXES else scale
            (exact if (w, h) == (rel_w, rel_h) else scaled).append((name, scale))
    candidates = exact or scaled
    if not candidates:
        shown = f"{width}x{height}" + (f" as displayed (EXIF orientation {exif_orientation})"
                                       if exif_orientation != 1 else "")
        raise GeometryMismatch(
            f"sizes differ: original {shown}, anonymized {rel_w}x{rel_h}: not the original in "
            f"any of the 8 EXIF orientations, nor a uniform scaling of one (within "
            f"{SCALE_TOLERANCE_PX} px); faces cannot be compared in place")
    if len(candidates) > 1:
        thumb_o, thumb_r = _grey_thumbnail(original), _grey_thumbnail(released)
        distance = {name: float(np.abs(ORIENTATIONS[name](thumb_o) - thumb_r).mean())
                    for name, _ in candidates}
        best = min(distance.values())
        candidates = [next(c for c in candidates if distance[c[0]] <= best + _TIE)]
    name, scale = candidates[0]
    return Geometry(transform=name, scale=scale, exif_orientation=exif_orientation)


def _grey_thumbnail(rgb: np.ndarray) -> np.ndarray:
    """A square grey thumbnail: squashing both images the same way keeps them comparable,
    and a square grid turns with the image."""
    import cv2

    # Subsample large images first: area averaging a 12 MP photo straight down to 32 px costs
    # ~85 ms, and pixels finer than 1/8 of a thumbnail cell cannot change the choice.
    step = max(1, min(rgb.shape[:2]) // (8 * _THUMB))
    small = cv2.resize(np.ascontiguousarray(rgb[::step, ::step]), (_THUMB, _THUMB),
                       interpolation=cv2.INTER_AREA)
    return small.astype(np.float32).mean(axis=2) if small.ndim == 3 else small.astype(np.float32)


def map_regions(regions: Sequence[dict[str, Any]], scale: tuple[float, float]) -> list[dict[str, Any]]:
    """Face regions (``box``, ``landmarks``) of the original mapped into a release scaled by
    ``scale`` (x, y); other fields are kept."""
    sx, sy = scale
    if (sx, sy) == (1.0, 1.0):
        return list(regions)
    out = []
    for region in regions:
        region = dict(region)
        x0, y0, x1, y1 = region["box"]
        region["box"] = [x0 * sx, y0 * sy, x1 * sx, y1 * sy]
        if region.get("landmarks") is not None:
            region["landmarks"] = [[x * sx, y * sy] for x, y in region["landmarks"]]
        out.append(region)
    return out


def resize_to(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """``rgb`` resized to ``width x height`` (area-averaged when shrinking, as downsizing
    tools do; bicubic when enlarging)."""
    import cv2

    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    shrink = width * height < rgb.shape[0] * rgb.shape[1]
    return cv2.resize(np.ascontiguousarray(rgb), (width, height),
                      interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
