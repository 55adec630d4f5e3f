"""Known failures print one line naming the file or key and the fix, and exit non-zero; --debug and unknown
bugs keep the traceback; errors wrapped by Ray are unwrapped to their cause."""

import pytest
from ray.train.v2.api.exceptions import WorkerGroupError

from pipeline import cli
from pipeline.config import ConfigError
from pipeline.data.validate import ShardError
from pipeline.errors import MissingInput, find_user_error

SMOKE = "jobs/configs/smoke.yaml"


@pytest.fixture
def bad_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  name: x\n  seed: [1\nteacher:\n  steps: 2\n")
    return path


def error_lines(capsys):
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return [line for line in captured.err.splitlines() if line.strip()]


def test_malformed_yaml_is_one_line_naming_the_file_and_line(bad_yaml, capsys):
    assert cli.main(["train-teacher", "--config", str(bad_yaml)]) == 2
    [line] = error_lines(capsys)
    assert line.startswith(f"error: {bad_yaml}:4:") and "not valid YAML" in line and "--debug" in line


def test_distill_before_train_teacher_names_the_missing_output_and_the_stage_to_run(tmp_path, capsys):
    manifest = tmp_path / "run" / "shards" / "manifest.json"   # collect has run; train-teacher has not
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    assert cli.main(["distill", "--config", SMOKE, f"run.run_dir={tmp_path / 'run'}"]) == 1
    [line] = error_lines(capsys)
    assert f"{tmp_path / 'run' / 'teacher' / 'model.safetensors'} does not exist" in line
    assert "`actdistill train-teacher --config FILE`" in line


def test_debug_shows_the_traceback(bad_yaml):
    with pytest.raises(ConfigError, match="not valid YAML"):
        cli.main(["train-teacher", "--config", str(bad_yaml), "--debug"])
    with pytest.raises(MissingInput):
        cli.main(["distill", "--config", SMOKE, "run.run_dir=/nonexistent/run", "--debug"])


def test_an_unknown_bug_keeps_its_traceback():
    def job(cfg):
        raise KeyError("a bug, not a user error")

    with pytest.raises(KeyError):
        cli.run_cli(job, "collect", ["--config", SMOKE])


def test_a_user_error_inside_a_train_worker_is_unwrapped(capsys):
    cause = ShardError("runs/x/shards/shard-00001.parquet is not a readable Parquet file; restore it")

    def job(cfg):
        # What fit() raises when a worker fails: RuntimeError from Ray Train's WorkerGroupError.
        raise RuntimeError("training run x failed") from WorkerGroupError("worker 1 failed", {1: cause})

    assert find_user_error(RuntimeError("plain")) is None
    assert cli.run_cli(job, "collect", ["--config", SMOKE]) == 1
    [line] = error_lines(capsys)
    assert line.startswith("error: runs/x/shards/shard-00001.parquet is not a readable Parquet file")


def test_a_missing_checkpoint_or_model_folder_read_inside_a_job_is_a_known_error(tmp_path):
    # Raised inside a Ray worker (e.g. an online distill reading the probes), these reach the CLI wrapped:
    # as MissingInput (still a FileNotFoundError for callers that catch that) they print one line.
    from pipeline.models.checkpoint import read_policy_config
    from pipeline.models.hf_import import read_hf_config

    for read in (read_policy_config, read_hf_config):
        with pytest.raises(MissingInput, match="not found") as err:
            read(str(tmp_path / "absent"))
        assert isinstance(err.value, FileNotFoundError) and find_user_error(err.value) is err.value
