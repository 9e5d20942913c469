"""``Runner.map_shards``: the per-shard task API that every runner implements and validation
runs on. The same tiny worker on the local loop, a Ray Data actor pool and a Beam ``ParDo``
gives the same results; its exceptions (in a task or in ``setup``) reach the caller as
themselves, naming the task and the runner, instead of hanging or being retried forever."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest

from veil.pipelines.runners import (
    GPUUnavailableError,
    ShardTaskError,
    ShardWorker,
    make_runner,
    plan_task_pool,
)
from veil.transforms.stage import Resources

TASKS = [f"shard-{i:03d}" for i in range(5)]


class Unpicklable(Exception):
    """Unpickling calls ``cls(*args)`` with one argument: this one needs two."""

    def __init__(self, what: str, why: str) -> None:
        super().__init__(f"{what}: {why}")


class LengthWorker(ShardWorker):
    """Measures a task name; ``setup`` counts how often it ran in this process."""

    def __init__(self, *, fail_on: str | None = None, broken_setup: bool = False,
                 unpicklable: bool = False, gpus: float = 0.0) -> None:
        self.fail_on = fail_on
        self.broken_setup = broken_setup
        self.unpicklable = unpicklable
        self.resources = Resources(cpus=1.0, gpus=gpus)
        self.setups = 0

    def setup(self) -> None:
        if self.broken_setup:
            raise FileNotFoundError("model file tiny.onnx not found: put it in $VEIL_MODELS")
        self.setups += 1

    def __call__(self, task: str) -> dict[str, Any]:
        if task == self.fail_on:
            if self.unpicklable:
                raise Unpicklable(task, "cannot be carried back")
            raise ValueError(f"{task} is truncated")
        return {"task": task, "length": len(task), "digits": sum(c.isdigit() for c in task),
                "pid": os.getpid(), "setups": self.setups}

    def describe(self, task: str) -> str:
        return f"the measurement of {task!r}"


def expected() -> list[tuple[str, int, int]]:
    return [(t, len(t), 3) for t in TASKS]


def outcome(results: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    return sorted((r["task"], r["length"], r["digits"]) for r in results)


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """``fn()``'s result or exception, failing the test if it takes longer (a hang)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"map_shards still running after {seconds} s: a hang"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.fixture
def ray_by_value(ray_local):
    """Ray workers cannot import this test module: ship its classes by value."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_local
    ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# ------------------------------------------------------------------------------ sizing


def test_task_pool_is_sized_like_the_validation_pool():
    worker = LengthWorker()
    pool = plan_task_pool(worker, cluster={"CPU": 2.0}, workers=None, tasks=5)
    assert (pool.size, pool.num_cpus, pool.num_gpus) == (2, 0.875, 0.0)
    # Never more actors than tasks; --workers wins; CPU shares never below 0.1.
    assert plan_task_pool(worker, cluster={"CPU": 2.0}, workers=None, tasks=1).size == 1
    assert plan_task_pool(worker, cluster={"CPU": 2.0}, workers=4, tasks=9).num_cpus == pytest.approx(0.4375)
    assert plan_task_pool(worker, cluster={"CPU": 2.0}, workers=40, tasks=60).num_cpus == 0.1
    gpu = LengthWorker(gpus=0.5)
    pool = plan_task_pool(gpu, cluster={"CPU": 8.0, "GPU": 2.0}, workers=None, tasks=10)
    assert (pool.size, pool.num_gpus) == (4, 0.5)
    assert plan_task_pool(gpu, cluster={"CPU": 8.0, "GPU": 2.0}, workers=3, tasks=10).size == 3
    with pytest.raises(GPUUnavailableError, match="asks for 0.5 GPU per worker but the Ray cluster has none"):
        plan_task_pool(gpu, cluster={"CPU": 8.0}, workers=None, tasks=10)


# ------------------------------------------------------------------------------- local


def test_local_runner_sets_up_once_and_maps_every_task():
    worker = LengthWorker()
    results = list(make_runner("local").map_shards(TASKS, worker))
    assert outcome(results) == expected()
    assert {r["setups"] for r in results} == {1} and {r["pid"] for r in results} == {os.getpid()}
    assert list(make_runner("local").map_shards([], LengthWorker(broken_setup=True))) == []


def test_local_runner_raises_a_task_error_as_itself_naming_the_task():
    with pytest.raises(ValueError, match="shard-003 is truncated") as info:
        list(make_runner("local").map_shards(TASKS, LengthWorker(fail_on="shard-003")))
    assert info.value.__notes__ == ["raised by the measurement of 'shard-003' on the local runner"]
    with pytest.raises(FileNotFoundError, match="put it in") as info:
        list(make_runner("local").map_shards(TASKS, LengthWorker(broken_setup=True)))
    assert info.value.__notes__ == ["raised while setting up LengthWorker on the local runner"]


# -------------------------------------------------------------------------- Ray and Beam


@pytest.mark.slow
def test_ray_and_beam_give_the_local_results(ray_by_value, tmp_path):
    ray = list(within(180, lambda: list(make_runner("ray").map_shards(TASKS, LengthWorker(), workers=2))))
    assert outcome(ray) == expected()
    # One setup per actor, two actors at most, none of them this process.
    assert {r["setups"] for r in ray} == {1}
    assert len({r["pid"] for r in ray}) <= 2 and os.getpid() not in {r["pid"] for r in ray}
    beam = within(180, lambda: list(make_runner("beam").map_shards(TASKS, LengthWorker(),
                                                                    scratch=str(tmp_path))))
    assert outcome(beam) == expected()
    assert {r["setups"] for r in beam} == {1}
    assert list(tmp_path.iterdir()) == []  # the outcome files are read back and removed


@pytest.mark.slow
def test_beam_spreads_tasks_over_separate_sdk_worker_processes(monkeypatch):
    """Beam's portable path (FnApiRunner in multi_processing mode, SDK workers as separate
    processes, as Flink and Spark run them): the outcomes come back through files."""
    # The SDK worker processes unpickle LengthWorker by module name: let them import it.
    tests = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p))
    runner = make_runner("beam", beam_options=["--runner=DirectRunner", "--direct_running_mode=multi_processing",
                                               "--direct_num_workers=2"])
    results = within(300, lambda: list(runner.map_shards(TASKS, LengthWorker())))
    assert outcome(results) == expected()
    assert os.getpid() not in {r["pid"] for r in results} and {r["setups"] for r in results} == {1}


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["ray", "beam"])
def test_worker_errors_reach_the_caller_as_themselves(runner, ray_by_value, tmp_path):
    def run(worker: LengthWorker) -> list[Any]:
        return list(make_runner(runner).map_shards(TASKS, worker, workers=2, scratch=str(tmp_path)))

    with pytest.raises(ValueError, match="shard-003 is truncated") as info:
        within(180, lambda: run(LengthWorker(fail_on="shard-003")))
    where, trace = info.value.__notes__
    assert where == f"raised by the measurement of 'shard-003' on the {runner} runner"
    assert trace.startswith("worker traceback:") and "in __call__" in trace
    with pytest.raises(FileNotFoundError, match="put it in") as info:
        within(180, lambda: run(LengthWorker(broken_setup=True)))
    assert info.value.__notes__[0] == f"raised while setting up LengthWorker on the {runner} runner"
    assert "in setup" in info.value.__notes__[1]
    with pytest.raises(ShardTaskError, match="on the .* runner: Unpicklable: shard-001: cannot be"):
        within(180, lambda: run(LengthWorker(fail_on="shard-001", unpicklable=True)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ray_refuses_a_gpu_worker_without_gpus_before_any_work(ray_by_value):
    if ray_by_value.cluster_resources().get("GPU"):
        pytest.skip("this Ray has GPUs")
    worker = LengthWorker(gpus=1.0, broken_setup=True)  # setup would fail if anything ran
    with pytest.raises(GPUUnavailableError, match="LengthWorker asks for 1 GPU"):
        within(60, lambda: list(make_runner("ray").map_shards(TASKS, worker)))
