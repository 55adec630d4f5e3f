"""The VLA's action head: regression (an MLP to continuous actions) or tokens (each dimension as one of 256 bins).

The tokens head follows OpenVLA: every action dimension is discretised into `bins` equal bins between the training
data's 1st and 99th percentiles, and predicted as a token with cross-entropy. Values outside that range fall into
the edge bins (clipped; counted). Decoding takes each dimension's most likely bin and returns its centre.

Unlike OpenVLA, which generates its action tokens one after another (7 decoder passes), the tokens here are
predicted in one pass (OpenVLA-OFT's parallel decoding): one learned query token per dimension after the prompt,
each reading the prompt causally, and one shared bin projection. One decoder pass per call keeps the router's
decision once per call, as for the regression head; the decoder reads A - 1 more tokens. For a pretrained VLM the
bin projection starts from its language-model head's last `bins` vocabulary rows, the tokens OpenVLA assigns to
action bins.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.manifest import Stats

ACTION_HEADS = ("regression", "tokens")
DEGENERATE_HALF_WIDTH = 1.0   # a dimension whose q01 == q99 (a constant gripper) gets +-1 std around its value


def token_range(stats: Stats, mean: list[float] | None = None, std: list[float] | None = None
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The bins' range per dimension in normalised action units: (q01 - mean) / std to (q99 - mean) / std.

    The model sees actions normalised by the data's mean and std; binning those between the normalised
    percentiles is binning the raw actions between the raw percentiles."""
    mean, std = mean or stats.mean, std or stats.std
    low, high = [], []
    for q01, q99, m, s in zip(stats.q01, stats.q99, mean, std):
        lo, hi = (q01 - m) / s, (q99 - m) / s
        if hi - lo < 1e-6:
            lo, hi = lo - DEGENERATE_HALF_WIDTH, hi + DEGENERATE_HALF_WIDTH
        low.append(float(lo))
        high.append(float(hi))
    return tuple(low), tuple(high)


class Binned(NamedTuple):
    index: torch.Tensor      # B x A bin indices (long)
    clipped: torch.Tensor    # number of values outside [low, high] (a 0-d long tensor)


class TokenHead(nn.Module):
    """B x A x d query states -> B x A x bins logits through one shared projection; bins <-> actions."""

    def __init__(self, d: int, bins: int, low: tuple[float, ...], high: tuple[float, ...]) -> None:
        super().__init__()
        self.bins = bins
        self.proj = nn.Linear(d, bins, bias=False)   # an LM head's rows have no bias
        # The range comes from the config, so it is not part of the weights.
        self.register_buffer("low", torch.tensor(low, dtype=torch.float32), persistent=False)
        self.register_buffer("high", torch.tensor(high, dtype=torch.float32), persistent=False)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.proj(queries)

    def binned(self, actions: torch.Tensor) -> Binned:
        """Actions (B x A, normalised units) -> bin indices; values outside the range go to the edge bins."""
        low, high = self.low.to(actions.device), self.high.to(actions.device)
        clipped = ((actions < low) | (actions > high)).sum()
        index = torch.floor((actions.float() - low) / (high - low) * self.bins).long()
        return Binned(index.clamp_(0, self.bins - 1), clipped)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """B x A x bins logits -> B x A actions (normalised units): the centre of each dimension's likeliest bin."""
        low, high = self.low.to(logits.device), self.high.to(logits.device)
        index = logits.argmax(-1)
        return (low + (index.float() + 0.5) * (high - low) / self.bins).to(logits.dtype)


def regression_head(d: int, action_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, action_dim))


class TaskLoss(NamedTuple):
    loss: torch.Tensor
    parts: dict[str, float]


def action_task_loss(head: nn.Module, actions: torch.Tensor, logits: torch.Tensor | None,
                     target: torch.Tensor, name: str = "task") -> TaskLoss:
    """The policy's own action loss against `target` (B x A, normalised units): MSE for the regression head;
    for the tokens head cross-entropy to the target's bins, with the clipped values counted. parts[name] is the
    loss; a tokens head adds `clipped_action_values`: the target's values outside the bins' range in this batch
    (trained towards the edge bins)."""
    if not isinstance(head, TokenHead):
        loss = F.mse_loss(actions.float(), target)
        return TaskLoss(loss, {name: float(loss.detach())})
    if logits is None:
        raise ValueError("a tokens action head needs the VLA output's action_logits")
    binned = head.binned(target)
    loss = F.cross_entropy(logits.float().reshape(-1, head.bins), binned.index.reshape(-1))
    return TaskLoss(loss, {name: float(loss.detach()), "clipped_action_values": float(binned.clipped)})


def lm_head_rows(head: TokenHead, vocab_rows: torch.Tensor, where: str) -> torch.Tensor:
    """The bin projection's start from a pretrained language model's output rows (lm_head, or the tied
    embeddings): bin b reads the row of token id vocab_size - 1 - b, the last `bins` ids of the vocabulary,
    which is how OpenVLA assigns action bins to tokens (action bin = vocab_size - 1 - token id)."""
    vocab = vocab_rows.shape[0]
    if vocab < head.bins:
        raise ValueError(f"model.action_bins={head.bins} exceeds the vocabulary of {where} ({vocab} tokens): the bins "
                         f"take its last action_bins token rows; set model.action_bins to at most {vocab}")
    return vocab_rows[vocab - head.bins:].flip(0)
