"""Registry of Hugging Face decoder backbones a VLA can be built on (built from config, never downloaded)."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (LlamaConfig, LlamaModel, MistralConfig, MistralModel, PretrainedConfig,
                          Qwen2Config, Qwen2Model)

# name -> (config class, model class). Any decoder whose model exposes `.layers` (a ModuleList of
# decoder layers) and `.embed_tokens` and accepts `inputs_embeds` can be added here.
BACKBONES: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "llama": (LlamaConfig, LlamaModel),
    "qwen2": (Qwen2Config, Qwen2Model),
    "mistral": (MistralConfig, MistralModel),
}


def backbone_config(name: str, *, hidden_size: int, num_layers: int, num_heads: int,
                    num_kv_heads: int, intermediate_size: int, vocab_size: int,
                    max_positions: int = 512) -> PretrainedConfig:
    """A decoder config of the named family; an unknown name lists the choices."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    config_cls, _ = BACKBONES[name]
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False, use_cache=False, attention_dropout=0.0,
    )
    config = config_cls(**kwargs)
    # sdpa on CPU matches eager to ~1e-7 and is faster; dropout 0 keeps teacher probing exact.
    config._attn_implementation = "sdpa"
    return config


def build_backbone(name: str, config: PretrainedConfig) -> nn.Module:
    """Instantiate the decoder (random weights; checkpoints are loaded afterwards)."""
    _, model_cls = BACKBONES[name]
    model = model_cls(config)
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise TypeError(f"backbone {name!r} does not expose its decoder layers as `.layers`")
    return model
