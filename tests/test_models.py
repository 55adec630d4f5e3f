"""The routed VLA: student == teacher when forced open, gating semantics, skipped compute, export, FLOPs."""

import pytest
import torch

from pipeline.evaluate.flops import decoder_layer_flops, policy_flops
from pipeline.models.checkpoint import PolicyCard, load_policy, save_policy
from pipeline.models.graph import LayerProbe, ProbeSet
from pipeline.models.student import DistillModule, derive_student
from pipeline.models.vla import VLA, VLAConfig

NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
              "proprio_std": [1.0] * 4}


def tiny(backbone="llama", router_hidden=None, layers=3):
    return VLAConfig(backbone=backbone, hidden_size=32, num_layers=layers, num_heads=4, num_kv_heads=2,
                     intermediate_size=64, vocab_size=64, max_instruction_tokens=6, image_size=32,
                     patch_size=8, proprio_dim=4, action_dim=4, router_hidden=router_hidden)


def inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["push the puck", "reach the goal now", "open the drawer please", "a"]
    return (torch.rand(batch, 3, 32, 32, generator=g), [words[i % 4] for i in range(batch)],
            torch.randn(batch, 4, generator=g))


def record_layer_rows(model):
    """The rows each decoder-layer call receives, in call order (hooks on the layers themselves)."""
    rows = []
    for wrapper in model.backbone.layers:
        wrapper.layer.register_forward_hook(lambda _m, args, _o: rows.append(args[0].shape[0]))
    return rows


@pytest.mark.parametrize("backbone", ["llama", "qwen2", "mistral"])
def test_student_with_router_forced_open_equals_teacher(backbone):
    torch.manual_seed(0)
    teacher = VLA(tiny(backbone)).eval()
    student = derive_student(teacher, router_hidden=16).eval()
    x = inputs()
    torch.testing.assert_close(student(*x, mode="off").actions, teacher(*x).actions, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", ["llama", "qwen2", "mistral"])
def test_prepared_attention_mask_gives_the_decoders_own_outputs_bit_for_bit(backbone):
    # The VLA hands the decoder a ready 4-D mask (cheaper at batch 1); instructions of 1-4 words pad differently.
    torch.manual_seed(0)
    model = VLA(tiny(backbone)).eval()
    tokens, mask, *_ = model.embed(*inputs())
    assert (mask == 0).any()
    with torch.no_grad():
        own = model.backbone(inputs_embeds=tokens, attention_mask=mask, use_cache=False).last_hidden_state
        prepared = model.backbone(inputs_embeds=tokens, attention_mask=model._attention_mask(mask),
                                  use_cache=False).last_hidden_state
    assert torch.equal(own, prepared)


def _set_gates(model, logits):
    model.router.out.weight.data.zero_()
    model.router.out.bias.data = torch.tensor(logits, dtype=torch.float32)


def test_soft_gate_zero_is_identity_and_one_is_the_layer():
    torch.manual_seed(0)
    teacher = VLA(tiny(layers=2)).eval()
    student = derive_student(teacher, router_hidden=16).eval()
    x = inputs()
    _set_gates(student, [-1e4, 50.0])      # sigmoid: exactly 0 for layer 0, 1 for layer 1
    out = student(*x, mode="soft", record=True)
    ref = teacher(*x, record=True)
    tokens, mask, *_ = teacher.embed(*x)
    # Layer 0 left h untouched (the residual is kept, not multiplied by the gate).
    torch.testing.assert_close(out.hidden[0], tokens, atol=1e-6, rtol=0)
    # Layer 1 then ran in full on the unchanged embeddings.
    direct = teacher.backbone.layers[1].layer
    position = torch.arange(tokens.shape[1]).unsqueeze(0)
    cos_sin = teacher.backbone.rotary_emb(tokens, position_ids=position)
    from transformers.masking_utils import create_causal_mask
    causal = create_causal_mask(config=teacher.backbone.config, inputs_embeds=tokens, attention_mask=mask,
                                past_key_values=None, position_ids=position)
    expected = direct(tokens, attention_mask=causal, position_embeddings=cos_sin, position_ids=position)
    torch.testing.assert_close(out.hidden[1], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(out.hidden[1], ref.hidden[1])


def test_hard_gate_below_threshold_never_calls_the_layer():
    torch.manual_seed(0)
    student = derive_student(VLA(tiny()).eval(), router_hidden=16).eval()
    _set_gates(student, [5.0, -5.0, 5.0])
    calls = [0, 0, 0]
    for i, wrapper in enumerate(student.backbone.layers):
        wrapper.layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    out = student(*inputs(), mode="hard")
    assert calls == [1, 0, 1]
    assert out.executed.tolist() == [[1.0, 0.0, 1.0]] * 4


def test_mixed_gates_run_each_layer_only_on_its_rows_and_match_row_by_row():
    torch.manual_seed(0)
    student = derive_student(VLA(tiny()).eval(), router_hidden=16).eval()
    torch.nn.init.normal_(student.router.out.weight, std=3.0)
    x = inputs(batch=6, seed=3)
    rows_run = record_layer_rows(student)
    out = student(*x, mode="hard")
    executed = out.executed
    assert 0 < executed.sum() < executed.numel(), "the test needs a batch with mixed gates"
    assert rows_run == [int(n) for n in executed.sum(0).tolist() if n > 0]
    for b in range(6):
        single = student(x[0][b:b + 1], x[1][b:b + 1], x[2][b:b + 1], mode="hard")
        torch.testing.assert_close(single.actions[0], out.actions[b], atol=1e-5, rtol=0)
        assert single.executed[0].tolist() == executed[b].tolist()


def test_top_k_student_runs_exactly_its_k_largest_gates_per_call_and_the_input_picks_which(tmp_path):
    torch.manual_seed(0)
    teacher = VLA(tiny(layers=8)).eval()
    student = derive_student(teacher, router_hidden=16, keep=3).eval()
    x = inputs(batch=8, seed=5)
    # A trained router's gates vary with the input: random weights, each layer's logit centred over this batch.
    torch.nn.init.normal_(student.router.out.weight, std=3.0)
    features = []
    hook = student.router.out.register_forward_hook(lambda _m, args, _o: features.append(args[0]))
    student(*x, mode="hard")
    hook.remove()
    with torch.no_grad():
        student.router.out.bias.copy_(-(features[0] @ student.router.out.weight.T).mean(0))
    rows_run = record_layer_rows(student)
    out = student(*x, mode="hard")
    assert out.executed.sum(1).tolist() == [3.0] * 8
    assert len({tuple(row) for row in out.executed.tolist()}) > 1, "the inputs should pick different layers"
    assert ((out.gates >= 0.5).sum(1) != 3).any(), "a threshold would run another count on some rows"
    third = out.gates.sort(dim=1, descending=True).values[:, 2:3]
    assert torch.equal(out.executed.bool(), out.gates >= third)            # the 3 largest gates of each row
    assert rows_run == [int(n) for n in out.executed.sum(0).tolist() if n > 0]   # each layer only on its rows
    for b in range(8):   # batched calls are row-by-row calls
        single = student(x[0][b:b + 1], x[1][b:b + 1], x[2][b:b + 1], mode="hard")
        torch.testing.assert_close(single.actions[0], out.actions[b], atol=1e-5, rtol=0)
    # Training is the threshold router's: soft gates, the same values.
    torch.testing.assert_close(student(*x, mode="soft").gates, out.gates, atol=0, rtol=0)
    # Saved and loaded, it keeps its k: the same layers and actions.
    uri = str(tmp_path / "topk")
    save_policy(student, uri, PolicyCard(normalizer=NORMALIZER, teacher_hash="t", threshold=0.5))
    loaded, _ = load_policy(uri)
    again = loaded.eval()(*x, mode="hard")
    assert loaded.cfg.router_keep == 3
    assert torch.equal(again.executed, out.executed)
    torch.testing.assert_close(again.actions, out.actions, atol=0, rtol=0)


def test_top_k_student_keeps_k_even_where_gates_tie():
    torch.manual_seed(0)
    student = derive_student(VLA(tiny(layers=4)).eval(), router_hidden=16, keep=2).eval()
    _set_gates(student, [1.0, 1.0, 1.0, 1.0])   # every gate the same value
    assert student(*inputs(), mode="hard").executed.sum(1).tolist() == [2.0] * 4
    _set_gates(student, [-9.0, -9.0, -9.0, -9.0])   # every gate far below the threshold: still 2 layers
    assert student(*inputs(), mode="hard").executed.sum(1).tolist() == [2.0] * 4


def test_export_holds_no_probe_weights_and_reloads_to_the_same_actions(tmp_path):
    torch.manual_seed(0)
    student = derive_student(VLA(tiny()).eval(), router_hidden=16)
    probes = ProbeSet(3, 32, 16, 8, 4, 4, 4)
    module = DistillModule(student, probes)
    assert any(k.startswith("probes.") for k in module.state_dict())
    save_policy(module.student, str(tmp_path), PolicyCard(normalizer=NORMALIZER))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    # Exactly the student's own weights (router included); none of the training-only probes.
    assert set(keys) == set(student.state_dict())
    assert any(k.startswith("router.") for k in keys)
    assert not any(k.startswith(("probes", "phi", "psi", "readout", "pool_query")) for k in keys)
    reloaded, _ = load_policy(str(tmp_path))
    x = inputs()
    torch.testing.assert_close(reloaded(*x, mode="hard").actions, student.eval()(*x, mode="hard").actions)


def test_probe_is_finite_at_7b_width_with_large_hidden_values_and_masks_padding():
    torch.manual_seed(0)
    probe = LayerProbe(d_model=4096, width=64, semantic_dim=16, top_k=8, heads=4, action_dim=7)
    hidden = torch.randn(2, 20, 4096) * 30.0
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 12:] = 0
    s, a = probe(hidden, mask)
    assert torch.isfinite(s).all() and torch.isfinite(a).all() and a.shape == (2, 7)
    # Padding is invisible: changing padded tokens does not change row 1's outputs.
    hidden2 = hidden.clone()
    hidden2[1, 12:] = torch.randn(8, 4096) * 30.0
    s2, _ = probe(hidden2, mask)
    torch.testing.assert_close(s2[1], s[1], atol=1e-4, rtol=1e-4)


def counted_flops(model, **kwargs):
    """What torch's FlopCounterMode counts for one batch-1 call. Attention runs on sdpa's math kernel: CPU's
    fused kernel (_scaled_dot_product_flash_attention_for_cpu) has no flop formula and would count 0, while
    the math kernel is two batched matmuls (QK^T and AV) over the full N x N, the causal mask skipping none:
    4 N^2 d per layer, as decoder_layer_flops counts it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        out = model(*inputs(batch=1), **kwargs)
    return counter, out


def test_flops_are_linear_in_executed_layers_and_match_torchs_flop_counter():
    teacher = VLA(tiny(layers=3)).eval()
    counter, _ = counted_flops(teacher)
    # One decoder layer: torch counts its projections and MLP (mm) and its attention (bmm).
    assert sum(counter.get_flop_counts()["VLA.backbone.layers.0"].values()) == decoder_layer_flops(teacher.cfg)
    assert counter.get_total_flops() == policy_flops(teacher.cfg, 3.0)["total"]
    static = derive_student(teacher, router_hidden=16, static_layers=(0, 2)).eval()
    counter, _ = counted_flops(static, mode="hard")
    assert counter.get_total_flops() == policy_flops(static.cfg, 2.0)["total"]
    routed = derive_student(teacher, router_hidden=16).eval()
    torch.nn.init.normal_(routed.router.out.weight, std=3.0)
    counter, out = counted_flops(routed, mode="hard")
    executed = float(out.executed.sum())
    assert 0 < executed < 3, "the test needs a call that skips some layers"
    assert counter.get_total_flops() == policy_flops(routed.cfg, executed, 16)["total"]
    # Norms, activations and softmax are the part neither side counts; the rest is linear in the layers run.
    assert policy_flops(teacher.cfg, 3.0)["total"] - policy_flops(teacher.cfg, 1.5)["total"] == \
        pytest.approx(1.5 * decoder_layer_flops(teacher.cfg))


def test_flops_count_attention_at_heads_times_head_dim_when_a_pretrained_config_sets_it():
    # Gemma-7B-like: head_dim x heads (4 x 16 = 64) is twice the hidden size (32).
    base = tiny(backbone="gemma", layers=2)
    hf = {"model_type": "gemma", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 64, "head_dim": 16}
    teacher = VLA(base.model_copy(update={"hf_config": hf})).eval()
    counter, _ = counted_flops(teacher)
    assert sum(counter.get_flop_counts()["VLA.backbone.layers.0"].values()) == decoder_layer_flops(teacher.cfg)
    assert decoder_layer_flops(teacher.cfg) > decoder_layer_flops(base)


def test_mlp_stem_is_two_strided_convs_with_a_gelu_and_its_flops_are_counted_exactly():
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.vla import PatchMLP

    stem = PatchMLP(d=32, patch_size=16)
    images = torch.rand(2, 3, 64, 64)
    conv1 = torch.nn.Conv2d(3, 64, 4, stride=4)
    conv2 = torch.nn.Conv2d(64, 32, 4, stride=4)
    with torch.no_grad():   # the same weights, laid out as conv kernels (channels-major patches)
        conv1.weight.copy_(stem.stage1.weight.view(64, 3, 4, 4))
        conv1.bias.copy_(stem.stage1.bias)
        conv2.weight.copy_(stem.stage2.weight.view(32, 64, 4, 4))
        conv2.bias.copy_(stem.stage2.bias)
        torch.testing.assert_close(stem(images), conv2(torch.nn.functional.gelu(conv1(images))),
                                   atol=1e-5, rtol=1e-5)
    cfg = tiny().model_copy(update={"image_size": 64, "patch_size": 16, "vision_stem": "mlp"})
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        VLA(cfg).patch(images[:1])
    assert policy_flops(cfg, 0.0)["vision"] == counter.get_total_flops()
    with pytest.raises(ValueError, match="patch_size divisible by 4"):
        PatchMLP(d=32, patch_size=6)


def test_static_layers_run_exactly_those_layers_for_every_row_and_cost_no_router_flops():
    teacher = VLA(tiny(layers=4)).eval()
    student = derive_student(teacher, router_hidden=16, static_layers=(1, 3)).eval()
    assert student.cfg.router_hidden is None and student.cfg.static_layers == (1, 3)
    rows_run = record_layer_rows(student)
    with torch.no_grad():
        out = student(*inputs(batch=5), mode="hard")
    assert out.executed.tolist() == [[0.0, 1.0, 0.0, 1.0]] * 5
    assert rows_run == [5, 5]             # two layer calls, each on the whole batch
    flops = policy_flops(student.cfg, 2.0, student.cfg.router_hidden)
    assert flops["router"] == 0.0 and flops["backbone"] == 2 * decoder_layer_flops(student.cfg)
