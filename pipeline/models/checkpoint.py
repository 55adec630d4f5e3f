"""Policy and probe checkpoints: safetensors weights + config.json, local folder or s3:// URI."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from safetensors.torch import load, save

from pipeline.data import storage
from pipeline.models.graph import ProbeSet
from pipeline.models.vla import VLA, VLAConfig

WEIGHTS, CONFIG, PROBES, PROBES_CONFIG = "model.safetensors", "config.json", "probes.safetensors", "probes.json"


def _to_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def weights_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def save_state(state: dict[str, torch.Tensor], vla: VLAConfig, uri: str, meta: dict[str, Any]) -> str:
    """Write weights and config; returns the weights hash (the teacher identity used by the cache)."""
    data = _to_bytes(state)
    digest = weights_hash(data)
    config = {"vla": vla.model_dump(), "weights_sha256_16": digest, **meta}
    storage.write_bytes(storage.join(uri, WEIGHTS), data)
    storage.write_bytes(storage.join(uri, CONFIG), json.dumps(config, indent=2).encode())
    return digest


def save_policy(model: VLA, uri: str, meta: dict[str, Any]) -> str:
    return save_state(model.state_dict(), model.cfg, uri, meta)


def read_policy_config(uri: str) -> dict[str, Any]:
    path = storage.join(uri, CONFIG)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found: {uri} is not a policy checkpoint "
                                f"(expected {CONFIG} and {WEIGHTS}); run the stage that writes it first")
    return json.loads(storage.read_bytes(path))


def load_policy(uri: str) -> tuple[VLA, dict[str, Any]]:
    """Rebuild a VLA from a checkpoint folder; the weights' hash is checked against config.json."""
    config = read_policy_config(uri)
    data = storage.read_bytes(storage.join(uri, WEIGHTS))
    digest = weights_hash(data)
    if digest != config["weights_sha256_16"]:
        raise ValueError(f"{storage.join(uri, WEIGHTS)} has hash {digest} but {CONFIG} records "
                         f"{config['weights_sha256_16']}: the folder mixes two checkpoints; re-export it")
    model = VLA(VLAConfig(**config["vla"]))
    model.load_state_dict(load(data), strict=True)
    return model.eval(), config


def policy_hash(uri: str) -> str:
    return str(read_policy_config(uri)["weights_sha256_16"])


def save_probes(probes: ProbeSet, uri: str, meta: dict[str, Any]) -> None:
    storage.write_bytes(storage.join(uri, PROBES), _to_bytes(probes.state_dict()))
    storage.write_bytes(storage.join(uri, PROBES_CONFIG), json.dumps({"dims": probes.dims, **meta}).encode())


def read_probes_config(uri: str) -> dict[str, Any]:
    """probes.json: the probe dims and the hash of the teacher they were trained on."""
    path = storage.join(uri, PROBES_CONFIG)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} not found; run `actdistill probe-teacher` first")
    return json.loads(storage.read_bytes(path))


def load_probes(uri: str) -> tuple[ProbeSet, dict[str, Any]]:
    meta = read_probes_config(uri)
    probes = ProbeSet(**meta["dims"])
    probes.load_state_dict(load(storage.read_bytes(storage.join(uri, PROBES))), strict=True)
    return probes, meta
