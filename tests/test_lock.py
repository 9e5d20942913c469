"""One writer per output: the ``OUT/.veil.lock`` lock, through the API and the real CLI."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from veil.pipelines.lock import LOCK_FILE, OutputLock, OutputLockedError


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out: Path, **info) -> Path:
    path = out / LOCK_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(),
                                "started": "2026-01-01T00:00:00+00:00", "command": "veil run",
                                **info}))
    return path


def test_lock_records_holder_and_is_removed_on_release(tmp_path):
    with OutputLock(tmp_path, command="veil run --output x") as lock:
        info = json.loads((tmp_path / LOCK_FILE).read_text())
        assert info["host"] == socket.gethostname() and info["pid"] == os.getpid()
        assert info["command"] == "veil run --output x" and info["started"].endswith("+00:00")
        assert lock.held
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_is_released_on_exception(tmp_path):
    with pytest.raises(KeyError), OutputLock(tmp_path):
        raise KeyError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    with OutputLock(tmp_path):  # and can be taken again
        pass


def test_second_lock_is_refused_while_held(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(OutputLockedError) as info:
            OutputLock(tmp_path).acquire()
        message = str(info.value)
        assert f"pid {os.getpid()}" in message and socket.gethostname() in message
        assert "held by a live process" in message and LOCK_FILE in message
    assert not (tmp_path / LOCK_FILE).exists()


def test_stale_lock_of_dead_process_is_taken_over(tmp_path, caplog):
    pid = write_lock(tmp_path) and json.loads((tmp_path / LOCK_FILE).read_text())["pid"]
    with caplog.at_level(logging.WARNING, logger="veil.pipelines.lock"), OutputLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"pid {pid}" in caplog.text and "stale" in caplog.text
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_from_another_host_is_refused(tmp_path):
    write_lock(tmp_path, host="other-machine.example", pid=os.getpid())
    with pytest.raises(OutputLockedError, match="another host.*host other-machine.example"):
        OutputLock(tmp_path).acquire()
    assert (tmp_path / LOCK_FILE).exists()  # left for a person to judge


def test_empty_lock_file_is_waited_for_then_taken_over(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_bytes(b"")
    old = time.time() - 60
    os.utime(path, (old, old))  # a creator that died before writing its holder
    with OutputLock(tmp_path):
        assert json.loads(path.read_text())["pid"] == os.getpid()


RACER = """
import sys
from veil.pipelines.lock import OutputLock, OutputLockedError
lock = OutputLock(sys.argv[1], command="racer")
sys.stdin.readline()  # start together
try:
    lock.acquire()
except OutputLockedError:
    print("locked", flush=True)
else:
    print("won", flush=True)
    sys.stdin.readline()  # hold it until every racer has answered
    lock.release()
"""


@pytest.mark.parametrize("stale", [False, True])
def test_racing_processes_get_exactly_one_lock(tmp_path, stale):
    """Several processes start at once (on a stale lock too): exactly one holds the lock."""
    if stale:
        write_lock(tmp_path)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(5)]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outcomes = sorted(proc.stdout.readline().strip() for proc in procs)
    for proc in procs:
        proc.communicate("release\n", timeout=60)
    assert outcomes == ["locked"] * 4 + ["won"], outcomes
    assert not (tmp_path / LOCK_FILE).exists()


def test_url_output_is_refused(tmp_path):
    with pytest.raises(OutputLockedError, match="URL"):
        OutputLock("s3://bucket/out")


# --- through the pipeline and the CLI ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_tar(tmp_path_factory, faces_dir) -> str:
    from helpers import face_photo, jpeg_bytes, write_tar

    path = tmp_path_factory.mktemp("lock-in") / "s-000.tar"
    write_tar(path, [("face", {"jpg": jpeg_bytes(face_photo(faces_dir, "obama.jpg", 160))})])
    return str(path)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "veil.cli", *args], capture_output=True,
                          text=True, timeout=300)


def test_second_veil_run_exits_2_while_the_output_is_locked(tmp_path, tiny_tar):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out, command="veil run (the first one)"):
        result = cli("run", "--input", tiny_tar, "--output", str(out), "--runner", "local",
                     "--no-progress")
        assert result.returncode == 2, result.stderr[-2000:]
        assert "is locked by another Veil command" in result.stderr
        assert f"pid {os.getpid()}" in result.stderr and socket.gethostname() in result.stderr
        assert "veil run (the first one)" in result.stderr
        assert f"delete '{out / LOCK_FILE}'" in result.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else touched
        # `veil validate` and `veil report` into that output are refused alike.
        result = cli("validate", "--original", tiny_tar, "--anonymized", str(out), "--output",
                     str(out), "--runner", "local", "--no-progress")
        assert result.returncode == 2 and "is locked" in result.stderr, result.stderr[-2000:]
        result = cli("report", str(out))
        assert result.returncode == 2 and "is locked" in result.stderr, result.stderr[-2000:]


def test_run_takes_over_a_stale_lock_and_removes_it(tmp_path, tiny_tar, models_dir, caplog):
    from veil.config import RunConfig
    from veil.pipelines.driver import run

    out = tmp_path / "out"
    out.mkdir()
    write_lock(out)
    with caplog.at_level(logging.WARNING, logger="veil.pipelines.lock"):
        summary = run(RunConfig(input=tiny_tar, output=str(out), runner="local", progress=False))
    assert summary.counts == {"anonymized": 1}
    assert "taking over stale lock" in caplog.text
    assert not (out / LOCK_FILE).exists()


def test_failing_run_releases_the_lock(tmp_path, tiny_tar, models_dir, monkeypatch):
    from veil.config import RunConfig
    from veil.pipelines import runners
    from veil.pipelines.driver import run

    def broken_runner(*_args, **_kwargs):
        raise RuntimeError("runner failed to start")

    monkeypatch.setattr(runners, "make_runner", broken_runner)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="runner failed"):
        run(RunConfig(input=tiny_tar, output=str(out), runner="local", progress=False))
    assert (out / "run.json").exists()  # it did start under the lock
    assert not (out / LOCK_FILE).exists()
