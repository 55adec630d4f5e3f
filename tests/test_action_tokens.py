"""The tokens action head (OpenVLA-style): bins from the data's percentiles, clipped values counted, cross-entropy that
trains to the expert's bins, decoding to continuous actions, the bins' start from a VLM's language-model head rows,
export and reload, FLOPs, and the stage-2 objective on a tokens student."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import DistillSection, ModelSection, RouterSection
from pipeline.data.batches import Normalizer
from pipeline.data.manifest import Stats
from pipeline.distill.objective import StudentObjective
from pipeline.evaluate.flops import policy_flops
from pipeline.models.action_head import TokenHead, action_task_loss, token_range
from pipeline.models.checkpoint import PolicyCard, load_policy, save_policy
from pipeline.models.graph import ProbeSet
from pipeline.models.student import DistillModule, derive_student
from pipeline.models.tiny_vlm import DEFAULT_IMAGE_SIZE, build_tiny_vlm
from pipeline.models.vla import VLA, teacher_config
from pipeline.models.vlm_backbone import load_vlm_weights

ACTIONS = np.random.default_rng(0).normal([0.0, 1.0, -2.0, 0.5], [1.0, 0.1, 3.0, 1e-9], size=(2000, 4))
ACTIONS[:, 3] = 0.5   # a constant dimension, as an unused gripper is


def stats():
    return Stats.of(ACTIONS, "action")


def tokens_teacher(bins=32, **model):
    section = ModelSection(hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=64,
                           patch_size=8, max_instruction_tokens=6, action_head="tokens", action_bins=bins, **model)
    return VLA(teacher_config(section, [32, 32, 3], 4, 4, stats()))


def inputs(batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["push the puck", "reach the goal now", "open the drawer please", "a"]
    return (torch.rand(batch, 3, 32, 32, generator=g), [words[i % 4] for i in range(batch)],
            torch.randn(batch, 4, generator=g))


def test_the_bins_span_the_datas_1st_to_99th_percentiles_in_normalised_units():
    s = stats()
    low, high = token_range(s)
    normalizer = Normalizer.from_manifest(type("M", (), {"action_stats": s, "proprio_stats": s})())
    q01 = normalizer.norm_action(np.asarray(s.q01, dtype=np.float32))
    q99 = normalizer.norm_action(np.asarray(s.q99, dtype=np.float32))
    np.testing.assert_allclose(low[:3], q01[:3], rtol=1e-5)
    np.testing.assert_allclose(high[:3], q99[:3], rtol=1e-5)
    # The constant dimension (q01 == q99) gets a range of +-1 around its value instead of a zero-width one.
    assert high[3] - low[3] == pytest.approx(2.0)


def test_binning_round_trips_within_half_a_bin_and_counts_what_it_clips():
    head = TokenHead(8, 256, (-1.0, 0.0), (1.0, 4.0))
    inside = torch.tensor([[-0.999, 0.001], [0.0, 2.0], [0.73, 3.99], [0.999, 1.234]])
    binned = head.binned(inside)
    assert int(binned.clipped) == 0
    decoded = head.decode(F.one_hot(binned.index, 256).float())
    half_bin = torch.tensor([2.0, 4.0]) / 256 / 2
    assert ((decoded - inside).abs() <= half_bin + 1e-6).all()
    outside = torch.tensor([[-1.5, 5.0], [2.0, 1.0]])
    binned = head.binned(outside)
    assert int(binned.clipped) == 3                        # -1.5, 5.0 and 2.0 lie outside their ranges
    assert binned.index.tolist() == [[0, 255], [255, 64]]  # clipped to the edge bins; 1.0 is in range


def test_a_tokens_teacher_learns_the_experts_bins_and_decodes_continuous_actions():
    torch.manual_seed(0)
    vla = tokens_teacher(bins=32)
    x = inputs()
    low, high = vla.action_head.low, vla.action_head.high
    target = low + (high - low) * torch.rand(8, 4, generator=torch.Generator().manual_seed(2))
    optimizer = torch.optim.AdamW(vla.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        out = vla(*x)
        loss, parts = action_task_loss(vla.action_head, out.actions, out.action_logits, target)
        first = first if first is not None else float(loss.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    out = vla.eval()(*x)
    assert out.action_logits.shape == (8, 4, 32) and out.actions.shape == (8, 4)
    assert float(loss) < first / 4 and parts["clipped_action_values"] == 0
    # Decoded: the centre of the learned bin, so within one bin width of the expert's value in every dimension.
    assert ((out.actions - target).abs() <= (high - low) / 32 + 1e-5).float().mean() > 0.9


def test_a_tokens_head_needs_its_range_and_a_pretrained_vocabulary_large_enough(tmp_path):
    section = ModelSection(action_head="tokens")
    with pytest.raises(ValueError, match="action_stats"):
        teacher_config(section, [32, 32, 3], 4, 4)
    folder = build_tiny_vlm(tmp_path / "llava", "llava")
    big = ModelSection(pretrained_vlm=str(folder), action_head="tokens", action_bins=256)
    with pytest.raises(ValueError, match=r"model.action_bins=256 exceeds the vocabulary .* set model.action_bins"):
        teacher_config(big, [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3], 4, 4, stats())


def test_a_vlm_tokens_head_starts_from_its_language_model_heads_last_rows(tmp_path):
    from transformers import LlavaForConditionalGeneration

    folder = build_tiny_vlm(tmp_path / "llava", "llava")
    section = ModelSection(pretrained_vlm=str(folder), max_instruction_tokens=12, action_head="tokens",
                           action_bins=16)
    vla = VLA(teacher_config(section, [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3], 4, 4, stats()))
    load_vlm_weights(vla, str(folder))
    library = LlavaForConditionalGeneration.from_pretrained(folder)
    rows = library.lm_head.weight.detach()
    # bin b is token id vocab_size - 1 - b, as OpenVLA assigns its action bins
    assert torch.equal(vla.action_head.proj.weight[0], rows[-1])
    assert torch.equal(vla.action_head.proj.weight, rows[-16:].flip(0))


def test_a_routed_tokens_student_exports_and_reloads_to_the_same_actions(tmp_path):
    torch.manual_seed(0)
    student = derive_student(tokens_teacher().eval(), router_hidden=16).eval()
    save_policy(student, str(tmp_path), PolicyCard(normalizer=Normalizer.from_manifest(
        type("M", (), {"action_stats": stats(), "proprio_stats": stats()})()).to_dict()))
    reloaded, _ = load_policy(str(tmp_path))
    assert reloaded.cfg.action_head == "tokens" and reloaded.cfg.action_low == student.cfg.action_low
    x = inputs()
    ours, theirs = student(*x, mode="hard"), reloaded(*x, mode="hard")
    assert torch.equal(ours.actions, theirs.actions) and torch.equal(ours.executed, theirs.executed)


def test_the_tokens_heads_flops_match_torchs_flop_counter():
    vla = tokens_teacher(bins=64).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        vla(*inputs(batch=1))
    flops = policy_flops(vla.cfg, float(vla.cfg.num_layers))
    head = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name == "VLA.action_head")
    assert head == 2 * 4 * 32 * 64                 # 4 query states through the 32 -> 64-bin projection
    assert counter.get_total_flops() == flops["total"]


@pytest.mark.parametrize("objective", ["actdistill", "action_regression"])
def test_the_stage2_objective_of_a_tokens_student_trains_and_counts_clipped_values(objective):
    torch.manual_seed(0)
    teacher = tokens_teacher().eval()
    probes = ProbeSet(3, 32, 16, 16, 8, 4, 4)
    settings = DistillSection(objective=objective)
    module = StudentObjective(DistillModule(derive_student(teacher, 16), probes), RouterSection(), settings,
                              teacher=teacher, teacher_probes=ProbeSet(3, 32, 16, 16, 8, 4, 4)).train()
    images, instructions, proprio = inputs()
    actions = torch.randn(8, 4) * 3          # some values beyond the bins' range
    loss, parts, _ = module(images, instructions, proprio, actions, None, 1.0)
    loss.backward()
    low, high = teacher.action_head.low, teacher.action_head.high
    assert parts["clipped_action_values"] == float(((actions < low) | (actions > high)).sum()) > 0
    assert torch.isfinite(loss) and module.distill.student.action_head.proj.weight.grad.abs().sum() > 0
