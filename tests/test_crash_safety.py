"""Crash safety: `veil run` killed with SIGKILL at any moment resumes to the same release.

Each case kills a real `veil run` at a named point of the commit protocol (the
``VEIL_FAULT_AT`` test hook, ``veil.pipelines.faults``), reruns it to completion and compares
the output with an uninterrupted reference run: released shard files byte for byte, manifests
row for row (all columns but the wall-clock ``seconds``/``timings``) with the same schema
metadata, every input key exactly once, no temp file anywhere, no released file that no
manifest lists, and report.json / run.json describing the finished release.

The local-runner cases run in processes forked from a pre-imported "zygote" (one Python that
has imported Veil, onnx, pyarrow and matplotlib), which runs ``veil.cli.main`` exactly as
``python -m veil.cli`` does but without paying ~4 s of imports per run. Ray and Beam cases
start real ``python -m veil.cli`` processes. ``benchmarks/bench_kill9.py`` adds random-delay
kills.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Zygote, face_photo, jpeg_bytes, write_tar

FACE_FILES = ["obama.jpg", "biden.jpg", "grace_hopper.jpg", "obama2.jpg", "astronaut.png", "obama3.jpg"]
TAR_SHARDS = 3
FOLDER_SHARD_SIZE = 2
#: Files that may appear in an output folder besides the release (the output lock is held
#: and removed by its own code; a stale one after a kill is taken over by the next run).
IGNORED_NAMES = {".veil.lock"}

def run_args(inp: str, out: Path, *extra: str, runner: str = "local") -> list[str]:
    return ["run", "--input", inp, "--output", str(out), "--runner", runner, "--batch-size", "2",
            "--no-progress", "--folder-shard-size", str(FOLDER_SHARD_SIZE), *extra]


# ------------------------------------------------------------------------------ comparisons


def temp_files(out: Path) -> list[str]:
    from veil.pipelines.sinks import TEMP_MARKER

    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if TEMP_MARKER in p.name)


def data_digest(out: Path) -> dict[str, str]:
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "data").rglob("*")) if p.is_file()}


def manifests(out: Path) -> dict[str, tuple[dict[str, str], list[dict]]]:
    """Each manifest's schema metadata and rows, less the wall-clock columns (the only
    run-dependent content of a manifest)."""
    import pyarrow.parquet as pq

    result = {}
    for path in sorted((out / "manifest").glob("*.parquet")):
        table = pq.read_table(path)
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        rows = table.drop_columns(["seconds", "timings"]).to_pylist()
        result[path.name] = (meta, rows)
    return result


def report_view(out: Path) -> dict:
    """report.json less what measures the run (times, throughput) or names the folder."""
    report = json.loads((out / "report" / "report.json").read_text())
    for name in ("output", "throughput"):
        report.pop(name, None)
    report.get("config", {}).pop("output", None)
    for shard in report.get("shards") or []:
        if isinstance(shard, dict):
            shard.pop("cpu_seconds", None)
    return report


def check_consistent(out: Path, keys: set[str], n_shards: int) -> None:
    """Invariants of a finished output that hold whatever happened before."""
    assert temp_files(out) == []
    listed = manifests(out)
    assert len(listed) == n_shards
    seen = [r["key"] for _meta, rows in listed.values() for r in rows]
    assert sorted(seen) == sorted(keys), "every input key exactly once"
    outputs = {o for meta, _rows in listed.values() for o in meta["outputs"].split(",") if o}
    assert set(data_digest(out)) == outputs, "every released file belongs to a committed shard"
    info = json.loads((out / "run.json").read_text())
    assert info["phase"] == "finished"
    summary = info["summary"]
    assert summary["shards_done"] + summary["shards_skipped"] == summary["shards_total"] == n_shards
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["samples"] == len(keys)
    assert (out / "report" / "index.html").stat().st_size > 0
    for path in out.iterdir():
        assert path.name in {"data", "manifest", "report", "run.json", "validation", "RELEASE.json"} | IGNORED_NAMES, path


def assert_same_release(out: Path, ref: Path) -> None:
    assert data_digest(out) == data_digest(ref), "released shards are byte-identical"
    assert manifests(out) == manifests(ref)
    assert report_view(out) == report_view(ref)
    info, ref_info = (json.loads((p / "run.json").read_text()) for p in (out, ref))
    assert info["fingerprint"] == ref_info["fingerprint"]
    assert {**info["config"], "output": None} == {**ref_info["config"], "output": None}


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


def build_inputs(root: Path, faces_dir: Path) -> dict:
    """Three WebDataset shards (2, 3 and 2 real photos; one truncated JPEG) and a folder tree
    of five photos (three shards of at most two files), with what a run must account for.
    Shared with benchmarks/bench_kill9.py."""
    photos = [jpeg_bytes(face_photo(faces_dir, f, max_side=160)) for f in FACE_FILES]
    shards = [[("a0", photos[0]), ("a1", photos[1])],
              [("b0", photos[2]), ("b1", photos[3]), ("b2", photos[0][:600])],
              [("c0", photos[4]), ("c1", photos[5])]]
    for i, samples in enumerate(shards):
        write_tar(root / f"shard-{i:03d}.tar",
                  [(k, {"jpg": b, "json": json.dumps({"k": k}).encode()}) for k, b in samples])
    folder = root / "tree"
    names = ["p/one.jpg", "p/two.jpg", "q/three.jpg", "q/four.jpg", "r/five.jpg"]
    for name, data in zip(names, photos, strict=False):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return {
        "tar": {"input": str(root / "shard-{000..002}.tar"), "shards": TAR_SHARDS,
                "keys": {k for s in shards for k, _ in s}},
        "folder": {"input": str(folder), "shards": 3,
                   "keys": {n.rsplit(".", 1)[0] for n in names}},
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, faces_dir) -> dict:
    return build_inputs(tmp_path_factory.mktemp("crash-in"), faces_dir)


@pytest.fixture(scope="module")
def references(inputs, zygote, tmp_path_factory) -> dict[str, Path]:
    refs = {}
    for kind, spec in inputs.items():
        out = tmp_path_factory.mktemp(f"crash-ref-{kind}")
        rc, log = zygote.run(run_args(spec["input"], out), out.parent / f"{out.name}.log")
        assert rc == 0, log[-3000:]
        check_consistent(out, spec["keys"], spec["shards"])
        refs[kind] = out
    return refs


def kill_and_resume(zygote, spec: dict, out: Path, faults: list[str], *extra: str) -> None:
    """Run once per fault spec, each killed there, then once to completion."""
    for i, fault in enumerate(faults):
        rc, log = zygote.run(run_args(spec["input"], out, *extra), out.parent / f"killed-{i}.log",
                             env={"VEIL_FAULT_AT": fault})
        assert rc == -signal.SIGKILL, f"{fault} was never reached (rc {rc}): {log[-3000:]}"
    rc, log = zygote.run(run_args(spec["input"], out, *extra), out.parent / "resume.log")
    assert rc == 0, log[-3000:]
    check_consistent(out, spec["keys"], spec["shards"])


# ------------------------------------------------------------------------------------ cases

#: (input, fault) pairs: each moment of reading, inference, the shard write, the gap between
#: shard and manifest, the manifest write, run.json and the report. Counts are hits within
#: the killed process (tar: shards of 2, 3, 2 samples in batches of 2; folder: 2, 2, 1).
LOCAL_KILLS = [
    ("tar", "read:1"),                 # first sample read, nothing written yet
    ("tar", "stage:decode:1"),
    ("tar", "stage:anonymize:3"),      # inference inside shard 2
    ("tar", "stage:rescan:1"),
    ("tar", "shard:sample:1"),         # mid shard write: temp tar half written
    ("tar", "shard:sample:4"),
    ("tar", "shard:fsynced:1"),        # temp tar complete, not renamed
    ("tar", "shard:renamed:1"),        # shard in place, no manifest yet
    ("tar", "manifest:tmp:1"),         # manifest temp written, not renamed
    ("tar", "manifest:done:2"),        # between two shards
    ("tar", "manifest:done:3"),        # all shards committed, run.json still "started"
    ("tar", "write:run.json:1"),       # run.json "started" half done
    ("tar", "write:run.json:2"),       # run.json "finished" half done
    ("tar", "write:report.json:1"),
    ("tar", "write:index.html:1"),
    ("folder", "shard:renamed:1"),     # folder shard: one file renamed, its sibling not
    ("folder", "shard:renamed:3"),     # shard 2 half in place
    ("folder", "manifest:tmp:2"),
]


@pytest.mark.parametrize(("kind", "fault"), LOCAL_KILLS, ids=[f"{k}-{f}" for k, f in LOCAL_KILLS])
def test_kill_anywhere_resumes_to_identical_release(kind, fault, inputs, references, zygote, tmp_path):
    out = tmp_path / "out"
    kill_and_resume(zygote, inputs[kind], out, [fault])
    assert_same_release(out, references[kind])


def test_repeated_kills_resume_to_identical_release(inputs, references, zygote, tmp_path):
    """Killed again while resuming, at a different moment each time."""
    out = tmp_path / "out"
    kill_and_resume(zygote, inputs["tar"], out, ["manifest:done:1", "shard:renamed:1", "shard:sample:2"])
    assert_same_release(out, references["tar"])


def test_kill_before_manifest_leaves_no_stale_manifest(inputs, zygote, tmp_path):
    """A shard redone with another configuration: its old manifest is withdrawn before the
    new data replace the old, so no manifest ever describes data it does not match."""
    spec = inputs["tar"]
    out = tmp_path / "out"
    rc, log = zygote.run(run_args(spec["input"], out), tmp_path / "first.log")
    assert rc == 0, log[-3000:]
    old = manifests(out)
    rc, log = zygote.run(run_args(spec["input"], out, "--method", "pixelate"), tmp_path / "killed.log",
                         env={"VEIL_FAULT_AT": "shard:renamed:1"})
    assert rc == -signal.SIGKILL, log[-3000:]
    first = "shard-000.tar.parquet"
    assert first not in manifests(out), "stale manifest left next to replaced data"
    assert manifests(out)["shard-001.tar.parquet"] == old["shard-001.tar.parquet"]
    rc, log = zygote.run(run_args(spec["input"], out, "--method", "pixelate"), tmp_path / "resume.log")
    assert rc == 0, log[-3000:]
    check_consistent(out, spec["keys"], spec["shards"])
    assert {r["method"] for _m, rows in manifests(out).values() for r in rows} <= {"pixelate", None}


def test_torn_manifest_is_redone_not_trusted(inputs, references, zygote, tmp_path):
    spec = inputs["tar"]
    out = tmp_path / "out"
    rc, log = zygote.run(run_args(spec["input"], out), tmp_path / "first.log")
    assert rc == 0, log[-3000:]
    path = out / "manifest" / "shard-001.tar.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    rc, log = zygote.run(run_args(spec["input"], out), tmp_path / "second.log")
    assert rc == 0, log[-3000:]
    assert "(2 already done, skipped)" in log
    check_consistent(out, spec["keys"], spec["shards"])
    assert_same_release(out, references["tar"])


def test_missing_released_file_redoes_its_shard(inputs, references, zygote, tmp_path):
    """A manifest whose data file is gone (deleted, or lost with a crashed disk cache) is not
    a committed shard."""
    spec = inputs["tar"]
    out = tmp_path / "out"
    rc, log = zygote.run(run_args(spec["input"], out), tmp_path / "first.log")
    assert rc == 0, log[-3000:]
    (out / "data" / "shard-002.tar").unlink()
    rc, log = zygote.run(run_args(spec["input"], out), tmp_path / "second.log")
    assert rc == 0, log[-3000:]
    assert "(2 already done, skipped)" in log
    assert_same_release(out, references["tar"])


# ---------------------------------------------------------------------- Ray, Beam, validation


def cli_run(args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.slow
@pytest.mark.parametrize(("runner", "fault"), [("ray", "ray:commit-submitted:2"), ("beam", "manifest:tmp:2")])
def test_kill_distributed_runner_resumes(runner, fault, inputs, references, tmp_path):
    """The driver of a Ray run killed just after it started the second shard's commit task
    (which runs on a Ray worker, and dies with the embedded Ray or finishes), and a Beam run
    (which commits inside the pipeline, in this process on the direct runner) killed
    mid-commit."""
    spec = inputs["tar"]
    out = tmp_path / "out"
    args = run_args(spec["input"], out, "--workers", "1", runner=runner)
    killed = cli_run(args, env={"VEIL_FAULT_AT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = cli_run(args)
    assert done.returncode == 0, done.stderr[-3000:]
    check_consistent(out, spec["keys"], spec["shards"])
    assert data_digest(out) == data_digest(references["tar"])
    assert manifests(out) == manifests(references["tar"])


@pytest.mark.slow
def test_kill_during_gates_resumes(inputs, zygote, tmp_path):
    """`veil run --gates` killed inside validation, after the first shard's validation state
    and then while writing the summary: each rerun reuses the finished shards of both passes,
    and the last reaches the reference verdict and metrics. RELEASE.json is never present
    unless the finished validation passed."""
    spec = inputs["tar"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    rc, log = zygote.run(run_args(spec["input"], ref, "--gates"), tmp_path / "ref.log")
    assert rc in (0, 4), log[-3000:]
    for i, fault in enumerate(["write:shard-001.tar.json:1", "write:summary.json:1"]):
        killed, log = zygote.run(run_args(spec["input"], out, "--gates"), tmp_path / f"killed-{i}.log",
                                 env={"VEIL_FAULT_AT": fault})
        assert killed == -signal.SIGKILL, log[-3000:]
        assert not (out / "RELEASE.json").exists()
    state = out / "validation" / "state"
    assert sorted(p.name for p in state.iterdir()) == [f"shard-00{i}.tar.json" for i in range(3)]
    resumed, log = zygote.run(run_args(spec["input"], out, "--gates"), tmp_path / "resume.log")
    assert resumed == rc, log[-3000:]
    check_consistent(out, spec["keys"], spec["shards"])
    assert data_digest(out) == data_digest(ref)
    assert manifests(out) == manifests(ref)
    summary, ref_summary = (json.loads((p / "validation" / "summary.json").read_text()) for p in (out, ref))
    assert summary["shards"] == {"total": 3, "done": 0, "skipped": 3}
    assert summary["status"] == ref_summary["status"]
    assert summary["metrics"] == ref_summary["metrics"]
    assert (out / "RELEASE.json").exists() == (summary["status"] == "passed")
