"""The stage graph: one declaration that run, the CLI, resume and the bench follow."""

import pytest

from pipeline.cli import RESUMABLE, VERBS
from pipeline.config import PipelineConfig, with_overrides
from pipeline.stages import STAGES, RunPaths, inputs, inputs_digest, upstream
from pipeline.train.driver import RAY_SNAPSHOT, record_run, train_run


def test_stages_run_in_an_order_where_every_input_is_made_first():
    names = [s.name for s in STAGES]
    assert names == ["collect", "train-teacher", "probe-teacher", "distill", "evaluate", "sweep", "promote"]
    for position, stage in enumerate(STAGES):
        assert all(names.index(before) < position for before in stage.after), stage.name
    assert list(VERBS) == [*names, "run"] and RESUMABLE == ("train-teacher", "distill")
    assert upstream("distill") == ("collect", "train-teacher", "probe-teacher")


def test_a_stage_depends_on_its_own_sections_and_those_upstream_only():
    assert inputs("collect") == ("collect",)
    distill = inputs("distill")
    assert {"collect", "data", "model", "teacher", "probe", "router", "distill", "run.seed"} == set(distill)
    assert not {"evaluate", "sweep", "promote", "tracking", "run"} & set(distill)
    assert {"evaluate", "sweep", "promote"} <= set(inputs("promote"))


def test_outputs_are_typed_paths_under_the_run_folder(tmp_path):
    cfg = with_overrides(PipelineConfig(), {"run.run_dir": str(tmp_path), "data.labelled_uri": "s3://b/labels"})
    paths = RunPaths.of(cfg)
    assert paths.teacher == tmp_path / "teacher" and paths.student == tmp_path / "student"
    assert paths.shards == str(tmp_path / "shards") and paths.labelled == "s3://b/labels"
    done = {s.name: s.done_file(paths) for s in STAGES}
    assert done["train-teacher"] == str(tmp_path / "teacher" / "model.safetensors")
    assert done["probe-teacher"] == "s3://b/labels/labels.json" and done["promote"] is None
    assert paths.under("ablations/static") == str(tmp_path / "ablations" / "static")
    assert paths.under("s3://b/student") == "s3://b/student" and paths.under("/abs") == "/abs"


def _interrupted_distill(cfg):
    """What an interrupted distill leaves behind: its run record and Ray's snapshot."""
    run = train_run(cfg, "distill")
    record_run(run, cfg, "distill", mlflow_run_id="abc")
    (run.folder / RAY_SNAPSHOT).write_text("{}")
    return run.name


def test_resume_compares_only_the_stages_own_inputs(tmp_path):
    cfg = with_overrides(PipelineConfig(), {"run.run_dir": str(tmp_path)})
    name = _interrupted_distill(cfg)
    later = with_overrides(cfg, {"run.resume": name, "promote.model_name": "other", "evaluate.episodes_per_task": 9,
                                 "sweep.num_samples": 4, "run.ray_num_cpus": 8})
    resumed = train_run(later, "distill")
    assert resumed.resumed and resumed.name == name and resumed.mlflow_run_id == "abc"
    assert inputs_digest(later, "distill") == inputs_digest(cfg, "distill") != cfg.digest(None)
    for changed in ({"router.budget": 0.3}, {"distill.alpha": 0.5}, {"model.num_layers": 6}):
        with pytest.raises(ValueError, match=f"{name}.*config sections distill depends on.*router"):
            train_run(with_overrides(cfg, {"run.resume": name, **changed}), "distill")
    with pytest.raises(ValueError, match="is a distill run, not train-teacher"):
        train_run(with_overrides(cfg, {"run.resume": name}), "train-teacher")
