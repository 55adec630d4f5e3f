"""Validation under ZeRO-3: the hard-routed held-out pass keeps the ranks in step (ranks whose rows skip different
layers used to hang in ZeRO-3's per-layer weight gathers) and gives the held-out MSE one process gives."""

import threading

import pytest
import torch
import torch.distributed as dist
from test_fault_tolerance import TINY, _config_file

from jobs import distill as distill_job
from pipeline.config import load_config
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.data.manifest import read_manifest
from pipeline.data.shards import open_shards, split_episodes
from pipeline.models.checkpoint import PolicyCard, load_policy, save_policy, save_probes
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA, teacher_config
from pipeline.ray_runtime import start_ray
from pipeline.stages import RunPaths
from pipeline.teacher.probing import new_probes

ROUTED = ["model.num_layers=4", "data.val_fraction=0.25", "distill.teacher_mode=online", "distill.eval_every=1"]
# 2 steps, each followed by a validation pass, then the final one: validation between ZeRO-3 training steps.
TRAIN = [f"distill.train.{k}={v}" for k, v in dict(steps=2, batch_size=4, zero_stage=3, num_workers=2,
                                                      log_every=1).items()]


def _teacher_with_a_sharp_router(cfg):
    """A random teacher carrying a router, which derive_student copies into the student (it copies every weight
    the teacher has). A fresh router's gates on these frames sit within ~0.003 of each other per layer, so every
    row runs the same layers; this one's weights have std 1 (not 0.02), and each layer's bias puts the median
    logit over all rows at 0: logits spread ~0.4-0.9 per layer, and 4-row batches run different layer sets
    however 2 training steps (~0.2 of logit) move them."""
    torch.manual_seed(0)
    vla = teacher_config(cfg.model, [32, 32, 3], 4, 4).model_copy(update={"router_hidden": cfg.router.hidden})
    teacher = VLA(vla).eval()
    torch.nn.init.normal_(teacher.router.out.weight, std=1.0)
    torch.nn.init.zeros_(teacher.router.out.bias)
    stats = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
             "proprio_std": [1.0] * 4}
    rows = open_shards(cfg.data.shards_uri).take_batch(10_000, batch_format="numpy")
    b = to_model_batch(rows, Normalizer.from_dict(stats), (32, 32, 3))
    with torch.no_grad():
        gates = teacher(b["images"], b["instructions"], b["proprio"], mode="soft").gates
        teacher.router.out.bias.copy_(-torch.logit(gates.double()).median(0).values.float())
    digest = save_policy(teacher, str(RunPaths.of(cfg).teacher), PolicyCard(normalizer=stats))
    save_probes(new_probes(teacher, cfg.model), str(RunPaths.of(cfg).probes), {"teacher_hash": digest})


def _held_out_mse_in_one_process(cfg):
    """The exported student, hard-routed, on every held-out row at once (one process, no collectives)."""
    manifest = read_manifest(cfg.data.shards_uri)
    _, val_ids = split_episodes(manifest, cfg.data.val_fraction)
    rows = open_shards(cfg.data.shards_uri, manifest, episodes=val_ids).take_batch(10_000, batch_format="numpy")
    student, card = load_policy(str(RunPaths.of(cfg).student))
    b = to_model_batch(rows, Normalizer.from_dict(card.normalizer), tuple(manifest.image_shape))
    with torch.no_grad():
        out = student.eval()(b["images"], b["instructions"], b["proprio"], mode="hard", threshold=card.threshold)
    return float(((out.actions - b["actions"]) ** 2).mean()), out.executed


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_distill_with_validation_on_two_workers_matches_one_process(shards, tmp_path):  # noqa: F811
    config, overrides = _config_file(tmp_path, tmp_path / "run", shards, TINY + ROUTED + TRAIN)
    cfg = load_config(config, overrides)
    start_ray(cfg)
    _teacher_with_a_sharp_router(cfg)

    result = distill_job.main(cfg)   # hung here before: the ranks' layer gathers stopped lining up

    expected, executed = _held_out_mse_in_one_process(cfg)
    # The case that hung: 4-row batches (what each rank validates at once) run different sets of layers.
    layer_sets = {tuple(executed[i:i + 4].any(0).tolist()) for i in range(0, len(executed), 4)}
    assert len(layer_sets) > 1, f"every 4-row batch runs the layers {layer_sets}: routing is not mixed"
    assert len(executed) == 40   # Ray's equal split drops no held-out row
    # Same rows, same per-row routing; only the batch composition differs (float32 sums: ~1e-7 relative).
    assert result.metrics["val_action_mse"] == pytest.approx(expected, rel=1e-4)


def _two_ranks_in_threads(monkeypatch):
    """all_reduce(MAX) between two threads standing in for two ranks (a real group needs two processes)."""
    barrier, slots = threading.Barrier(2), {}

    def all_reduce(tensor, op=None):
        slots[threading.current_thread().name] = tensor.clone()
        barrier.wait()
        tensor.copy_(torch.stack(list(slots.values())).amax(0))
        barrier.wait()

    monkeypatch.setattr(dist, "all_reduce", all_reduce)


def test_lockstep_hard_routing_calls_the_same_layers_on_every_rank_with_each_rows_own_numbers(monkeypatch):
    from test_models import inputs, tiny

    torch.manual_seed(0)
    student = derive_student(VLA(tiny(layers=3)).eval(), router_hidden=16).eval()
    student.router.out.weight.data.normal_(std=1.0)   # gates differ per row: rows run different layers
    images, words, proprio = inputs(batch=4)
    with torch.no_grad():
        logits = torch.logit(student(images, words, proprio, mode="soft").gates.double())
        student.router.out.bias.data -= logits.median(0).values.float()   # about half the rows run each layer
        alone = student(images, words, proprio, mode="hard")
    split = {"rank0": slice(0, 1), "rank1": slice(1, 4)}
    assert alone.executed[split["rank0"]].any(0).tolist() != alone.executed[split["rank1"]].any(0).tolist()
    _two_ranks_in_threads(monkeypatch)
    calls, actions = {}, {}

    def rank():
        name, rows = threading.current_thread().name, split[threading.current_thread().name]
        model = derive_student(student, router_hidden=16).eval()   # its own copy (router too), as on a process
        calls[name] = []
        for i, wrapper in enumerate(model.backbone.layers):
            wrapper.layer.register_forward_pre_hook(lambda *_, i=i: calls[name].append(i))
        with torch.no_grad():
            actions[name] = model(images[rows], words[rows], proprio[rows], mode="hard", lockstep=True).actions

    threads = [threading.Thread(target=rank, name=name) for name in split]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Every layer some row on either rank runs, called once on each rank, in the same order: ZeRO-3's gathers
    # line up. Each row's action is the one it gets alone (hard routing is per row; batch sizes differ: 1e-6).
    assert calls["rank0"] == calls["rank1"] == [i for i in range(3) if alone.executed[:, i].any()]
    torch.testing.assert_close(torch.cat([actions["rank0"], actions["rank1"]]), alone.actions, atol=1e-5, rtol=0)
