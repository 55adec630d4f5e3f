"""Normalisation from manifest statistics, and Ray Data numpy batches turned into model tensors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from pipeline.data.manifest import Manifest

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def _like(stat: np.ndarray, x: ArrayT) -> ArrayT:
    """A statistic in the same library, dtype and device as x, so the maths broadcasts."""
    if isinstance(x, torch.Tensor):
        return torch.as_tensor(stat, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    return stat.astype(x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32)


@dataclass(frozen=True)
class Normalizer:
    """Mean/std normalisation of actions and proprioception; saved inside checkpoints as JSON."""

    action_mean: np.ndarray
    action_std: np.ndarray
    proprio_mean: np.ndarray
    proprio_std: np.ndarray

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Normalizer:
        a, p = manifest.action_stats, manifest.proprio_stats
        return cls(*(np.asarray(v, dtype=np.float32) for v in (a.mean, a.std, p.mean, p.std)))

    def to_dict(self) -> dict[str, list[float]]:
        return {k: getattr(self, k).tolist() for k in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Normalizer:
        missing = [k for k in cls.__dataclass_fields__ if k not in data]
        if missing:
            raise KeyError(f"normalizer dict lacks {missing}; it must come from Normalizer.to_dict() "
                           f"(the checkpoint may predate normalisation stats)")
        return cls(**{k: np.asarray(data[k], dtype=np.float32) for k in cls.__dataclass_fields__})

    @property
    def action_dim(self) -> int:
        return int(self.action_mean.shape[0])

    @property
    def proprio_dim(self) -> int:
        return int(self.proprio_mean.shape[0])

    def norm_action(self, action: ArrayT) -> ArrayT:
        return (action - _like(self.action_mean, action)) / _like(self.action_std, action)

    def denorm_action(self, action: ArrayT) -> ArrayT:
        return action * _like(self.action_std, action) + _like(self.action_mean, action)

    def norm_proprio(self, proprio: ArrayT) -> ArrayT:
        return (proprio - _like(self.proprio_mean, proprio)) / _like(self.proprio_std, proprio)


def fixed_column(batch: dict[str, np.ndarray], name: str, width: int) -> np.ndarray:
    """A fixed-size-list column as a (B, width) array.

    Ray 2.60 numpy batches give these columns as (B,) object arrays of 1-D rows (checked); stacking
    256 rows of 64x64x3 costs ~2 ms. A 2-D array (e.g. from iter_torch_batches paths) passes through.
    """
    if name not in batch:
        raise KeyError(f"batch lacks column {name!r} (has {sorted(batch)}); open the data with open_shards")
    values = batch[name]
    if values.dtype == object:
        values = np.stack(values)
    values = values.reshape(values.shape[0], -1)
    if values.shape[1] != width:
        raise ValueError(f"column {name!r} has {values.shape[1]} values per row, expected {width} from the "
                         f"manifest; the shards and manifest disagree, re-run `actdistill collect`")
    return values


def _strings(values: np.ndarray) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def to_model_batch(batch: dict[str, np.ndarray], normalizer: Normalizer,
                   image_shape: tuple[int, int, int]) -> dict[str, torch.Tensor | list[str]]:
    """A Ray Data numpy batch -> images (B,3,H,W) in [0,1], normalised proprio/actions, texts and keys."""
    h, w, c = image_shape
    images = fixed_column(batch, "image", h * w * c).reshape(-1, h, w, c)
    # One copy into float32 (Ray's arrays may be read-only); channels-first for the vision encoder.
    images_t = torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2).div_(255.0)
    proprio = torch.from_numpy(fixed_column(batch, "proprio", normalizer.proprio_dim).astype(np.float32))
    actions = torch.from_numpy(fixed_column(batch, "action", normalizer.action_dim).astype(np.float32))
    return {
        "images": images_t.contiguous(),
        "proprio": normalizer.norm_proprio(proprio),
        "actions": normalizer.norm_action(actions),
        "instructions": _strings(batch["instruction"]),
        "episode_id": _strings(batch["episode_id"]),
        "step": torch.from_numpy(np.asarray(batch["step"]).astype(np.int64)),
    }
