"""Load a Hugging Face decoder checkpoint (config.json + safetensors + tokenizer, local or s3://) into a VLA backbone.

This is how a real teacher (e.g. a 7B Llama) enters the pipeline: nothing is fetched from a hub; the
folder is read from disk or object storage. The LM head is not used (the VLA has an action head).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.data import storage
from pipeline.errors import MissingInput
from pipeline.models.action_head import TokenHead, lm_head_rows
from pipeline.models.backbones import BACKBONES, backbone_dims
from pipeline.models.tokenizer import read_tokenizer_files
from pipeline.models.vla import VLA
from pipeline.models.weights import TensorSource, assign, stream_into, targets

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_LAYER = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")


def read_hf_config(uri: str) -> dict[str, Any]:
    path = storage.join(uri, "config.json")
    if not storage.exists(path):
        raise MissingInput(f"{path} not found: {uri} is not a Hugging Face model folder "
                                f"(expected config.json and model.safetensors)")
    config = json.loads(storage.read_bytes(path))
    if config.get("model_type") not in BACKBONES:
        raise ValueError(f"{path}: model_type={config.get('model_type')!r} is not supported; "
                         f"choose a checkpoint of: {', '.join(BACKBONES)}")
    return config


def pretrained_dims(uri: str) -> dict[str, Any]:
    """The VLA config fields a pretrained backbone fixes: its sizes, its full config.json and its tokenizer."""
    config = read_hf_config(uri)
    return {**backbone_dims(config), "hf_config": config, "tokenizer": read_tokenizer_files(uri, config)}


def _shard_names(uri: str) -> list[str]:
    if storage.exists(storage.join(uri, INDEX)):
        index = json.loads(storage.read_bytes(storage.join(uri, INDEX)))
        return sorted(set(index["weight_map"].values()))
    if storage.exists(storage.join(uri, SINGLE)):
        return [SINGLE]
    raise MissingInput(f"{uri} holds neither {SINGLE} nor {INDEX}; export the model with "
                            f"save_pretrained(..., safe_serialization=True)")


def _unused(hf_key: str) -> bool:
    """Tensors a decoder checkpoint may hold that the VLA has no use for: the LM head (the VLA has an action
    head; with tied embeddings it is the embedding table again) and the rotary inverse frequencies that
    older checkpoints saved (a buffer the decoder recomputes from its config)."""
    return hf_key.startswith("lm_head.") or hf_key.endswith("rotary_emb.inv_freq")


def _our_key(hf_key: str) -> str:
    """HF decoder key -> VLA key (decoder layers sit inside the gating wrappers)."""
    match = _LAYER.match(hf_key)
    if match:
        return f"backbone.layers.{match.group(1)}.layer.{match.group(2)}"
    return "backbone." + hf_key.removeprefix("model.")


def _hf_name(our_key: str) -> str:
    """VLA key -> the name save_pretrained gives that tensor, for messages."""
    return "model." + our_key.removeprefix("backbone.").replace(".layer.", ".", 1)


def load_hf_backbone(vla: VLA, uri: str) -> dict[str, int]:
    """Copy every backbone weight from the checkpoint, one tensor at a time from the mapped safetensors shards
    (under ZeRO-3 each worker copies only its partition). A tensor that maps to nothing in the decoder, a missing
    one or a mis-shaped one is an error naming it, raised before any weight is copied: a silent mismatch would
    train a half-random teacher."""
    with TensorSource.open(uri, _shard_names(uri)) as source:
        return _load_backbone(vla, uri, source)


def _load_backbone(vla: VLA, uri: str, source: TensorSource) -> dict[str, int]:
    wanted = {k for k in targets(vla) if k.startswith("backbone.")}
    unused = sorted(k for k in source.names() if _unused(k))
    loaded = {_our_key(k): k for k in source.names() if not _unused(k)}
    unmapped = sorted(hf_key for key, hf_key in loaded.items() if key not in wanted)
    if unmapped:
        raise ValueError(f"{uri} holds {len(unmapped)} tensor(s) that map to nothing in the {vla.cfg.backbone} "
                         f"decoder: {', '.join(unmapped[:5])}; is config.json's model_type the architecture "
                         f"these weights were saved from?")
    embed = "backbone.embed_tokens.weight"
    if embed not in loaded and "lm_head.weight" in source and (vla.cfg.hf_config or {}).get("tie_word_embeddings"):
        loaded[embed] = "lm_head.weight"   # tied: saved once, under the head's name
    missing = sorted(wanted - set(loaded))
    if missing:
        names = ", ".join(_hf_name(k) for k in missing[:5])
        raise ValueError(f"{uri} lacks {len(missing)} decoder tensor(s): {names}; is it the same architecture "
                         f"and size as its config.json says?")
    stream_into(vla, source, loaded)   # a mis-shaped tensor: BadInput naming it
    if isinstance(vla.action_head, TokenHead):   # the bins start from the LM head's rows (or the tied embeddings)
        rows = source.tensor("lm_head.weight" if "lm_head.weight" in source else loaded[embed])
        assign(vla.action_head.proj.weight, lm_head_rows(vla.action_head, rows, uri))
    return {"loaded": len(loaded), "skipped": len(unused)}
