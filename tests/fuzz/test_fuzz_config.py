"""Fuzzing the run configuration: dicts and YAML files of right and wrong types build a
well-typed RunConfig or raise ConfigError (which the CLI reports as a configuration error
with exit status 2), never a TypeError, ValueError or KeyError traceback."""

from __future__ import annotations

import os

import pytest

hypothesis = pytest.importorskip("hypothesis")
import yaml  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzz.strategies import config_dicts, yaml_texts  # noqa: E402
from fuzz.targets import check_config_dict, check_config_yaml  # noqa: E402
from veil.config import ConfigError, RunConfig  # noqa: E402

SCALE = float(os.environ.get("VEIL_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(300 * SCALE), deadline=None, derandomize=True,
                database=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(config_dicts())
def test_config_dicts_build_or_raise_config_error(data):
    check_config_dict(data)


def test_yaml_run_files_load_or_raise_config_error(tmp_path):
    @FUZZ
    @given(config_dicts().map(lambda d: yaml.safe_dump(d).encode()) | yaml_texts)
    def run(text):
        check_config_yaml(text, tmp_path)

    run()


# Regressions found by fuzzing --------------------------------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    ({"detect": {"max_side": "big"}}, "detect.max_side: expected an integer, got 'big'"),
    ({"detect": {"max_side": True}}, "detect.max_side: expected an integer"),
    ({"detect": {"score_threshold": "0.5"}}, "detect.score_threshold"),
    ({"detect": {"detectors": 5}}, "detect.detectors"),
    ({"detect": {"rotations": "90,x"}}, "detect: invalid literal for int()"),
    ({"anonymize": {"fill_color": 7}}, "anonymize.fill_color"),
    ({"io": {"max_pixels": 1.5}}, "io.max_pixels: expected an integer"),
    ({"max_failure_ratio": float("nan")}, "max_failure_ratio: expected a finite number"),
    ({"gpus_per_worker": float("inf")}, "gpus_per_worker: expected a finite number"),
    ({"detect": 5}, "detect: expected a mapping of options"),
    ({"rescan": [1]}, "rescan: expected a mapping of options"),
    ({"output": {}}, "output: expected a string"),
    ({"beam_options": "--runner=X"}, "beam_options: expected list[str]"),
    ({"models": {"yunet": 3}}, "models: expected dict[str, str]"),
    ({1: 2, "a": 3}, "unknown option(s) 1, a"),
    ({"anonymize": {"method": "dp-pixelate", "epsilon": float("inf")}},
     "anonymize.epsilon: expected a finite number"),
])
def test_wrong_types_are_configuration_errors(data, message):
    """Each of these raised TypeError, ValueError or AttributeError, or built a config with a
    wrong-typed field that would fail (or misbehave) later in the run."""
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(data)
    assert message in str(info.value)


@pytest.mark.parametrize(("text", "message"), [
    (b"detect: {max_side: 3\n", "not valid YAML"),
    (b"a: [\n", "not valid YAML"),
    (b"\xff\xfe\x00d", "must be UTF-8 text"),
    (b"false\n", "must be a YAML mapping"),
    (b"0\n", "must be a YAML mapping"),
])
def test_unreadable_run_files_are_configuration_errors(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_yaml(path)


def test_lenient_forms_still_accepted():
    config = RunConfig.from_dict({"detect": {"detectors": "mtcnn,yunet", "rotations": "0,90"},
                                  "fsap": {"certify": "dlib-resnet"},
                                  "anonymize": {"fill_color": [1, 2, 3]},
                                  "gpus_per_worker": 1, "io": {"max_pixels": 10}})
    assert config.detect.detectors == ["mtcnn", "yunet"]
    assert config.detect.rotations == [0, 90]
    assert config.anonymize.fill_color == (1, 2, 3)
    assert (tmp := RunConfig.from_dict(config.to_dict())) == config, tmp


def test_cli_reports_a_bad_run_file_as_a_configuration_error(tmp_path, capsys):
    from veil.cli import EXIT_USAGE, main

    path = tmp_path / "run.yaml"
    path.write_bytes(b"detect:\n  max_side: [1]\n")
    code = main(["run", "--config", str(path), "--input", str(tmp_path / "in"),
                 "--output", str(tmp_path / "out")])
    assert code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "configuration error: detect.max_side: expected an integer" in err
    assert "Traceback" not in err
