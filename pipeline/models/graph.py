"""Graph-structured encapsulation (training only): per-layer token graph -> semantic vector -> action.

One `LayerProbe` per decoder layer. Its width is set apart from the backbone's (a projection first),
so at 7B (d=4096, 32 layers) the probes stay small instead of ~5.7B parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _masked_fill_min(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # finfo.min instead of -inf: a row with nothing kept stays finite (uniform), never NaN.
    return x.masked_fill(~keep, torch.finfo(x.dtype).min)


def topk_graph(x: torch.Tensor, mask: torch.Tensor, phi: nn.Linear, psi: nn.Linear, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour indices (B x N x k) and edge weights (softmax over the kept logits)."""
    scale = 1.0 / math.sqrt(x.shape[-1])
    logits = torch.einsum("bid,bjd->bij", phi(x), psi(x)) * scale
    logits = _masked_fill_min(logits, mask.bool().unsqueeze(1))  # no edges into padding
    k = min(k, x.shape[1])
    kept, index = logits.topk(k, dim=-1)
    return index, torch.softmax(kept, dim=-1)


def _gather_neighbours(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values B x H x N x e, index B x N x k -> B x H x N x k x e."""
    b, h, n, e = values.shape
    k = index.shape[-1]
    flat = index.reshape(b, 1, n * k, 1).expand(b, h, n * k, e)
    return values.gather(2, flat).reshape(b, h, n, k, e)


class GraphAttention(nn.Module):
    """Each node attends over its own top-k neighbourhood; heads averaged; residual + LayerNorm."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, heads * width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, index: torch.Tensor, edge_w: torch.Tensor,
                neighbour_ok: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)       # B H N e
        k = self.k(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, self.heads, w).transpose(1, 2)                    # B H N w
        k_nb, v_nb = _gather_neighbours(k, index), _gather_neighbours(v, index)   # B H N k *
        scores = torch.einsum("bhne,bhnke->bhnk", q, k_nb) / math.sqrt(self.head_dim)
        scores = scores + torch.log(edge_w.clamp_min(1e-9)).unsqueeze(1)          # edge prior
        scores = _masked_fill_min(scores, neighbour_ok.unsqueeze(1))
        att = torch.softmax(scores, dim=-1)                                        # stable: max-subtracted
        message = torch.einsum("bhnk,bhnkw->bhnw", att, v_nb).mean(1)              # average heads
        return self.norm(x + message)                                              # self/residual term


class LayerProbe(nn.Module):
    """Hidden states of one layer -> (semantic vector s_l, action a_l)."""

    def __init__(self, d_model: int, width: int, semantic_dim: int, top_k: int, heads: int,
                 action_dim: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.inp = nn.Sequential(nn.Linear(d_model, width), nn.LayerNorm(width))
        self.phi = nn.Linear(width, width, bias=False)
        self.psi = nn.Linear(width, width, bias=False)
        self.gat = nn.ModuleList([GraphAttention(width, heads) for _ in range(2)])
        self.pool_query = nn.Parameter(torch.randn(width) / math.sqrt(width))
        self.readout = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, semantic_dim))
        self.action = nn.Sequential(nn.Linear(semantic_dim, semantic_dim), nn.GELU(),
                                    nn.Linear(semantic_dim, action_dim))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.inp(hidden)
        index, edge_w = topk_graph(x, mask, self.phi, self.psi, self.top_k)
        neighbour_ok = mask.bool().gather(1, index.flatten(1)).view_as(index)
        for layer in self.gat:
            x = layer(x, index, edge_w, neighbour_ok)
        scores = _masked_fill_min(x @ self.pool_query / math.sqrt(x.shape[-1]), mask.bool())
        pooled = torch.einsum("bn,bnw->bw", torch.softmax(scores, dim=-1), x)     # attention pooling
        semantic = self.readout(pooled)
        return semantic, self.action(semantic)


class ProbeSet(nn.Module):
    """One probe per decoder layer: the training-only heads, stripped from the exported student."""

    def __init__(self, num_layers: int, d_model: int, width: int, semantic_dim: int, top_k: int,
                 heads: int, action_dim: int) -> None:
        super().__init__()
        self.dims = dict(num_layers=num_layers, d_model=d_model, width=width, semantic_dim=semantic_dim,
                         top_k=top_k, heads=heads, action_dim=action_dim)
        self.probes = nn.ModuleList([LayerProbe(d_model, width, semantic_dim, top_k, heads, action_dim)
                                     for _ in range(num_layers)])

    def forward(self, hidden: list[torch.Tensor], mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer hidden states -> semantics L x B x S and actions L x B x A."""
        outs = [probe(h, mask) for probe, h in zip(self.probes, hidden)]
        return torch.stack([s for s, _ in outs]), torch.stack([a for _, a in outs])
