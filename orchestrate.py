"""What ``veil run`` does, above both layers: the release, then its report and its gates.

    veil.cli -> veil.orchestrate -> veil.validators -> veil.pipelines -> veil.transforms

:func:`veil.pipelines.driver.run` plans and writes the release (and never imports
``veil.validators``); the report (:mod:`veil.validators.report`) and, with ``--gates``, the
validation (:func:`veil.validators.validate.validate`, on the run's own runner) are added
here, while the driver still holds the output's lock, so no other writer can slip in between
the release and its verdict. ``tests/test_layers.py`` keeps the arrows pointing down.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from veil.config import RunConfig
from veil.pipelines.driver import RunSummary


def run(config: RunConfig) -> RunSummary:
    """Anonymize ``config.input`` into ``config.output`` (resuming), write the report, and
    with ``config.gates`` validate the release and write the verdict (``RELEASE.json`` only
    if every gate passed). Raises what :func:`veil.pipelines.driver.run` raises."""
    from veil.pipelines.driver import run as run_release

    return run_release(config, after=lambda summary: report_and_gate(config, summary))


def report_and_gate(config: RunConfig, summary: RunSummary) -> None:
    """The report of a finished release, then its gates: fills ``summary.report`` and
    ``summary.validation``."""
    from veil.validators.report import build_report

    summary.report = str(build_report(config.output))
    if config.gates:
        summary.validation = run_gates(config)
        summary.report = summary.validation["report"]


def run_gates(config: RunConfig) -> dict[str, Any]:
    """Validate the finished release against its input and apply the gates.

    A release on an object store is validated into a local scratch folder (the validation
    tables are written and merged on local disk), then published next to the release:
    ``validation/``, the report, and ``RELEASE.json`` last, so a verdict on the store always
    has its evidence beside it."""
    from veil.pipelines.storage import is_remote
    from veil.validators.validate import validate

    if not is_remote(config.output):
        return asdict(validate(validate_config(config, output=config.output)))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="veil-gates-") as scratch:
        result = asdict(validate(validate_config(config, output=scratch)))
        return publish_validation(config.output, Path(scratch), result)


def validate_config(config: RunConfig, *, output: str) -> Any:
    from veil.validators.validate import VALIDATION_FOLDER_SHARD, ValidateConfig

    return ValidateConfig(
        original=config.input, anonymized=config.output, output=output,
        gates=None if config.gates == "default" else config.gates, method=config.anonymize.method,
        runner=config.runner, ray_address=config.ray_address, beam_options=list(config.beam_options),
        workers=config.workers, image_column=config.image_column,
        # One validation task per shard: folders are split finer than the run's shards.
        folder_shard_size=min(config.folder_shard_size, VALIDATION_FOLDER_SHARD), max_pixels=config.io.max_pixels,
        max_bytes=config.io.max_bytes, follow_symlinks=config.io.follow_symlinks,
        models=dict(config.models), models_dir=config.models_dir,
        allow_download=config.allow_download, progress=config.progress,
        pii=asdict(config.pii),
        # The run's own gates need their verdict, not the full audit (`veil validate`):
        # metrics no gate reads are left out, which more than halves the cost.
        measure="gated")


def publish_validation(output: str, scratch: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Copy a validation made in ``scratch`` to the object-store ``output``: its tables,
    then the combined report, then the verdict (or the removal of an old one)."""
    from veil.pipelines.sinks import store_write_bytes
    from veil.pipelines.storage import as_store
    from veil.validators.report import build_report
    from veil.validators.validate import RELEASE_FILE

    store = as_store(output)
    store.delete_tree("validation")  # an earlier validation's tables must not mix in
    for path in sorted((scratch / "validation").rglob("*")):
        if path.is_file():
            store_write_bytes(store, f"validation/{path.relative_to(scratch / 'validation').as_posix()}",
                              path.read_bytes())
    report = build_report(store, validation_from=scratch)
    release = scratch / RELEASE_FILE
    if release.is_file():
        store_write_bytes(store, RELEASE_FILE, release.read_bytes())
    else:
        store.delete(RELEASE_FILE)
    return {**result, "output": store.url, "report": str(report),
            "summary_path": store.display("validation/summary.json"),
            "release_path": store.display(RELEASE_FILE) if release.is_file() else None}
