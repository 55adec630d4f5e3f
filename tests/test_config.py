"""Config loading: dotted overrides, and bad configs rejected up front with every problem listed."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, with_overrides
from pipeline.train.engine import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"

BAD = """\
router:
  budget: 1.4
collect:
  taskz: [reach-v3]
model:
  backbone: gpt2
"""


def test_smoke_config_loads_and_overrides_win():
    cfg = load_config(SMOKE, ["router.budget=0.3", "distill.train.zero_stage=3"])
    assert cfg.router.budget == 0.3 and cfg.distill.train.zero_stage == 3
    assert cfg.collect.tasks == ["reach-v3", "push-v3"]
    assert cfg.tracking_uri.startswith("sqlite:///") and cfg.tracking_uri.endswith("mlflow.db")


def test_three_bad_values_are_reported_together_with_key_value_and_fix(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "3 problem(s)" in message
    assert "router.budget=1.4" in message and "fraction of layers to run" in message
    assert "collect.taskz: unknown key" in message and "episodes_per_task" in message
    assert "model.backbone='gpt2'" in message and "'llama', 'qwen2', 'mistral' or 'gemma'" in message


def test_cross_key_problems_are_listed():
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["model.hidden_size=30", "model.patch_size=7"])
    assert "model.hidden_size=30" in str(err.value) and "model.patch_size=7" in str(err.value)


def test_sweep_overrides_build_a_new_validated_config():
    cfg = load_config(SMOKE)
    trial = with_overrides(cfg, {"router.budget": 0.6, "distill.alpha": 0.5})
    assert (trial.router.budget, trial.distill.alpha) == (0.6, 0.5) and cfg.router.budget == 0.5
    with pytest.raises(ConfigError, match="router.budget=2"):
        with_overrides(cfg, {"router.budget": 2})


@pytest.mark.parametrize("entry", [["-m", "jobs.distill"], ["-m", "pipeline.cli", "distill"]])
def test_a_job_with_a_bad_config_fails_before_any_ray_work(tmp_path, entry):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    proc = subprocess.run([sys.executable, *entry, "--config", str(path), f"run.run_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "3 problem(s)" in proc.stderr and "router.budget=1.4" in proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr.split("problem(s)")[0]
    assert not (tmp_path / "run").exists()      # nothing was written: no Ray, no MLflow store


def test_offload_needs_a_zero_stage_that_can_offload():
    with pytest.raises(ConfigError, match=r"distill.train.offload=all: needs distill.train.zero_stage >= 3"):
        load_config(SMOKE, ["distill.train.offload=all", "distill.train.zero_stage=2"])
    with pytest.raises(ConfigError, match=r"teacher.offload=optimizer: needs teacher.zero_stage >= 1"):
        load_config(SMOKE, ["teacher.offload=optimizer", "teacher.zero_stage=0"])
    ds = deepspeed_config(load_config(SMOKE, ["distill.train.offload=optimizer"]).distill.train)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"] and ds["zero_force_ds_cpu_optimizer"] is False


def test_demo_config_and_ablation_keys_are_checked():
    cfg = load_config(REPO / "jobs/configs/demo.yaml")
    assert cfg.model.vision_stem == "mlp" and len(cfg.collect.tasks) >= 6 and cfg.evaluate.episodes_per_task >= 20
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["router.static_layers=[0,9]", "distill.train.augment_shift=4",
                            "model.vision_stem=mlp", "model.patch_size=6", "collect.image_size=60"])
    message = str(err.value)
    assert "router.static_layers=[0, 9]: needs distinct layer indices in [0, 3]" in message
    assert "distill.train.augment_shift=4: cached teacher targets belong to the unshifted images" in message
    assert "model.vision_stem=mlp needs a multiple of 4" in message
    with pytest.raises(ConfigError, match=r"router.static_layers=\[1, 3\]: a fixed set of layers is a static or "
                                          r"shallow student; set distill.family=static"):
        load_config(SMOKE, ["router.static_layers=[1,3]"])
    ok = load_config(SMOKE, ["router.static_layers=[1,3]", "distill.family=static",
                             "distill.objective=action_regression",
                             "distill.teacher_mode=online", "distill.train.augment_shift=4"])
    assert ok.router.static_layers == [1, 3] and ok.distill.objective == "action_regression"
    assert ok.distill.train.augment_shift == 4   # online: the teacher labels the shifted images


def test_top_k_router_has_no_threshold_to_calibrate():
    with pytest.raises(ConfigError, match=r"router.calibrate_episodes=2: router.select=topk runs round\(budget x "
                                          r"layers\) layers on every call"):
        load_config(SMOKE, ["router.select=topk", "router.calibrate_episodes=2"])
    assert load_config(SMOKE, ["router.select=topk"]).router.select == "topk"
    with pytest.raises(ConfigError, match=r"router.topk_phase=0.3: .* router.select=threshold; set router.select="
                                          r"topk or topk_phase=0"):
        load_config(SMOKE, ["router.select=threshold", "router.topk_phase=0.3"])


def test_pinned_layers_must_leave_the_router_a_choice():
    # SMOKE: 4 layers; budget 0.5 runs 2 per call.
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["router.pinned=[3,4]"])
    assert "router.pinned=[3, 4]: needs distinct layer indices in [0, 3]" in str(err.value)
    with pytest.raises(ConfigError, match=r"router.pinned=\[2, 3\]: 2 pinned layers leave the router nothing to "
                                          r"choose among the 2 that router.budget=0.5 runs per call"):
        load_config(SMOKE, ["router.select=topk", "router.pinned=[2,3]"])
    with pytest.raises(ConfigError, match=r"router.pinned=\[3\]: pins layers of a learned router, but "
                                          r"distill.family=static"):
        load_config(SMOKE, ["router.pinned=[3]", "distill.family=static"])
    assert load_config(SMOKE, ["router.select=topk", "router.pinned=[3]"]).router.pinned == [3]


def test_an_option_added_at_its_neutral_default_leaves_earlier_runs_current():
    # router.topk_phase, router.start and router.pinned came after runs were made: at their defaults they change
    # nothing, so --resume/--reuse digests stay; set, they change what distill trains.
    base = load_config(SMOKE, ["router.select=topk"])
    assert load_config(SMOKE, ["router.select=topk", "router.topk_phase=0", "router.start=open"]
                       ).digest() == base.digest()
    assert load_config(SMOKE, ["router.select=topk", "router.pinned=null"]).digest() == base.digest()
    router = base.model_dump(mode="json")["router"]
    del router["topk_phase"], router["start"], router["pinned"]   # the section as the code before the options dumped it
    assert base.digest(("router",)) == hashlib.sha256(json.dumps({"router": router}, sort_keys=True).encode()
                                                      ).hexdigest()[:12]
    for option in ("router.topk_phase=0.3", "router.start=static", "router.pinned=[3]"):
        assert load_config(SMOKE, ["router.select=topk", option]).digest(("router",)) != base.digest(("router",))
