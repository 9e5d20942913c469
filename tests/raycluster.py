"""A real multi-node Ray cluster on this machine, for tests and benchmarks.

``RayTestCluster`` starts a head (``ray start --head``) and worker nodes (``ray start
--address=...``) as separate processes inside a network namespace of its own that has only the
loopback interface up: Ray binds to the machine's external address even when told 127.0.0.1,
and test traffic must stay on loopback. Inside the namespace every address is 127.0.0.1 and
the ports are private to it, so fixed ports cannot collide with other runs on the machine.
Drivers (``veil run --ray-address ...``) run inside the namespace too, through ``run`` or
``popen``.

Every node is started in a session of its own, so a node is exactly the processes of that
session (raylet, agents and the workers the raylet forks). Teardown kills them by PID, never
with ``ray stop`` (which kills every Ray process on the machine, other runs' too), then every
process left in the namespace, then deletes the namespace.

Usage::

    with RayTestCluster(nodes=2) as cluster:
        cluster.run(["veil", "run", "--ray-address", cluster.address, ...], timeout=300)
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
# Outside Ray's worker port range (10002-19999); private to the namespace, so fixed.
HEAD_PORT = 6379
DASHBOARD_PORT = 8265
# Each node's dashboard agent listens on a fixed port by default (52365): two nodes in one
# namespace need their own.
AGENT_PORT_BASE = 52365
_names = itertools.count()
_NETNS_NAME = re.compile(r"veilrc(\d+)x\d+")


class ClusterUnavailable(RuntimeError):
    """This machine cannot host the test cluster (no ``ip`` tool, not root, no netns support)."""


def _session_pids(sid: int) -> list[int]:
    """PIDs of the live processes in session ``sid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # Field 6 is the session id; the command name (field 2) may contain spaces.
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and has not stopped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie has already stopped


def _kill(pids: Sequence[int], wait_s: float = 30) -> None:
    """SIGKILL ``pids`` and wait until they have stopped (a loaded machine takes a moment)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait_s
    while any(is_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _delete_netns(name: str) -> None:
    """Kill every process left in namespace ``name``, then delete it."""
    for _ in range(50):
        pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                              text=True).stdout.split()
        if not pids:
            break
        _kill([int(p) for p in pids])
        time.sleep(0.1)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _remove_stale_namespaces() -> None:
    """Namespaces (and their processes) of test runs that were killed before their teardown:
    ours by name, and only when the process that created them is gone."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = _NETNS_NAME.fullmatch(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            _delete_netns(name)


class RayTestCluster:
    """A head and ``nodes - 1`` worker nodes, ``cpus_per_node`` CPUs each, in a fresh netns.

    ``address`` is the GCS address for ``--ray-address``; ``dashboard_url`` the Jobs API /
    dashboard (started when ``dashboard`` is true). Processes get ``VEIL_MODELS``, the venv on
    ``PATH`` and an explicit ``RAY_AUTH_MODE`` (a stray ``~/.ray/auth_token`` would otherwise
    switch token auth on for some processes and not others).
    """

    def __init__(self, *, nodes: int = 2, cpus_per_node: float = 1, dashboard: bool = True,
                 object_store_mb: int = 300, start_timeout: float = 180,
                 env: Mapping[str, str] | None = None) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least its head node")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.dashboard = dashboard
        self.object_store_mb = object_store_mb
        self.start_timeout = start_timeout
        self.netns = f"veilrc{os.getpid()}x{next(_names)}"
        self.address = f"127.0.0.1:{HEAD_PORT}"
        self.dashboard_url = f"http://127.0.0.1:{DASHBOARD_PORT}"
        # Short: Ray's unix socket paths live under it and must stay under 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="vrc", dir="/tmp"))
        self._extra_env = dict(env or {})
        self._netns_created = False
        self._node_sessions: dict[str, int] = {}  # node name -> session id (= its leader's pid)
        self._agent_ports = itertools.count(AGENT_PORT_BASE)
        self._started: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> RayTestCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the nodes and wait until all are alive; on any failure, stop what started."""
        try:
            self._create_netns()
            self._start_node("head")
            for i in range(1, self.nodes):
                self._start_node(f"worker{i}")
            self.wait_for_nodes(self.nodes)
        except BaseException:
            self.close()
            raise

    def _create_netns(self) -> None:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise ClusterUnavailable("the Ray test cluster needs root and iproute2's `ip` to "
                                     "create a network namespace")
        _remove_stale_namespaces()
        try:
            subprocess.run(["ip", "netns", "add", self.netns], check=True, capture_output=True,
                           text=True, timeout=30)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            raise ClusterUnavailable(f"cannot create network namespace {self.netns}: "
                                     f"{getattr(exc, 'stderr', '') or exc}") from exc
        self._netns_created = True
        subprocess.run(["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"],
                       check=True, capture_output=True, timeout=30)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment of every process started in the cluster's namespace."""
        env = dict(os.environ)
        env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
        env["RAY_AUTH_MODE"] = "disabled"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # A killed node is declared dead after ~3 s instead of the default ~15-30 s, so a
        # test that kills one sees Ray's recovery within its timeout.
        env["RAY_health_check_period_ms"] = "1000"
        env["RAY_health_check_timeout_ms"] = "1000"
        env["RAY_health_check_failure_threshold"] = "3"
        env.setdefault("VEIL_MODELS", str(Path(__file__).resolve().parents[2] / "shared" / "models"))
        # A driver joining the cluster must not start a Ray of its own on the way.
        env.pop("RAY_ADDRESS", None)
        env.update(self._extra_env)
        env.update(extra or {})
        return env

    def _start_node(self, name: str) -> None:
        temp_dir = self.root / name
        cmd = ["ray", "start", "--num-cpus", str(self.cpus_per_node), "--temp-dir", str(temp_dir),
               "--node-ip-address", "127.0.0.1", "--disable-usage-stats",
               "--object-store-memory", str(self.object_store_mb * 2**20),
               "--dashboard-agent-listen-port", str(next(self._agent_ports))]
        if name == "head":
            cmd += ["--head", "--port", str(HEAD_PORT)]
            if self.dashboard:
                cmd += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                        "--dashboard-port", str(DASHBOARD_PORT)]
            else:
                cmd += ["--include-dashboard", "false"]
        else:
            cmd += ["--address", self.address]
        log = self.root / f"{name}.start.log"
        with open(log, "wb") as out:
            # `ip netns exec` execs the command in place, so the new session's id is this
            # child's pid, and every daemon `ray start` leaves behind stays in that session.
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env(),
                                    start_new_session=True)
        self._node_sessions[name] = proc.pid
        try:
            rc = proc.wait(timeout=self.start_timeout)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise RuntimeError(f"`ray start` for node {name} "
                               f"{'timed out' if rc is None else f'exited {rc}'}:\n"
                               + log.read_text(errors="replace")[-3000:])

    def wait_for_nodes(self, count: int, timeout: float | None = None) -> list[dict]:
        """Block until ``count`` nodes are alive; their ``ray.nodes()`` entries."""
        timeout = timeout or self.start_timeout
        script = (
            "import json, sys, time, ray\n"
            f"ray.init(address={self.address!r}, logging_level='ERROR', log_to_driver=False)\n"
            f"deadline = time.monotonic() + {timeout}\n"
            "while True:\n"
            "    alive = [n for n in ray.nodes() if n['Alive']]\n"
            f"    if len(alive) >= {count} or time.monotonic() > deadline:\n"
            "        break\n"
            "    time.sleep(0.5)\n"
            "print(json.dumps([{'node_id': n['NodeID'], 'resources': n['Resources']} "
            "for n in alive]))\n"
        )
        proc = self.run([sys.executable, "-c", script], timeout=timeout + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot query the test cluster:\n{proc.stdout[-3000:]}")
        alive = json.loads(proc.stdout.strip().splitlines()[-1])
        if len(alive) < count:
            raise RuntimeError(f"only {len(alive)} of {count} Ray nodes alive after {timeout} s; "
                               f"logs under {self.root}")
        return alive

    def pids(self) -> set[int]:
        """Every process now in the cluster's namespace: nodes and drivers."""
        listing = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                                 text=True, check=True)
        return {int(p) for p in listing.stdout.split()}

    def kill_worker_node(self, name: str = "worker1") -> list[int]:
        """SIGKILL every process of worker node ``name`` (raylet, agents, its Ray workers),
        as a machine failure would; the PIDs killed."""
        if name == "head" or name not in self._node_sessions:
            raise ValueError(f"no worker node {name!r}; nodes: {sorted(self._node_sessions)}")
        pids = _session_pids(self._node_sessions.pop(name))
        _kill(pids)
        return pids

    def start_worker_node(self) -> str:
        """Add one more worker node (e.g. after ``kill_worker_node``); its name."""
        name = f"worker{max([0, *(int(n[6:]) for n in self._node_sessions if n != 'head')]) + 1}"
        self._start_node(name)
        return name

    def close(self) -> None:
        """Kill every process started here, by PID, and delete the namespace. Idempotent."""
        for name in reversed(list(self._node_sessions)):
            _kill(_session_pids(self._node_sessions.pop(name)))
        for proc in self._started:
            if proc.poll() is None:
                _kill(_session_pids(proc.pid))
                proc.kill()
            proc.wait(timeout=30)
        self._started.clear()
        if self._netns_created:
            # Whatever is left in the namespace was started by us (drivers, their children).
            _delete_netns(self.netns)
            self._netns_created = False
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ commands in the netns

    def popen(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
              log: Path | None = None, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``cmd`` inside the namespace in a session of its own (stopped by ``close``);
        stdout and stderr go to ``log`` when given, else to a pipe."""
        out = open(log, "wb") if log is not None else subprocess.PIPE  # noqa: SIM115
        try:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *cmd], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env(env), cwd=cwd,
                                    start_new_session=True)
        finally:
            if log is not None:
                out.close()
        self._started.append(proc)
        return proc

    def run(self, cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
            timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside the namespace; stdout and stderr together in ``.stdout``. On a
        timeout every process of the command is killed and ``TimeoutError`` raised with its
        output so far."""
        proc = self.popen(cmd, env=env, cwd=cwd)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(_session_pids(proc.pid))
            stdout, _ = proc.communicate()
            raise TimeoutError(f"{' '.join(cmd)} ran over {timeout} s:\n"
                               f"{stdout.decode(errors='replace')[-3000:]}") from None
        finally:
            self._started.remove(proc)
        return subprocess.CompletedProcess(list(cmd), proc.returncode,
                                           stdout.decode(errors="replace"))

    def work_nodes(self, entrypoint_contains: str) -> dict[str, set[str]]:
        """For every driver whose command line contains ``entrypoint_contains``: the ids of
        the nodes that ran its finished work (tasks, and methods of its own actors; Ray's
        internal service actors excluded). From the dashboard's state API."""
        script = (
            "import json\n"
            "from ray.util.state import list_jobs, list_tasks\n"
            f"address = {self.dashboard_url!r}\n"
            "internal = ('_StatsActor', 'ActorLocationTracker', '_AutoscalingCoordinator',"
            " 'AutoscalingCoordinator', 'datasets_stats_actor')\n"
            "out = {}\n"
            "for job in list_jobs(address=address, limit=10000, raise_on_missing_output=False):\n"
            f"    if {entrypoint_contains!r} not in (job.entrypoint or '') or not job.job_id:\n"
            "        continue\n"
            "    tasks = list_tasks(address=address, filters=[('job_id', '=', job.job_id)],"
            " detail=True, limit=10000, raise_on_missing_output=False)\n"
            "    out[job.job_id] = sorted({t.node_id for t in tasks if t.state == 'FINISHED'"
            " and t.node_id and t.type in ('NORMAL_TASK', 'ACTOR_TASK')"
            " and not t.name.startswith(internal)})\n"
            "print(json.dumps(out))\n"
        )
        proc = self.run([sys.executable, "-c", script], timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"cannot list the cluster's tasks:\n{proc.stdout[-3000:]}")
        return {job: set(nodes) for job, nodes in
                json.loads(proc.stdout.strip().splitlines()[-1]).items()}
