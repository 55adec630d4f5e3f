"""Policy and probe checkpoints: safetensors weights + config.json, local folder or s3:// URI."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import save_file
from torch import nn

from pipeline.data import storage
from pipeline.data.batches import Normalizer
from pipeline.data.manifest import Manifest
from pipeline.errors import BadInput, MissingInput, StaleInput
from pipeline.models.graph import ProbeSet
from pipeline.models.vla import VLA, VLAConfig
from pipeline.models.weights import MappedSafetensors, TensorSource, file_hash, local_copy, stream_into, targets

WEIGHTS, CONFIG, PROBES, PROBES_CONFIG = "model.safetensors", "config.json", "probes.safetensors", "probes.json"


class PolicyCard(BaseModel):
    """A policy folder's config.json beside its weights: the architecture, the weights' hash, and where the
    policy came from (data, teacher, config). Keys this model does not name are kept as they are."""

    model_config = ConfigDict(extra="allow", frozen=True)

    normalizer: dict[str, list[float]]     # action/proprio mean and std of the training data
    vla: dict[str, Any] | None = None      # VLAConfig; written by save_state
    weights_sha256_16: str | None = None   # the weights' identity (labels and probes are keyed by it)
    role: Literal["teacher", "student"] | None = None
    data_content_hash: str | None = None   # the shards' manifest hash it was trained on
    instructions: dict[str, str] | None = None
    config_digest: str | None = None       # of the whole pipeline config that made it
    teacher_hash: str | None = None        # student: the teacher it was derived from
    router_budget: float | None = None     # student: router.budget it was trained for
    threshold: float | None = None         # student: the inference gate threshold

    @classmethod
    def for_teacher(cls, manifest: Manifest, config_digest: str) -> PolicyCard:
        return cls(role="teacher", normalizer=Normalizer.from_manifest(manifest).to_dict(),
                   data_content_hash=manifest.content_hash, instructions=manifest.instructions,
                   config_digest=config_digest)

    @property
    def hash(self) -> str:
        if self.weights_sha256_16 is None:
            raise ValueError("this policy card was never saved with weights; it has no hash")
        return self.weights_sha256_16

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def write_safetensors(state: dict[str, torch.Tensor], uri: str) -> str:
    """Write `state` as a safetensors file at `uri` (local or s3://) straight from the tensors' memory, and return
    its hash. Serialising to bytes first (safetensors.torch.save) held a second copy of every weight: +2 GB on
    the exporting rank at 2 layers of 7B width, +13 GB at 7B in bf16."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}   # no copy for CPU tensors
    if not storage.is_s3(uri):
        path = Path(storage.resolve(uri)[1])
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path)
        return file_hash(path)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.safetensors"
        save_file(tensors, path)
        digest = file_hash(path)
        storage.upload_file(path, uri)
    return digest


def save_state(state: dict[str, torch.Tensor], vla: VLAConfig, uri: str, card: PolicyCard) -> str:
    """Write weights and config; returns the weights hash (the teacher identity used by the cache)."""
    digest = write_safetensors(state, storage.join(uri, WEIGHTS))
    config = card.model_copy(update={"vla": vla.model_dump(), "weights_sha256_16": digest}).to_json()
    storage.write_bytes(storage.join(uri, CONFIG), json.dumps(config, indent=2).encode())
    return digest


def save_policy(model: VLA, uri: str, card: PolicyCard) -> str:
    return save_state(model.state_dict(), model.cfg, uri, card)


def read_policy_config(uri: str) -> PolicyCard:
    path = storage.join(uri, CONFIG)
    if not storage.exists(path):
        raise MissingInput(f"{path} not found: {uri} is not a policy checkpoint "
                                f"(expected {CONFIG} and {WEIGHTS}); run the stage that writes it first")
    return PolicyCard.model_validate_json(storage.read_bytes(path))


def policy_weights(uri: str, card: PolicyCard | None = None) -> TensorSource:
    """The policy folder's weights, memory-mapped (an s3:// file copied once to the node), after checking their
    hash against config.json: a folder mixing two checkpoints is refused before any weight is used."""
    card = card or read_policy_config(uri)
    path = local_copy(storage.join(uri, WEIGHTS))
    digest = file_hash(path)
    if digest != card.weights_sha256_16 and storage.is_s3(uri):   # a cached copy older than the object: fetch again
        path = local_copy(storage.join(uri, WEIGHTS), refresh=True)
        digest = file_hash(path)
    if digest != card.weights_sha256_16 or card.vla is None:
        raise StaleInput(f"{storage.join(uri, WEIGHTS)} has hash {digest} but {CONFIG} records "
                         f"{card.weights_sha256_16}: the folder mixes two checkpoints; re-export it")
    return TensorSource([MappedSafetensors(path)], uri)


def load_exactly(module: nn.Module, source: TensorSource, allowed_missing: str | None = None) -> int:
    """Every weight of `module` from `source`, by name, streamed tensor by tensor (ZeRO-3 partitions too). A tensor
    of the file the module has no place for, or a weight the file lacks (other than under `allowed_missing.`,
    e.g. a student's fresh router), is an error naming them."""
    own = set(targets(module))
    unexpected = sorted(set(source.names()) - own)
    missing = sorted(k for k in own - set(source.names())
                     if allowed_missing is None or not k.startswith(allowed_missing + "."))
    if unexpected or missing:
        raise BadInput(f"{source.where}: the weights do not fit the model built from its config: "
                       f"{len(missing)} missing ({', '.join(missing[:5])}), {len(unexpected)} unexpected "
                       f"({', '.join(unexpected[:5])}); re-export the checkpoint")
    return stream_into(module, source, {k: k for k in own if k in source})


def load_policy(uri: str) -> tuple[VLA, PolicyCard]:
    """Rebuild a VLA from a checkpoint folder; the weights' hash is checked against config.json, and the
    weights are copied straight from the mapped file (host RAM: the model, not the model and its file)."""
    card = read_policy_config(uri)
    model = VLA(VLAConfig(**card.vla))
    with policy_weights(uri, card) as weights:
        load_exactly(model, weights)
    return model.eval(), card


def policy_hash(uri: str) -> str:
    return read_policy_config(uri).hash


def save_probes(probes: ProbeSet, uri: str, meta: dict[str, Any]) -> None:
    write_safetensors(probes.state_dict(), storage.join(uri, PROBES))
    storage.write_bytes(storage.join(uri, PROBES_CONFIG), json.dumps({"dims": probes.dims, **meta}).encode())


def read_probes_config(uri: str) -> dict[str, Any]:
    """probes.json: the probe dims and the hash of the teacher they were trained on."""
    path = storage.join(uri, PROBES_CONFIG)
    if not storage.exists(path):
        raise MissingInput(f"{path} not found; run `actdistill probe-teacher` first")
    return json.loads(storage.read_bytes(path))


def probe_weights(uri: str) -> TensorSource:
    return TensorSource.open(uri, [PROBES])


def load_probes(uri: str) -> tuple[ProbeSet, dict[str, Any]]:
    meta = read_probes_config(uri)
    probes = ProbeSet(**meta["dims"])
    with probe_weights(uri) as weights:
        load_exactly(probes, weights)
    return probes, meta
