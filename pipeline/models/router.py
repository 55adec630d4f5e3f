"""The router (one gate per decoder layer from the input embeddings) and the gated decoder-layer wrapper."""

from __future__ import annotations

import threading
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import layers_per_call

GateMode = Literal["off", "soft", "straight_through", "topk", "hard"]
TrainGate = Literal["soft", "straight_through", "annealed"]


def anneal_temperature(step: int, total: int, end: float) -> float:
    """Geometric schedule from 1 to `end`: late in training sigmoid(logit / T) is nearly 0/1."""
    return float(end ** (step / max(1, total - 1)))


def forward_mode(gate: TrainGate) -> GateMode:
    """How the wrappers apply a training gate: annealed gates are soft gates at a falling temperature."""
    return "soft" if gate == "annealed" else gate


def budget_gates(gates: torch.Tensor, gate: TrainGate, threshold: float,
                 run: torch.Tensor | None = None) -> torch.Tensor:
    """The gate values the budget term sees. run given (a top-k phase step): that executed pattern forward.

    Straight-through and annealed: the executed 0/1 pattern forward, the soft gates' gradient backward.
    On the soft values alone the budget is met while more layers run: with straight-through gates mean g
    reached rho while ~80% of layers ran; with annealed ones (demo, per-input budget 0.375) the soft
    budget term was ~0.001 while 0.44 of the layers ran, gates parked just above the threshold counting
    ~half. Soft: the gates (training never runs the hard pattern).
    """
    if run is not None:
        return run.to(gates.dtype) + gates - gates.detach()
    if gate == "soft":
        return gates
    hard = (gates >= threshold).to(gates.dtype)
    return hard + gates - gates.detach()


def top_k_mask(gates: torch.Tensor, keep: int, pinned: tuple[int, ...] = ()) -> torch.Tensor:
    """B x L booleans, True at each row's `keep` largest gates: exactly `keep` per row, even where gates tie. The
    pinned layers are among them on every row, however many other gates saturate at 1 beside theirs."""
    scores = gates.detach()
    if pinned:
        scores = scores.index_fill(1, torch.tensor(pinned, device=gates.device), float("inf"))
    run = torch.zeros_like(gates, dtype=torch.bool)
    return run.scatter_(1, scores.topk(keep, dim=1).indices, True)


def pin_gates(gates: torch.Tensor, pinned: tuple[int, ...]) -> torch.Tensor:
    """The gates with the pinned layers' fixed at 1 (router.pinned): those layers run for every input, train
    ungated, and count toward the budget; the router's outputs for them get no gradient."""
    if not pinned:
        return gates
    return gates.index_fill(1, torch.tensor(pinned, device=gates.device), 1.0)


class Router(nn.Module):
    """g = sigmoid(W [mean,max](vision) ++ [mean,max](instruction) + b), shape B x L."""

    def __init__(self, d_model: int, hidden: int, num_layers: int, init_open: float = 2.0) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(4 * hidden, num_layers)
        # Start with gates ~0.88 (sigmoid(2)): the student begins as its teacher and the budget
        # term then closes layers, instead of starting from a random half-network. Small random
        # weights (not zeros) let gates differ per input from the first step.
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.constant_(self.out.bias, init_open)

    @torch.no_grad()
    def start_from(self, layers: tuple[int, ...], logit: float = 2.0) -> None:
        """Open these layers' gates (bias +logit) and close the others' (-logit): a top-k router then starts by
        running exactly these layers for every input (router.start=static)."""
        self.out.bias.fill_(-logit)
        self.out.bias[list(layers)] = logit

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
        """Gates in (0, 1); a temperature below 1 sharpens them towards 0/1 (annealed training)."""
        v = self.norm(self.proj(vision))
        t = self.norm(self.proj(text))
        m = text_mask.unsqueeze(-1).to(t.dtype)
        t_mean = (t * m).sum(1) / m.sum(1).clamp_min(1.0)
        t_max = t.masked_fill(m == 0, torch.finfo(t.dtype).min).amax(1)
        feats = torch.cat([v.mean(1), v.amax(1), t_mean, t_max], dim=-1)
        return torch.sigmoid(self.out(feats) / temperature)


def evenly_spaced_layers(fraction: float, num_layers: int) -> tuple[int, ...]:
    """The fixed layers of a static or shallow student at a budget: round(fraction * L) of them (at least one),
    evenly spaced and ending at the last layer, so layer k closes the k-th of K equal segments of the teacher:
    0.5 of 8 -> (1, 3, 5, 7), 0.375 of 8 -> (2, 4, 7), 0.25 of 8 -> (3, 7)."""
    k = layers_per_call(fraction, num_layers)
    return tuple(round((i + 1) * num_layers / k) - 1 for i in range(k))


class StaticRouter(nn.Module):
    """The same gates for every input: run exactly `layers` (static layer dropping; costs no FLOPs)."""

    def __init__(self, layers: tuple[int, ...] | list[int], num_layers: int) -> None:
        super().__init__()
        mask = torch.zeros(num_layers)
        mask[list(layers)] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, vision: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
        return self.mask.to(vision.dtype).expand(vision.shape[0], -1)


class GateState(threading.local):
    """The gating state of the forward in progress, shared by the wrappers of one model (no weights).

    Thread-local, and reset when each forward ends: a served model answers concurrent requests from several
    threads, and one request's gates must neither steer another's layers nor outlive the call."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.mode: GateMode = "off"
        self.gates: torch.Tensor | None = None      # B x L soft gates from the router
        self.threshold = 0.5
        self.run: torch.Tensor | None = None        # hard, topk: B x L, True where the layer runs for that row
        self.run_any: list[bool] = []               # hard mode, per layer: some row runs it
        self.run_all: list[bool] = []               # hard mode, per layer: every row runs it
        self.peers_only: list[bool] = []            # hard mode in lockstep, per layer: no row here, another rank's
        self.hidden: list[torch.Tensor] | None = None   # per-layer outputs when recording

    def __reduce__(self) -> tuple[type[GateState], tuple[()]]:
        # A copied or pickled model (derive_student, Ray) starts with a fresh, idle state of its own.
        return (GateState, ())


def decide(state: GateState, gates: torch.Tensor, threshold: float, lockstep: bool = False,
           keep: int | None = None, pinned: tuple[int, ...] = ()) -> torch.Tensor:
    """Hard mode: which rows run which layers, once per forward; B x L of 0/1. Each layer whose gate >= threshold,
    or, keep given (router.select=topk), each row's `keep` largest gates: exactly `keep` layers on every call,
    whatever the gates' values.

    lockstep (ZeRO-3, 2+ ranks): every rank calls each layer that a row on ANY rank runs, since under ZeRO-3 a
    layer call gathers that layer's weights with a collective and ranks that skip different layers hang. Costs
    one all-reduce of L int32 per forward; the rows each layer runs, and so the numbers, are unchanged."""
    run = top_k_mask(gates, keep, pinned) if keep is not None else gates >= threshold
    here = run.any(0)
    state.run, state.run_any, state.run_all = run, here.tolist(), run.all(0).tolist()
    if lockstep:
        anywhere = _on_any_rank(here)
        state.run_any, state.peers_only = anywhere.tolist(), (anywhere & ~here).tolist()
    return run.to(gates.dtype)


def _on_any_rank(flags: torch.Tensor) -> torch.Tensor:
    """Per-layer OR over the ranks of the default process group (a MAX all-reduce of 0/1 int32)."""
    counts = flags.to(torch.int32)
    dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    return counts.bool()


def _take_rows(value: Any, rows: torch.Tensor, batch: int) -> Any:
    """Index every batch-leading tensor in a layer's arguments by `rows`; broadcast ones stay."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_take_rows(v, rows, batch) for v in value)
    return value


class GatedLayer(nn.Module):
    """Wraps one decoder layer: h + g (Layer(h) - h) when training, run-or-skip per row at inference."""

    def __init__(self, layer: nn.Module, index: int, state: GateState) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self._state = state

    def __getattr__(self, name: str) -> Any:
        # Backbones read attributes of their layers (Qwen2: `attention_type`); forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Before __init__ has run (deepspeed.zero.Init probes attributes then) there is no layer to ask.
            if "layer" not in self.__dict__.get("_modules", {}):
                raise
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        state, i = self._state, self.index
        if state.mode == "off" or state.gates is None:
            out = self._run(hidden_states, args, kwargs)
        elif state.mode == "hard":
            out = self._run_hard(hidden_states, args, kwargs)
        else:
            g = state.gates[:, i]
            if state.mode == "straight_through":
                hard = (g >= state.threshold).to(g.dtype)
                g = hard + g - g.detach()  # forward: 0/1 as at inference; backward: the soft gate's gradient
            elif state.mode == "topk" and state.run is not None:
                hard = state.run[:, i].to(g.dtype)
                g = hard + g - g.detach()  # forward: the row's top-k pattern, as deployed; backward: the soft gate
            out = hidden_states + g.view(-1, 1, 1) * (self._run(hidden_states, args, kwargs) - hidden_states)
        if state.hidden is not None:
            state.hidden.append(out)
        return out

    def _run(self, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        out = self.layer(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def _run_hard(self, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        # The run/skip decisions were taken once per forward (decide, from VLA.forward): at batch 1 a layer the
        # router skips costs a list lookup, not a few tensor ops (~0.02-0.05 ms each on CPU).
        state, i = self._state, self.index
        if not state.run_any[i]:
            return h  # a skipped layer leaves h unchanged and costs nothing
        if state.run_all[i]:
            return self._run(h, args, kwargs)
        if state.peers_only and state.peers_only[i]:
            # Lockstep: another rank runs this layer, so this one joins its ZeRO-3 weight gather by running it on
            # one row and dropping the result (0 rows fail in Llama's attention: view(0, N, -1, head_dim)).
            self._run_rows(h, torch.zeros(1, dtype=torch.long, device=h.device), args, kwargs)
            return h
        rows = state.run[:, i].nonzero(as_tuple=True)[0]
        out = h.clone()
        out[rows] = self._run_rows(h, rows, args, kwargs)
        return out

    def _run_rows(self, h: torch.Tensor, rows: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        batch = h.shape[0]
        return self._run(h[rows], _take_rows(args, rows, batch),
                         {k: _take_rows(v, rows, batch) for k, v in kwargs.items()})
