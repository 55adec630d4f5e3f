"""Analytic FLOPs per policy call (multiply-add = 2 FLOPs), split into vision (a VLM's: tower and projector),
backbone, router, head.

Norms, activations, softmax and rotary embeddings are left out (<1% at these widths); what is counted
is every matrix product, so the count is linear in the number of decoder layers executed.
"""

from __future__ import annotations

from typing import Any

from pipeline.models.vla import STEM_FIRST, STEM_WIDTH, VLAConfig
from pipeline.models.vlm_backbone import VLMSpec, hf_config


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


def vit_flops(vision: Any, height: int, width: int) -> int:
    """A CLIP / SigLIP / Idefics3 vision tower over one frame: patch embedding (a p x p strided conv), then every
    encoder layer (q, k, v, o; attention over all tokens; a 2-matrix MLP) over the patch tokens (+ CLIP's class
    token), and SigLIP's attention-pooling head where the config keeps it. All layers run, whichever hidden state
    the projector reads (LLaVA's -2 included)."""
    d, f, p, c = vision.hidden_size, vision.intermediate_size, vision.patch_size, vision.num_channels
    patches = (height // p) * (width // p)
    n = patches + (1 if vision.model_type == "clip_vision_model" else 0)
    layer = 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * f
    out = 2 * patches * c * p * p * d + vision.num_hidden_layers * layer
    if getattr(vision, "vision_use_head", False):   # one probe query: q and o on 1 token, k and v on n, its MLP
        out += 2 * 2 * d * d + 2 * n * 2 * d * d + 2 * 2 * n * d + 2 * 2 * d * f
    return out


def projector_flops(spec: VLMSpec) -> int:
    """The projector over one frame's image features (spec.num_image_tokens of them, in the decoder's width):
    LLaVA's 2-layer MLP, PaliGemma's linear, Idefics3/SmolVLM's pixel shuffle (a reshape: s^2 patches -> one token
    s^2 times wider) + linear."""
    config = hf_config(spec)
    dv, dt, m = config.vision_config.hidden_size, config.get_text_config().hidden_size, spec.num_image_tokens
    if spec.family == "llava":
        layers = config.vision_feature_layer
        width = dv * (1 if isinstance(layers, int) else len(layers))
        return 2 * m * (width * dt + dt * dt)
    if spec.family == "paligemma":
        return 2 * m * dv * config.vision_config.projection_dim
    return 2 * m * dv * config.scale_factor ** 2 * dt     # idefics3, smolvlm


def vlm_vision_flops(spec: VLMSpec) -> tuple[int, int]:
    """(vision tower, projector) FLOPs of one frame through a VLM's image path."""
    return vit_flops(hf_config(spec).vision_config, *spec.image_size), projector_flops(spec)


def stem_flops(cfg: VLAConfig) -> int:
    """Our own vision stem over one frame: a p x p patch conv, or PatchMLP's two patchify stages."""
    d, p = cfg.hidden_size, cfg.patch_size
    if cfg.vision_stem == "mlp":
        # PatchMLP: 4x4 pixel patches -> 64 channels, then (p/4)^2 of those -> d per patch.
        first, width = STEM_FIRST, STEM_WIDTH
        return 2 * (cfg.image_size // first) ** 2 * (3 * first * first) * width \
            + 2 * cfg.num_patches * width * (p // first) ** 2 * d
    return 2 * cfg.num_patches * (3 * p * p) * d


def policy_flops(cfg: VLAConfig, executed_layers: float, router_hidden: int | None = None) -> dict[str, float]:
    """FLOPs of one batch-1 call running `executed_layers` decoder layers (a mean for routed students).

    vision = vision_tower + projector (our stem: projector 0); backbone: the decoder layers run."""
    d = cfg.hidden_size
    tower, projector = vlm_vision_flops(cfg.vlm) if cfg.vlm is not None else (stem_flops(cfg), 0)
    vision = tower + projector
    proprio = 2 * (cfg.proprio_dim * d + d * d)
    backbone = executed_layers * decoder_layer_flops(cfg)
    # regression: d -> d -> A on the last token; tokens: A query states, each through the d -> bins projection.
    head = (2 * cfg.action_dim * d * cfg.action_bins if cfg.action_head == "tokens"
            else 2 * (d * d + d * cfg.action_dim))
    router = 0
    if router_hidden:
        # the instruction (a VLM: its whole prompt but the image): all but the image, proprio and action queries
        text_tokens = cfg.seq_len - cfg.num_patches - 1 - cfg.action_queries
        router = 2 * (cfg.num_patches + text_tokens) * d * router_hidden
        router += 2 * 4 * router_hidden * cfg.num_layers
    total = vision + proprio + backbone + head + router
    return {"vision": float(vision), "backbone": float(backbone), "router": float(router),
            "action_head": float(head + proprio), "total": float(total),
            "vision_tower": float(tower), "projector": float(projector)}
