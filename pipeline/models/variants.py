"""Named backbone variants (a registry) and sizing on the meta device: parameters and FLOPs, no memory."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.evaluate.flops import policy_flops
from pipeline.models.backbones import backbone_config
from pipeline.models.vla import VLA, VLAConfig

# name -> decoder dims (as in the published configs); the vision/proprio/action sizes come from data.
VARIANTS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(backbone="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "qwen2-1.5b": dict(backbone="qwen2", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                       intermediate_size=8960, vocab_size=151936),
    "mistral-7b": dict(backbone="mistral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, vocab_size=32000),
}


def variant(name: str) -> dict[str, Any]:
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return dict(VARIANTS[name])


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def hf_checkpoint_params(name: str) -> int:
    """Parameters of the published causal-LM checkpoint (LM head included), built on the meta device."""
    dims = variant(name)
    family = dims.pop("backbone")
    config = backbone_config(family, max_positions=4096, **{k: dims[k] for k in (
        "hidden_size", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")},
        num_layers=dims["num_layers"])
    causal_lm = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}[family]
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, causal_lm)(config)
    return _count(model)


def size_on_meta(cfg: VLAConfig) -> dict[str, float]:
    """Parameters (total, backbone, router) and FLOPs per call of a VLA, allocating no memory."""
    with torch.device("meta"):
        model = VLA(cfg)
    flops = policy_flops(cfg, float(cfg.num_layers), cfg.router_hidden)
    out = {"params_total": float(_count(model)), "params_backbone": float(_count(model.backbone)),
           "params_router": float(_count(model.router)) if model.router is not None else 0.0}
    out.update({f"flops_{k}": v for k, v in flops.items()})
    return out
