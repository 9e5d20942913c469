"""``veil submit``: run a Veil command on a Ray cluster as a Ray job (Ray Jobs API).

The command (``veil run ...``, ``veil validate ...``) becomes the job's entrypoint and runs as
the job's driver on the head node, so the submitting machine may go away (``--no-wait``) and
the release is written by the cluster. The job's logs are streamed back until it ends; the exit
status is the Veil command's own (0 on success), or 1 when the job failed otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

#: Variables of the submitting environment passed to the job: Veil's own settings. Credentials
#: (AWS_*, GOOGLE_*) are never passed implicitly; give them with ``--env`` where the cluster
#: does not already have them.
PASSTHROUGH_PREFIX = "VEIL_"
#: Paths of this machine that mean nothing on the cluster's nodes: passed only with ``--env``.
LOCAL_ONLY = frozenset({"VEIL_MODELS", "VEIL_FAULT_AT"})
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The job could not be submitted: bad arguments."""


class ClusterUnreachableError(SubmitError):
    """The Jobs API at the given address did not answer, or refused the job."""


@dataclass(frozen=True)
class JobRequest:
    """What to run on the cluster: ``veil <args>`` with a runtime environment."""

    args: Sequence[str]
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    pip: Sequence[str] = ()

    def entrypoint(self) -> str:
        # The entrypoint is run by a shell on the head node: quote every argument.
        return shlex.join(["veil", *self.args])

    def runtime_env(self, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        environ = os.environ if environ is None else environ
        env_vars = {k: v for k, v in environ.items()
                    if k.startswith(PASSTHROUGH_PREFIX) and k not in LOCAL_ONLY}
        env_vars.update(self.env)
        runtime_env: dict[str, Any] = {"env_vars": env_vars}
        if self.working_dir:
            runtime_env["working_dir"] = self.working_dir
        if self.pip:
            runtime_env["pip"] = list(self.pip)
        return runtime_env


def parse_env(items: Sequence[str]) -> dict[str, str]:
    """``K=V`` strings as a dict; a clear error for anything else."""
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SubmitError(f"--env expects NAME=VALUE, got {item!r}")
        env[key] = value
    return env


def job_request_from_cli(args: Sequence[str], *, env: Sequence[str] = (),
                         working_dir: str | None = None, pip: Sequence[str] = ()) -> JobRequest:
    """The request for ``veil submit ... -- <args>``; checks what can be checked here."""
    args = list(args)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise SubmitError("no Veil command to submit: give it after '--', e.g. "
                          "veil submit --address http://HEAD:8265 -- run --input ... --output ...")
    if args[0] == "submit":
        raise SubmitError("'veil submit' cannot submit itself")
    if working_dir is not None and not os.path.isdir(working_dir):
        raise SubmitError(f"--working-dir {working_dir!r} is not a folder")
    return JobRequest(args=args, env=parse_env(env), working_dir=working_dir, pip=tuple(pip))


def connect(address: str):
    """A ``JobSubmissionClient`` for the dashboard at ``address`` (``http://HEAD:8265``)."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise SubmitError("veil submit needs Ray's Jobs API: pip install 'ray[default]'") from exc
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, OSError, RuntimeError, ValueError) as exc:
        raise ClusterUnreachableError(
            f"cannot reach the Ray Jobs API at {address}: {exc}\n"
            "Give the head node's dashboard address (http://HEAD:8265); the head must run the "
            "dashboard (ray start --head --include-dashboard true --dashboard-host 0.0.0.0, "
            "which needs ray[default]), and that port must be reachable from here.") from exc


def _how_to_follow(address: str, job_id: str) -> str:
    return (f"  follow:  ray job logs --address {address} --follow {job_id}\n"
            f"  status:  ray job status --address {address} {job_id}\n"
            f"  stop:    ray job stop --address {address} {job_id}")


async def _stream_logs(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def wait_for_end(client: Any, job_id: str, *, poll_s: float = 1.0) -> str:
    """The job's terminal status, polling after the log stream has closed (the stream may end
    a moment before the status is final, or drop with the connection)."""
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in _TERMINAL:
            return status
        time.sleep(poll_s)


def submit(request: JobRequest, *, address: str, wait: bool = True,
           out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Submit ``request`` to the cluster at ``address``; with ``wait``, stream its logs to
    ``out`` until it ends. The exit status: 0 when the job succeeded (or was only submitted),
    the Veil command's exit code when it failed with one, else 1."""
    out = out or sys.stdout
    err = err or sys.stderr
    client = connect(address)
    try:
        job_id = client.submit_job(entrypoint=request.entrypoint(),
                                   runtime_env=request.runtime_env(),
                                   metadata={"submitted_by": "veil submit"})
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterUnreachableError(f"the Ray cluster at {address} refused the job: {exc}") from exc
    print(f"veil: submitted Ray job {job_id}: {request.entrypoint()}", file=err)
    print(_how_to_follow(address, job_id), file=err, flush=True)
    if not wait:
        return 0
    try:
        asyncio.run(_stream_logs(client, job_id, out))
        status = wait_for_end(client, job_id)
    except KeyboardInterrupt:
        print(f"veil: stopped following; job {job_id} keeps running on the cluster\n"
              + _how_to_follow(address, job_id), file=err)
        return 130
    if status == "SUCCEEDED":
        print(f"veil: job {job_id} succeeded", file=err)
        return 0
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    # Ray appends the job's last logs to the message: they were streamed above already.
    reason = (info.message or "no message").splitlines()[0]
    print(f"veil: job {job_id} {status.lower()}: {reason}\n" + _how_to_follow(address, job_id),
          file=err)
    return code if isinstance(code, int) and code > 0 else 1
