"""What the fault tests share: a tiny model config, Meta-World expert shards, a random teacher with its probes, and
running a job in a thread (Ray itself must be started in the main thread: its head dies with the thread that
started it)."""

import threading
from pathlib import Path

import torch

from pipeline.data.shards import write_shards
from pipeline.models.checkpoint import PolicyCard, save_policy, save_probes
from pipeline.models.vla import VLA, teacher_config
from pipeline.sim.metaworld_env import run_expert_episode
from pipeline.stages import RunPaths
from pipeline.teacher.probing import new_probes

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
# Tiny on purpose: a fault must land inside training, and each fit costs ~45 s of Ray start-up before its steps.
TINY = ["collect.image_size=32", "model.patch_size=8", "model.hidden_size=32", "model.num_layers=2",
        "model.intermediate_size=64", "model.graph_width=16", "model.semantic_dim=16", "data.val_fraction=0",
        "run.ray_num_cpus=4"]
NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4, "proprio_std": [1.0] * 4}


def write_expert_shards(uri: str, rows_per_shard: int = 60) -> str:
    """Four scripted-expert episodes (reach and push, 2 seeds, up to 40 steps) at 32 px, as shards at `uri`."""
    write_shards([run_expert_episode(task, seed, 32, "corner", 40) for task in ("reach-v3", "push-v3")
                  for seed in (0, 1)], uri, rows_per_shard=rows_per_shard)
    return uri


def teacher_and_probes(cfg):
    """A random teacher and its probes in the run folder: enough for an online distill, which reads no labels."""
    torch.manual_seed(0)
    teacher = VLA(teacher_config(cfg.model, [32, 32, 3], 4, 4))
    digest = save_policy(teacher, str(RunPaths.of(cfg).teacher), PolicyCard(normalizer=NORMALIZER))
    save_probes(new_probes(teacher, cfg.model), str(RunPaths.of(cfg).probes), {"teacher_hash": digest})
    return digest


def in_thread(fn):
    """Run fn in a thread: (thread, outcome), outcome holding "value" or "error" once it ends."""
    outcome = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome
