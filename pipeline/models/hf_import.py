"""Load a Hugging Face decoder checkpoint (config.json + safetensors, local or s3://) into a VLA backbone.

This is how a real teacher (e.g. a 7B Llama) enters the pipeline: nothing is fetched from a hub; the
folder is read from disk or object storage. The LM head is not used (the VLA has an action head).
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch
from safetensors.torch import load

from pipeline.data import storage
from pipeline.models.backbones import BACKBONES
from pipeline.models.vla import VLA

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


def read_hf_config(uri: str) -> dict[str, Any]:
    path = storage.join(uri, "config.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: {uri} is not a Hugging Face model folder "
                                f"(expected config.json and model.safetensors)")
    config = json.loads(storage.read_bytes(path))
    if config.get("model_type") not in BACKBONES:
        raise ValueError(f"{path}: model_type={config.get('model_type')!r} is not supported; "
                         f"choose a checkpoint of: {', '.join(BACKBONES)}")
    return config


def backbone_dims(config: dict[str, Any]) -> dict[str, Any]:
    """The model-section values a VLA needs to host this backbone."""
    return {"backbone": config["model_type"], "hidden_size": config["hidden_size"],
            "num_layers": config["num_hidden_layers"], "num_heads": config["num_attention_heads"],
            "num_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "intermediate_size": config["intermediate_size"], "vocab_size": config["vocab_size"]}


def _shard_names(uri: str) -> list[str]:
    if storage.exists(storage.join(uri, INDEX)):
        index = json.loads(storage.read_bytes(storage.join(uri, INDEX)))
        return sorted(set(index["weight_map"].values()))
    if storage.exists(storage.join(uri, SINGLE)):
        return [SINGLE]
    raise FileNotFoundError(f"{uri} holds neither {SINGLE} nor {INDEX}; export the model with "
                            f"save_pretrained(..., safe_serialization=True)")


def _our_key(hf_key: str) -> str | None:
    """HF decoder key -> VLA key (decoder layers sit inside the gating wrappers); None for the LM head."""
    if hf_key.startswith("lm_head."):
        return None
    match = _LAYER.match(hf_key)
    if match:
        return f"backbone.layers.{match.group(1)}.layer.{match.group(2)}"
    return "backbone." + hf_key.removeprefix("model.")


def load_hf_backbone(vla: VLA, uri: str) -> dict[str, int]:
    """Copy every backbone weight from the checkpoint; a missing or mis-shaped tensor is an error."""
    own = vla.state_dict()
    wanted = {k for k in own if k.startswith("backbone.")}
    loaded: dict[str, torch.Tensor] = {}
    skipped = 0
    for name in _shard_names(uri):
        for hf_key, tensor in load(storage.read_bytes(storage.join(uri, name))).items():
            key = _our_key(hf_key)
            if key is None or key not in wanted:
                skipped += 1
                continue
            if tensor.shape != own[key].shape:
                raise ValueError(f"{uri}: {hf_key} has shape {tuple(tensor.shape)} but the VLA expects "
                                 f"{tuple(own[key].shape)}; set the model section from this config.json")
            loaded[key] = tensor
    missing = sorted(wanted - set(loaded))
    if missing:
        raise ValueError(f"{uri} lacks {len(missing)} backbone tensor(s), e.g. {missing[:3]}; is it the "
                         f"same architecture as model.backbone?")
    vla.load_state_dict(loaded, strict=False)
    return {"loaded": len(loaded), "skipped": skipped}
