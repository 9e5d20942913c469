"""Test hook: SIGKILL this process the n-th time it reaches a named point.

Crash-safety tests (``tests/test_crash_safety.py``, ``benchmarks/bench_kill9.py``) set
``VEIL_FAULT_AT=<point>:<n>`` on a ``veil run`` subprocess to kill it at an exact moment of the
commit protocol, which a timer alone rarely hits. Unset, :func:`fault_point` is one dictionary
lookup. Points are named after what the code is doing when it is reached:

    read                 a sample was read from its shard
    stage:<name>         a stage is about to process a micro-batch (decode, detect, ...)
    shard:sample         a sample was added to the shard's temporary file
    shard:fsynced        the shard's temporary file is complete and fsynced, not yet renamed
    shard:renamed        the shard's data are in place, its manifest not yet written
    manifest:tmp         the manifest's temporary file is written, not yet renamed
    manifest:done        the manifest is in place: the shard is committed
    ray:commit-submitted the Ray driver started a shard's commit task (on a worker)
    write:<file name>    atomic_write_bytes wrote ``<file name>``'s temp file, not yet renamed
                         (run.json, report.json, index.html, summary.json, RELEASE.json,
                         validation state files)

Counts are per process; a point reached in a Ray or Beam worker kills that worker.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "VEIL_FAULT_AT"

_hits: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Kill the process with SIGKILL if ``$VEIL_FAULT_AT`` names this point and hit count."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    point, _, nth = spec.rpartition(":")
    if point != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if str(_hits[name]) == nth:
        os.kill(os.getpid(), signal.SIGKILL)
