"""Analytic FLOPs per policy call (multiply-add = 2 FLOPs), split into vision, backbone, router, head.

Norms, activations, softmax and rotary embeddings are left out (<1% at these widths); what is counted
is every matrix product, so the count is linear in the number of decoder layers executed.
"""

from __future__ import annotations

from pipeline.models.vla import STEM_FIRST, STEM_WIDTH, VLAConfig


def head_dim(cfg: VLAConfig) -> int:
    """A pretrained config may set head_dim apart from hidden/heads (Gemma-7B: 16 x 256 = 4096 on a 3072-wide
    model), and the attention's width is heads x head_dim, not the hidden size."""
    return int((cfg.hf_config or {}).get("head_dim") or cfg.hidden_size // cfg.num_heads)


def decoder_layer_flops(cfg: VLAConfig) -> int:
    """One decoder layer over the full sequence: q/k/v/o projections, attention, gated MLP."""
    n, d, f = cfg.seq_len, cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * head_dim(cfg), cfg.num_kv_heads * head_dim(cfg)
    projections = 2 * n * d * (q + 2 * kv) + 2 * n * q * d    # q, k, v in; o from the heads back to d
    attention = 2 * 2 * n * n * q            # scores (QK^T) and the weighted sum (AV), over every head
    mlp = 2 * n * 3 * d * f                  # gate, up, down
    return projections + attention + mlp


def policy_flops(cfg: VLAConfig, executed_layers: float, router_hidden: int | None = None) -> dict[str, float]:
    """FLOPs of one batch-1 call running `executed_layers` decoder layers (a mean for routed students)."""
    d, p = cfg.hidden_size, cfg.patch_size
    vision = 2 * cfg.num_patches * (3 * p * p) * d
    if cfg.vision_stem == "mlp":
        # PatchMLP: 4x4 pixel patches -> 64 channels, then (p/4)^2 of those -> d per patch.
        first, width = STEM_FIRST, STEM_WIDTH
        vision = 2 * (cfg.image_size // first) ** 2 * (3 * first * first) * width \
            + 2 * cfg.num_patches * width * (p // first) ** 2 * d
    proprio = 2 * (cfg.proprio_dim * d + d * d)
    backbone = executed_layers * decoder_layer_flops(cfg)
    head = 2 * (d * d + d * cfg.action_dim)
    router = 0
    if router_hidden:
        router = 2 * (cfg.num_patches + cfg.max_instruction_tokens) * d * router_hidden
        router += 2 * 4 * router_hidden * cfg.num_layers
    total = vision + proprio + backbone + head + router
    return {"vision": float(vision), "backbone": float(backbone), "router": float(router),
            "action_head": float(head + proprio), "total": float(total)}
