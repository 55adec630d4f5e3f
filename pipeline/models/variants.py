"""Named backbone variants (a registry: decoders, and whole vision-language models) and sizing on the meta
device: parameters and FLOPs, no memory."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.evaluate.flops import policy_flops
from pipeline.models.backbones import backbone_config
from pipeline.models.vla import VLA, VLAConfig
from pipeline.models.vlm_backbone import VLMSpec, vlm_dims

# name -> decoder dims (as in the published configs); the vision/proprio/action sizes come from data.
VARIANTS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(backbone="llama", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                      intermediate_size=11008, vocab_size=32000),
    "qwen2-1.5b": dict(backbone="qwen2", hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2,
                       intermediate_size=8960, vocab_size=151936),
    "mistral-7b": dict(backbone="mistral", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                       intermediate_size=14336, vocab_size=32000),
}


_CLIP_NORM = dict(image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711))
_SIGLIP_NORM = dict(image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

# name -> a VLM at its published size: the config.json fields that size it (values as in the Hugging Face
# checkpoints named, from their published configs; nothing is downloaded), the image tokens per frame, and the
# prompt's other tokens (approximate: BOS, newline, Idefics3's <fake_token_around_image><global-img> pair).
# Only sizing reads these: no weights, tokenizer or processor exist for them.
VLM_VARIANTS: dict[str, dict[str, Any]] = {
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (24 x 1024, 24^2 = 576 patches, CLS dropped), 2-layer
    # GELU MLP projector 1024 -> 4096 -> 4096 reading layer -2, Llama-2-7B (vocab 32064 with <image> and padding).
    "llava-7b": dict(family="llava", num_image_tokens=576, prompt_tokens=3, image_size=336, **_CLIP_NORM, config={
        "model_type": "llava", "image_token_id": 32000, "projector_hidden_act": "gelu",
        "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
                          "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
                          "projection_dim": 768},
        "text_config": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
                        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}}),
    # google/paligemma-3b-pt-224: SigLIP So400m/14 at 224 px (27 x 1152, MLP 4304, 16^2 = 256 tokens, no pooling
    # head), linear projector 1152 -> 2048, Gemma-2B (18 x 2048, 8 heads x 256, 1 KV head, MLP 16384, vocab 257216).
    "paligemma-3b": dict(family="paligemma", num_image_tokens=256, prompt_tokens=2, image_size=224, **_SIGLIP_NORM,
                         config={
        "model_type": "paligemma", "image_token_id": 257152, "projection_dim": 2048, "hidden_size": 2048,
        "vocab_size": 257216,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                          "projection_dim": 2048, "vision_use_head": False},
        "text_config": {"model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
                        "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                        "vocab_size": 257216, "max_position_embeddings": 8192}}),
    # HuggingFaceTB/SmolVLM-Instruct (Idefics3): SigLIP So400m/14 shape at 384 px (27 x 1152, 27^2 = 729 patches),
    # pixel shuffle x3 (729 -> 81 tokens, 1152 x 9 = 10368 wide) + linear -> 2048, SmolLM2-1.7B decoder (Llama:
    # 24 x 2048, 32 heads, MLP 8192, vocab 49155); image splitting off, so one 384 px frame per sample.
    "smolvlm-2b": dict(family="idefics3", num_image_tokens=81, prompt_tokens=4, image_size=384, **_SIGLIP_NORM,
                       config={
        "model_type": "idefics3", "image_token_id": 49153, "scale_factor": 3,
        "vision_config": {"model_type": "idefics3_vision", "hidden_size": 1152, "intermediate_size": 4304,
                          "num_hidden_layers": 27, "num_attention_heads": 16, "image_size": 384, "patch_size": 14},
        "text_config": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                        "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "vocab_size": 49155, "max_position_embeddings": 16384, "rope_theta": 273768.0}}),
}


def variant(name: str) -> dict[str, Any]:
    """A decoder variant's dims; an unknown name (neither a decoder nor a VLM variant) lists every choice."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; choose from {', '.join([*VARIANTS, *VLM_VARIANTS])}")
    return dict(VARIANTS[name])


def vlm_variant_config(name: str, max_instruction_tokens: int, proprio_dim: int, action_dim: int) -> VLAConfig:
    """The VLA config of a VLM variant (its spec made from the published sizes, no folder behind it)."""
    v = dict(VLM_VARIANTS[name])
    side = v.pop("image_size")
    spec = VLMSpec(uri=f"variant:{name}", processor={}, channels=3, pixel_scale=1 / 255, image_size=(side, side),
                   image_token_id=v["config"]["image_token_id"], **v)
    return VLAConfig(**vlm_dims(spec), max_instruction_tokens=max_instruction_tokens, image_size=side,
                     proprio_dim=proprio_dim, action_dim=action_dim)


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
    """Parameters (total; backbone, router, head, vision tower, projector) and FLOPs per call (the same parts) of a
    VLA, allocating no memory. Head: proprio MLP, action query and action head; vision tower: a VLM's, or our stem."""
    with torch.device("meta"):
        model = VLA(cfg)
    flops = policy_flops(cfg, float(cfg.num_layers), cfg.router_hidden)
    vision = model.vision if cfg.vlm is not None else None
    projector = float(_count(vision) - _count(vision.tower)) if vision is not None else 0.0
    out = {"params_total": float(_count(model)), "params_backbone": float(_count(model.backbone)),
           "params_router": float(_count(model.router)) if model.router is not None else 0.0,
           "params_head": float(_count(model.proprio) + _count(model.action_head) + model.action_query.numel()),
           "params_projector": projector}
    out["params_vision_tower"] = out["params_total"] - sum(
        out[k] for k in ("params_backbone", "params_router", "params_head", "params_projector"))
    out.update({f"flops_{k}": v for k, v in flops.items()})
    return out
