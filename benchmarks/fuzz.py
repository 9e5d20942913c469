"""Long fuzzing runs of the readers of untrusted input (issue 12): decode_image, the tar
reader, the Parquet reader, and the run-file loader.

The property checks and mutators are those of the bounded tests (``tests/fuzz/targets.py``);
this script only runs them for longer and reports, per target, the inputs tried, the distinct
contract violations found (with a minimal reproducer each) and the slowest input and peak RSS.

Two engines:

* ``hypothesis`` (default): structured mutations of the seed corpora (real photos re-encoded in
  every format, tar shards in every tar dialect, Parquet tables with odd columns, config
  dicts), run in chunks with fresh seeds until the time is up. A violation already seen is
  counted but not shrunk again, so the run keeps exploring.
* ``atheris``: coverage-guided byte fuzzing (libFuzzer) of the same checks, with Pillow's,
  tarfile's, PyYAML's and Veil's Python code instrumented, seeded with the same corpora; one
  subprocess per target, restarted when libFuzzer stops on a crash, OOM or timeout.

    nice -n 10 .venv/bin/python benchmarks/fuzz.py --minutes 10
    nice -n 10 .venv/bin/python benchmarks/fuzz.py --minutes 4 --engine atheris --targets decode

Results are printed as JSON lines and a table; reproducers go to ``bench-out/fuzz/``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TARGETS = ("decode", "tar", "parquet", "config", "yaml")
#: An input that takes longer than this is reported as a hang.
SLOW_SECONDS = 10.0
#: Peak RSS over this (MB) is reported as a memory blow-up, with the input that caused it.
RSS_LIMIT_MB = 2048
FACES = Path(os.environ.get("VEIL_FACES", ROOT.parent / "shared" / "data" / "faces"))


def _signature(exc: BaseException) -> str:
    """A violation's identity across inputs: its message without numbers and quoted text."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"'[^']*'|\"[^\"]*\"|0x[0-9a-f]+", "'…'", text)
    return re.sub(r"\d+", "N", text)[:160]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Alarm(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Alarm(f"input ran over {SLOW_SECONDS * 3:.0f} s")


class Tally:
    """Per-target counts, violations by signature, slowest input."""

    def __init__(self, target: str, out: Path) -> None:
        self.target = target
        self.out = out
        self.iterations = 0
        self.outcomes: dict[str, int] = {}
        self.violations: dict[str, dict[str, Any]] = {}
        self.slowest = 0.0
        self.rss_reported = False

    def run(self, check: Callable[[], str], describe: Callable[[], str]) -> None:
        """Run one input; violations are recorded, never raised (the search goes on)."""
        from fuzz.targets import PropertyViolation

        self.iterations += 1
        start = time.perf_counter()
        signal.alarm(int(SLOW_SECONDS * 3))
        try:
            outcome = check()
        except (PropertyViolation, _Alarm) as exc:
            self.record(_signature(exc), str(exc), describe())
            outcome = "violation"
        except Exception as exc:  # noqa: BLE001 - a bug in the harness itself is reported too
            self.record("harness: " + _signature(exc), traceback.format_exc(), describe())
            outcome = "violation"
        finally:
            signal.alarm(0)
        elapsed = time.perf_counter() - start
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if elapsed > self.slowest:
            self.slowest = elapsed
            (self.out / f"{self.target}-slowest.txt").write_text(
                f"{elapsed:.3f} s, outcome {outcome}\n{describe()}\n")
        if elapsed > SLOW_SECONDS:
            self.record("slow input", f"took {elapsed:.1f} s", describe())
        if not self.rss_reported and _peak_rss_mb() > RSS_LIMIT_MB:
            self.rss_reported = True
            self.record("memory", f"peak RSS {_peak_rss_mb():.0f} MB", describe())

    def record(self, signature: str, message: str, reproducer: str) -> None:
        entry = self.violations.setdefault(signature, {"count": 0, "message": message,
                                                       "reproducer": reproducer})
        entry["count"] += 1
        if len(reproducer) < len(entry["reproducer"]):  # keep the shortest reproducer
            entry.update(message=message, reproducer=reproducer)
        digest = hashlib.sha1(signature.encode()).hexdigest()[:10]
        (self.out / f"{self.target}-{digest}.txt").write_text(
            f"{signature}\n\n{entry['message']}\n\n{entry['reproducer']}\n")

    def summary(self, seconds: float, engine: str) -> dict[str, Any]:
        return {"target": self.target, "engine": engine, "seconds": round(seconds, 1),
                "iterations": self.iterations, "violations": len(self.violations),
                "violation_signatures": {k: v["count"] for k, v in self.violations.items()},
                "outcomes": dict(sorted(self.outcomes.items(), key=lambda kv: -kv[1])[:12]),
                "slowest_input_s": round(self.slowest, 3), "peak_rss_mb": round(_peak_rss_mb())}


# -------------------------------------------------------------------------------------------
# Hypothesis engine


def _cases(target: str, tmp: Path) -> tuple[Any, Callable[[Any], str]]:
    """The hypothesis strategy of a target and the function that checks one drawn case."""
    from fuzz import strategies as S
    from fuzz import targets as T

    if target == "decode":
        seeds = T.image_seeds(FACES)
        pool = [d for d, _e in seeds.values()]
        return S.mutated_images(seeds), lambda c: T.check_decode(
            T.apply_ops(seeds[c[0]][0], c[1], pool), c[2])
    if target == "tar":
        seeds = T.tar_seeds()
        pool = list(seeds.values())

        def check_tar(c: Any) -> str:
            original = seeds[c[0]]
            data = T.apply_tar_ops(original, c[1], pool)
            return T.check_tar(data, gz=c[2], damaged_from=T.first_difference(original, data))
        return S.mutated_tars(seeds), check_tar
    if target == "parquet":
        from hypothesis import strategies as st

        images = list(T._tiny_images().values())

        def check_parquet(c: Any) -> str:
            (table, options), ops = c
            original = T.parquet_bytes(table, **options)
            data = T.apply_ops(original, ops)
            return T.check_parquet(data, mutated=data != original,
                                   expected=table if data == original else None)
        return st.tuples(S.parquet_tables(images), st.lists(S.byte_op, max_size=2)), check_parquet
    if target == "config":
        return S.config_dicts(), T.check_config_dict
    if target == "yaml":
        import yaml
        from hypothesis import strategies as st

        dumped = S.config_dicts().map(lambda d: yaml.safe_dump(d).encode())
        return dumped | S.yaml_texts, lambda text: T.check_config_yaml(text, tmp)
    raise ValueError(target)


def run_hypothesis(target: str, seconds: float, out: Path, seed: int) -> dict[str, Any]:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    tally = Tally(target, out)
    with tempfile.TemporaryDirectory() as tmp:
        strategy, check = _cases(target, Path(tmp))
        start = time.monotonic()
        chunk = 0
        while time.monotonic() - start < seconds:
            chunk += 1

            @hseed(seed * 1_000_003 + chunk)
            @settings(max_examples=200, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(strategy)
            def explore(case: Any) -> None:
                if time.monotonic() - start >= seconds:
                    return
                tally.run(lambda: check(case), lambda: repr(case)[:20_000])

            explore()
        return tally.summary(time.monotonic() - start, "hypothesis")


# -------------------------------------------------------------------------------------------
# Atheris engine (one subprocess per target)

_EXTS = (None, "jpg", "png", "webp", "tif", "bmp", "gif", "jpeg", "tiff")


def _atheris_corpus(target: str, corpus: Path) -> None:
    from fuzz import targets as T

    corpus.mkdir(parents=True, exist_ok=True)
    if target == "decode":
        for name, (data, ext) in T.image_seeds(FACES).items():
            (corpus / name).write_bytes(bytes([_EXTS.index(ext)]) + data)
    elif target == "tar":
        for name, data in T.tar_seeds().items():
            (corpus / name).write_bytes(data)
    elif target == "parquet":
        for name, table in T.parquet_seed_tables().items():
            if name != "huge-binary":
                (corpus / name).write_bytes(T.parquet_bytes(table))
    else:
        import yaml

        from veil.config import RunConfig

        (corpus / "default").write_text(yaml.safe_dump(RunConfig().to_dict()))
        (corpus / "small").write_bytes(b"detect:\n  detectors: [centerface]\nio: {max_pixels: 9}\n")


def atheris_worker(target: str, seconds: int, out: Path, stats_path: Path) -> None:
    import atheris

    with atheris.instrument_imports(include=["PIL", "veil", "tarfile", "yaml", "fuzz"]):
        from fuzz import targets as T

        import veil.config  # noqa: F401
        import veil.pipelines.sources  # noqa: F401
        import veil.transforms.imageio  # noqa: F401

    tally = Tally(target, out)
    tmp = Path(tempfile.mkdtemp())
    last = [0.0]

    def one(data: bytes) -> None:
        if target == "decode":
            ext = _EXTS[data[0] % len(_EXTS)] if data else None
            tally.run(lambda: T.check_decode(data[1:], ext), lambda: repr((ext, data[1:])))
        elif target == "tar":
            tally.run(lambda: T.check_tar(data, damaged_from=0), lambda: repr(data))
        elif target == "parquet":
            tally.run(lambda: T.check_parquet(data, mutated=True), lambda: repr(data))
        else:
            tally.run(lambda: T.check_config_yaml(data, tmp), lambda: repr(data))
        now = time.monotonic()
        if now - last[0] > 1.0:
            last[0] = now
            stats_path.write_text(json.dumps(tally.summary(0, "atheris")))

    corpus = out / "corpus" / target
    _atheris_corpus(target, corpus)
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}",
                   f"-rss_limit_mb={RSS_LIMIT_MB}", f"-timeout={int(SLOW_SECONDS * 3)}",
                   f"-artifact_prefix={out}/{target}-", "-max_len=65536"], one)
    try:
        atheris.Fuzz()
    finally:
        stats_path.write_text(json.dumps(tally.summary(0, "atheris")))


def run_atheris(target: str, seconds: float, out: Path) -> dict[str, Any]:
    start = time.monotonic()
    total: dict[str, Any] = {"target": target, "engine": "atheris", "iterations": 0,
                             "violation_signatures": {}, "libfuzzer_stops": []}
    while (left := seconds - (time.monotonic() - start)) > 5:
        stats = out / f"atheris-{target}-{int(time.monotonic() * 1000)}.json"
        proc = subprocess.run(
            [sys.executable, __file__, "--atheris-worker", target, "--seconds", str(int(left)),
             "--out", str(out), "--stats", str(stats)],
            capture_output=True, text=True, timeout=left + 120)
        part = json.loads(stats.read_text()) if stats.exists() else {}
        total["iterations"] += part.get("iterations", 0)
        for sig, n in part.get("violation_signatures", {}).items():
            total["violation_signatures"][sig] = total["violation_signatures"].get(sig, 0) + n
        if not part:
            raise RuntimeError(f"the atheris worker for {target} failed to start:\n"
                               f"{proc.stderr[-2000:]}")
        if proc.returncode != 0:  # libFuzzer stopped: crash, OOM or timeout artifact written
            tail = [ln for ln in proc.stderr.splitlines() if "ERROR" in ln or "SUMMARY" in ln]
            total["libfuzzer_stops"].append(tail[:3] or proc.stderr[-500:])
        if proc.returncode == 0:
            break
    total["seconds"] = round(time.monotonic() - start, 1)
    total["violations"] = len(total["violation_signatures"]) + len(total["libfuzzer_stops"])
    return total


# -------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="total time over all targets")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--engine", choices=["hypothesis", "atheris", "both"], default="hypothesis")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "bench-out" / "fuzz"))
    ap.add_argument("--atheris-worker", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--stats", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VEIL_MODELS", str(ROOT.parent / "shared" / "models"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGALRM, _on_alarm)
    if args.atheris_worker:
        atheris_worker(args.atheris_worker, args.seconds, out, Path(args.stats))
        return

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    engines = ["hypothesis", "atheris"] if args.engine == "both" else [args.engine]
    share = args.minutes * 60 / (len(targets) * len(engines))
    results = []
    for engine in engines:
        for target in targets:
            if engine == "hypothesis":
                result = run_hypothesis(target, share, out, args.seed)
            else:
                result = run_atheris(target, share, out)
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{'target':<8} {'engine':<10} {'seconds':>8} {'inputs':>9} {'violations':>10}")
    for r in results:
        print(f"{r['target']:<8} {r['engine']:<10} {r['seconds']:>8} {r['iterations']:>9} "
              f"{r['violations']:>10}")
        for sig, n in r["violation_signatures"].items():
            print(f"    {n:>6} x {sig}")
    print(f"reproducers: {out}")


if __name__ == "__main__":
    main()
