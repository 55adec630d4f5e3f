"""Registry of Hugging Face decoder backbones a VLA can be built on (built from config, never downloaded)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers import (
    GemmaConfig,
    GemmaModel,
    LlamaConfig,
    LlamaModel,
    MistralConfig,
    MistralModel,
    PretrainedConfig,
    Qwen2Config,
    Qwen2Model,
)
from transformers.modeling_utils import PreTrainedModel

# name (the config.json model_type) -> (config class, model class). Any decoder whose model exposes `.layers`
# (a ModuleList of decoder layers) and `.embed_tokens` and accepts `inputs_embeds` can be added here; the
# Literal of pipeline/config.py ModelSection.backbone lists the same names (tests/test_pretrained_backbones.py
# checks they agree).
BACKBONES: dict[str, tuple[type[PretrainedConfig], type[nn.Module]]] = {
    "llama": (LlamaConfig, LlamaModel),
    "qwen2": (Qwen2Config, Qwen2Model),
    "mistral": (MistralConfig, MistralModel),
    "gemma": (GemmaConfig, GemmaModel),
}


def _family(name: str) -> tuple[type[PretrainedConfig], type[nn.Module]]:
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; choose from {', '.join(BACKBONES)}")
    return BACKBONES[name]


def _for_the_vla(config: PretrainedConfig) -> PretrainedConfig:
    """What the VLA must override in any decoder config: no KV cache (one pass per action), no dropout (keeps
    teacher probing exact), sdpa attention (on CPU it matches eager to ~1e-7 and is faster)."""
    config.use_cache = False
    config.attention_dropout = 0.0
    config._attn_implementation = "sdpa"
    return config


def backbone_config(name: str, *, hidden_size: int, num_layers: int, num_heads: int,
                    num_kv_heads: int, intermediate_size: int, vocab_size: int,
                    max_positions: int = 512) -> PretrainedConfig:
    """A from-scratch decoder config of the named family with our defaults; an unknown name lists the choices."""
    config_cls, _ = _family(name)
    kwargs: dict[str, Any] = dict(
        hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size, vocab_size=vocab_size,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False, use_cache=False, attention_dropout=0.0,
    )
    return _for_the_vla(config_cls(**kwargs))


def pretrained_config(hf_config: dict[str, Any], seq_len: int) -> PretrainedConfig:
    """A pretrained decoder's config exactly as its config.json says (norm eps, rope theta and scaling,
    attention bias, head_dim, sliding window, tied embeddings...): `from_dict` is what `from_pretrained`
    applies to that file, so legacy names (rope_theta, rope_scaling) become rope_parameters the same way.
    Only the VLA's own needs are overridden (see _for_the_vla) and the context is stretched if the VLA's
    sequence is longer than the pretrained one."""
    config_cls, _ = _family(str(hf_config.get("model_type")))
    config = _for_the_vla(config_cls.from_dict(dict(hf_config)))
    if (config.max_position_embeddings or 0) < seq_len:
        config.max_position_embeddings = seq_len
    return config


def backbone_dims(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The VLA config's decoder sizes as a Hugging Face config.json states them."""
    return {"backbone": hf_config.get("model_type"), "hidden_size": hf_config["hidden_size"],
            "num_layers": hf_config["num_hidden_layers"], "num_heads": hf_config["num_attention_heads"],
            "num_kv_heads": hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"],
            "intermediate_size": hf_config["intermediate_size"], "vocab_size": hf_config["vocab_size"]}


@contextmanager
def _init_deferred_under_zero3() -> Iterator[None]:
    """Inside deepspeed.zero.Init each submodule is partitioned as soon as it is built, so the Hugging Face weight
    init that runs at the end of the decoder's constructor sees empty partitions (and fails on the padding row).
    There it is skipped, as from_config does under ZeRO-3, and run afterwards on gathered parameters
    (pipeline.train.engine.init_fresh_decoder) unless a file fills the decoder. Elsewhere: nothing changes."""
    partitioning = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    if partitioning is None or not partitioning.zero_init_context:
        yield
        return
    original = PreTrainedModel.init_weights
    PreTrainedModel.init_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.init_weights = original


def build_backbone(name: str, config: PretrainedConfig) -> nn.Module:
    """Instantiate the decoder (random weights; checkpoints are loaded afterwards)."""
    _, model_cls = _family(name)
    with _init_deferred_under_zero3():
        model = model_cls(config)
    if not isinstance(getattr(model, "layers", None), nn.ModuleList):
        raise TypeError(f"backbone {name!r} does not expose its decoder layers as `.layers`")
    return model
