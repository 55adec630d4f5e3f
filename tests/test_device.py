"""The device-agnostic training plane on CPU: run.device=auto is today's CPU run here; attention implementations
and activation checkpointing change no numbers; GPU-only settings are refused naming the key and the fix; evaluate's
policies on cpu give today's actions."""

import copy
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from pipeline.config import ConfigError, load_config
from pipeline.evaluate.policy import Policy
from pipeline.evaluate.rollout import gpu_share
from pipeline.models.checkpoint import PolicyCard, save_policy
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA
from pipeline.train.device import resolve_device, worker_env
from pipeline.train.driver import scaling
from pipeline.train.engine import deepspeed_config
from tests.test_evaluate_figures import NORMALIZER
from tests.test_models import inputs, tiny

SMOKE = "jobs/configs/smoke.yaml"


def test_auto_is_cpu_here_and_the_cpu_run_is_todays():
    cfg = load_config(SMOKE)
    assert cfg.run.device == "auto"
    assert resolve_device(cfg) == "cpu"
    assert worker_env(cfg, local=True)["DS_ACCELERATOR"] == "cpu"
    train = cfg.teacher
    assert deepspeed_config(train, "cpu") == {
        "train_micro_batch_size_per_gpu": train.batch_size, "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip, "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16"}, "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9, "wall_clock_breakdown": False}
    workers = scaling(train, "cpu")
    assert not workers.use_gpu and workers.resources_per_worker == {"CPU": train.cpus_per_worker}


def test_gpu_settings_resolve_on_a_gpu_cluster():
    cfg = load_config(SMOKE, ["distill.train.precision=fp16", "distill.train.offload=optimizer",
                              "distill.train.zero_stage=2"])
    assert resolve_device(cfg, gpus=8) == "cuda"
    assert scaling(cfg.teacher, "cuda").resources_per_worker == {"CPU": cfg.teacher.cpus_per_worker, "GPU": 1}
    ds = deepspeed_config(cfg.distill.train, "cuda")
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0          # dynamic loss scaling
    assert ds["optimizer"]["type"] == "AdamW" and "zero_force_ds_cpu_optimizer" not in ds   # DeepSpeedCPUAdam
    # On a cluster run.device=auto cannot be resolved before Ray connects: DeepSpeed detects each node's device.
    assert "DS_ACCELERATOR" not in worker_env(cfg, local=False)


@pytest.mark.parametrize("overrides, key, fix", [
    (["run.device=cpu", "teacher.precision=fp16"], "teacher.precision=fp16", "teacher.precision=bf16"),
    (["run.device=cpu", "model.attention=flash_attention_2"], "model.attention=flash_attention_2",
     "model.attention=sdpa"),
])
def test_gpu_only_settings_with_device_cpu_are_config_errors(overrides, key, fix):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert key in str(err.value) and fix in str(err.value)


@pytest.mark.parametrize("overrides, key, fix", [
    (["run.device=cuda"], "run.device=cuda", "run.device=cpu"),
    (["distill.train.precision=fp16"], "distill.train.precision=fp16", "distill.train.precision=bf16"),
    (["model.attention=flash_attention_2"], "model.attention=flash_attention_2", "model.attention=sdpa"),
])
def test_what_a_machine_without_gpus_cannot_run_fails_before_ray(overrides, key, fix):
    cfg = load_config(SMOKE, overrides)
    with pytest.raises(ConfigError) as err:
        worker_env(cfg, local=True)      # what start_ray calls before ray.init
    assert key in str(err.value) and fix in str(err.value)


def test_flash_attention_without_the_package_names_the_install():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here")
    cfg = load_config(SMOKE, ["model.attention=flash_attention_2"])
    with pytest.raises(ConfigError, match="pip install flash-attn"):
        resolve_device(cfg, gpus=1)


def test_sdpa_and_eager_give_the_same_actions():
    torch.manual_seed(0)
    teacher = VLA(tiny()).eval()
    student = VLA(tiny(router_hidden=16)).eval()
    x = inputs(batch=4)     # instructions of 1-4 words: padded keys are masked in both
    with torch.no_grad():
        for model, mode in ((teacher, "off"), (student, "soft"), (student, "hard")):
            sdpa = model(*x, mode=mode).actions
            eager = model.set_attention("eager")(*x, mode=mode).actions
            model.set_attention("sdpa")
            assert model.causal is not None
            torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=0)


def _step(model, x, actions):
    out = model(*x, mode="straight_through")
    loss = F.mse_loss(out.actions, actions) + out.gates.mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _saved_bytes(model, x):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*x, mode="straight_through").actions.sum().backward()
    model.zero_grad(set_to_none=True)
    return total[0]


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = VLA(tiny(router_hidden=16)).train()
    checkpointed = copy.deepcopy(plain).checkpoint_layers()
    x, actions = inputs(batch=4), torch.randn(4, 4)
    loss, grads = _step(plain, x, actions)
    loss_ckpt, grads_ckpt = _step(checkpointed, x, actions)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads.keys() and any("backbone.layers" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=0, msg=name)
    # The inner decoder layers recompute (the GatedLayer wrappers do not): less is kept for backward.
    assert all(isinstance(w.layer, GradientCheckpointingLayer) and w.layer.gradient_checkpointing
               and not isinstance(w, GradientCheckpointingLayer) for w in checkpointed.backbone.layers)
    assert _saved_bytes(checkpointed, x) < _saved_bytes(plain, x)


# The evaluate stage: policies on the resolved device; the CPU path is today's.

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny teacher and a routed student whose gates differ by input, on disk."""
    torch.manual_seed(0)
    teacher = VLA(tiny()).eval()
    student = derive_student(teacher, 8)
    torch.nn.init.normal_(student.router.out.weight, std=3.0)
    root = tmp_path_factory.mktemp("device_policies")
    for name, model in (("teacher", teacher), ("student", student)):
        save_policy(model, str(root / name), PolicyCard(normalizer=NORMALIZER))
    return [str(root / "teacher"), str(root / "student")]


def test_a_policy_on_cpu_gives_the_actions_it_always_gave(saved):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    proprio = rng.normal(size=(5, 4)).astype(np.float32)
    words = ["reach", "press the button", "close drawer", "open", "push it left"]
    for uri in saved:
        default, cpu = Policy(uri), Policy(uri, device="cpu")
        assert cpu.device == torch.device("cpu") and all(p.device.type == "cpu" for p in cpu.model.parameters())
        a, b = default.step(images, words, proprio), cpu.step(images, words, proprio)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.executed, b.executed)
        assert isinstance(b.actions, np.ndarray) and b.actions.dtype == np.float32


def test_evaluate_with_device_cuda_fails_naming_it_before_any_rollout(monkeypatch, tmp_path):
    import jobs.evaluate
    import pipeline.evaluate.suite as suite

    def no_rollouts(*args, **kwargs):
        raise AssertionError("a rollout started")

    monkeypatch.setattr(suite, "run_closed_loop", no_rollouts)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(SMOKE, ["run.device=cuda", f"run.run_dir={tmp_path}"])
    # The job (start_ray refuses before Ray starts), and the suite as promote and sweep call it (first thing,
    # before the shards are read: there are none under tmp_path).
    for call in (lambda: jobs.evaluate.main(cfg), lambda: suite.evaluate_policies(cfg, {"student": "x"}, 1)):
        with pytest.raises(ConfigError) as err:
            call()
        assert "run.device=cuda" in str(err.value) and "run.device=cpu" in str(err.value)


def test_rollout_workers_share_one_gpu():
    assert gpu_share(1) == 1.0 and gpu_share(2) == 0.5
    assert all(n * gpu_share(n) <= 1.0 for n in range(1, 65))   # 1/7 rounded to nearest would overbook it
