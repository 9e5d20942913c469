"""`veil submit` without a cluster: the job's entrypoint, runtime environment and argument
errors. The job itself runs against a real two-node cluster in test_ray_cluster.py."""

from __future__ import annotations

import shlex

import pytest

from veil.pipelines.submit import JobRequest, SubmitError, job_request_from_cli


def test_entrypoint_quotes_every_argument_for_the_shell():
    request = job_request_from_cli(["--", "run", "--input", "s3://raw/shard-{0000..0009}.tar",
                                    "--output", "/data/out dir; rm -rf /"])
    entrypoint = request.entrypoint()
    assert shlex.split(entrypoint) == ["veil", "run", "--input", "s3://raw/shard-{0000..0009}.tar",
                                       "--output", "/data/out dir; rm -rf /"]


def test_runtime_env_passes_veil_settings_and_explicit_variables_only():
    request = job_request_from_cli(["run"], env=["AWS_ACCESS_KEY_ID=k", "VEIL_MODELS=/mnt/models",
                                                 "EMPTY="], pip=["s3fs==2024.6.0"])
    environ = {"VEIL_MODELS": "/home/me/models", "VEIL_DEBUG": "1", "AWS_SECRET_ACCESS_KEY": "s",
               "HOME": "/home/me"}
    runtime_env = request.runtime_env(environ)
    # --env wins over the submitting environment; credentials only when given explicitly.
    assert runtime_env == {"env_vars": {"VEIL_MODELS": "/mnt/models", "VEIL_DEBUG": "1",
                                        "AWS_ACCESS_KEY_ID": "k", "EMPTY": ""},
                           "pip": ["s3fs==2024.6.0"]}


def test_local_model_folder_is_not_sent_to_the_cluster():
    # A path of the submitting machine means nothing on the cluster's nodes.
    runtime_env = job_request_from_cli(["run"]).runtime_env({"VEIL_MODELS": "/home/me/models",
                                                             "VEIL_DEBUG": "1"})
    assert runtime_env == {"env_vars": {"VEIL_DEBUG": "1"}}


def test_working_dir_must_exist(tmp_path):
    assert job_request_from_cli(["run"], working_dir=str(tmp_path)).runtime_env({}) == {
        "env_vars": {}, "working_dir": str(tmp_path)}
    with pytest.raises(SubmitError, match="is not a folder"):
        job_request_from_cli(["run"], working_dir=str(tmp_path / "missing"))


@pytest.mark.parametrize(("args", "env", "message"), [
    ([], [], "no Veil command to submit"),
    (["--"], [], "no Veil command to submit"),
    (["submit", "--address", "x"], [], "cannot submit itself"),
    (["run"], ["NOVALUE"], "expects NAME=VALUE"),
    (["run"], ["=v"], "expects NAME=VALUE"),
])
def test_bad_arguments_are_refused_before_contacting_the_cluster(args, env, message):
    with pytest.raises(SubmitError, match=message):
        job_request_from_cli(args, env=env)


def test_cli_reports_a_bad_command_as_a_usage_error(capsys):
    from veil.cli import main

    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    assert "no Veil command to submit" in capsys.readouterr().err


def test_request_is_plain_data():
    request = JobRequest(args=["validate", "--original", "a"])
    assert request.entrypoint() == "veil validate --original a"
    assert request.runtime_env({}) == {"env_vars": {}}


class FakeJobs:
    """Stands in for ray's JobSubmissionClient: a job that ends with ``status`` and, when it
    failed, with the Veil command's ``exit_code``."""

    def __init__(self, status: str, exit_code: int | None = None) -> None:
        self.status, self.exit_code, self.submitted = status, exit_code, []

    def submit_job(self, **kw):
        self.submitted.append(kw)
        return "raysubmit_test"

    async def tail_job_logs(self, job_id):
        for line in ("Running entrypoint\n", "veil: some output\n"):
            yield line

    def get_job_status(self, job_id):
        from ray.job_submission import JobStatus

        return JobStatus(self.status)

    def get_job_info(self, job_id):
        from types import SimpleNamespace

        return SimpleNamespace(message=f"Job {self.status.lower()}\nlast logs...",
                               driver_exit_code=self.exit_code)


@pytest.mark.parametrize(("status", "exit_code", "expected"), [
    ("SUCCEEDED", 0, 0),
    ("FAILED", 4, 4),   # gates failed: `veil submit` exits as `veil run --gates` would
    ("FAILED", None, 1),  # failed before the command ran (runtime env, node lost)
    ("STOPPED", None, 1),
])
def test_exit_status_follows_the_job(monkeypatch, status, exit_code, expected):
    import io

    from veil.pipelines import submit as jobs

    fake = FakeJobs(status, exit_code)
    monkeypatch.setattr(jobs, "connect", lambda address: fake)
    out, err = io.StringIO(), io.StringIO()
    request = job_request_from_cli(["run", "--input", "x"])
    assert jobs.submit(request, address="http://head:8265", out=out, err=err) == expected
    assert out.getvalue() == "Running entrypoint\nveil: some output\n"
    assert fake.submitted[0]["entrypoint"] == "veil run --input x"
    assert "ray job logs --address http://head:8265 --follow raysubmit_test" in err.getvalue()
    assert jobs.submit(request, address="http://head:8265", wait=False, out=out, err=err) == 0
