"""ActDistill losses: layer weights, semantic alignment, batch structure, per-layer action, budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import DistillSection, RouterSection


def layer_weights(num_layers: int, gamma: float) -> torch.Tensor:
    """w_l = (l / (L-1))^gamma, normalised to mean 1 (deeper layers weigh more)."""
    if num_layers == 1:
        return torch.ones(1)
    w = (torch.arange(num_layers, dtype=torch.float32) / (num_layers - 1)) ** gamma
    return w / w.mean()


def align_loss(s_student: torch.Tensor, s_teacher: torch.Tensor) -> torch.Tensor:
    """mean_b (1 - cos(s^S, s^T)) for one layer (B x S each)."""
    return (1.0 - F.cosine_similarity(s_student, s_teacher, dim=-1)).mean()


def batch_cosine(x: torch.Tensor) -> torch.Tensor:
    """B x B cosine-similarity matrix of a batch of vectors."""
    x = F.normalize(x, dim=-1, eps=1e-8)
    return x @ x.T


def struct_loss(s_student: torch.Tensor, s_teacher: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(batch_cosine(s_student), batch_cosine(s_teacher))


def action_loss(a_student: torch.Tensor, a_gt: torch.Tensor, a_teacher: torch.Tensor,
                a_prev: torch.Tensor | None) -> torch.Tensor:
    """MSE to ground truth + MSE to teacher layer + MSE to the previous student layer (stop-gradient)."""
    loss = F.mse_loss(a_student, a_gt) + F.mse_loss(a_student, a_teacher)
    if a_prev is not None:
        loss = loss + F.mse_loss(a_student, a_prev.detach())
    return loss


def budget_loss(gates: torch.Tensor, budget: float, per_input: bool = False) -> torch.Tensor:
    """(mean_{b,l} g - rho)^2: pulls the batch's executed fraction towards the budget. per_input:
    mean_b (mean_l g_b - rho)^2, every input's own fraction: a bound on each call's compute, where the
    batch form lets some inputs run more layers than rho L as long as others run fewer."""
    if per_input:
        return ((gates.mean(1) - budget) ** 2).mean()
    return (gates.mean() - budget) ** 2


def balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Variance of per-layer usage around the mean usage (equalises layers)."""
    usage = gates.mean(0)
    return ((usage - usage.mean()) ** 2).mean()


@dataclass(frozen=True)
class LossWeights:
    alpha: float = 1.0
    beta: float = 1.0
    eta: float = 0.5
    gamma: float = 2.0
    budget_weight: float = 1.0
    balance_weight: float = 0.0
    budget: float = 0.5
    budget_per_input: bool = False

    @classmethod
    def of(cls, router: RouterSection, distill: DistillSection) -> LossWeights:
        return cls(alpha=distill.alpha, beta=distill.beta, eta=distill.eta, gamma=distill.gamma,
                   budget_weight=distill.budget_weight, balance_weight=distill.balance_weight,
                   budget=router.budget, budget_per_input=router.budget_scope == "input")


def distill_loss(task: torch.Tensor, a_gt: torch.Tensor, sem_s: torch.Tensor, act_s: torch.Tensor,
                 sem_t: torch.Tensor, act_t: torch.Tensor, gates: torch.Tensor, w: LossWeights
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_task + sum_l w_l [alpha (align + eta struct) + beta act] + budget (+ balance).

    task is the student's own action loss on its final output (action_head.action_task_loss: MSE for the
    regression head, cross-entropy over the bins for the tokens head). sem_* are L x B x S, act_* are L x B x A
    (the per-layer probes' continuous actions, whichever the head), gates B x L.
    """
    num_layers = sem_s.shape[0]
    weights = layer_weights(num_layers, w.gamma).to(task.device)
    parts = {"align": 0.0, "struct": 0.0, "act": 0.0}
    layered = task.new_zeros(())
    for l in range(num_layers):
        align = align_loss(sem_s[l], sem_t[l])
        struct = struct_loss(sem_s[l], sem_t[l])
        act = action_loss(act_s[l], a_gt, act_t[l], act_s[l - 1] if l > 0 else None)
        layered = layered + weights[l] * (w.alpha * (align + w.eta * struct) + w.beta * act)
        parts["align"] += float(align.detach()) / num_layers
        parts["struct"] += float(struct.detach()) / num_layers
        parts["act"] += float(act.detach()) / num_layers
    router, budget = _router_terms(gates, w)
    total = task + layered + router
    parts.update(task=float(task.detach()), budget=float(budget.detach()), total=float(total.detach()))
    return total, parts


def regression_loss(task: torch.Tensor, teacher: torch.Tensor, gates: torch.Tensor,
                    w: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """The no-graph-supervision ablation: L = task + teacher + budget (+ balance).

    The student's final action only, its own action loss against the expert's action (task) and against the
    ungated teacher's (teacher; MSE, or cross-entropy to the teacher's bins for the tokens head): plain action
    distillation with the same router and budget as distill_loss, none of the per-layer terms.
    """
    router, budget = _router_terms(gates, w)
    total = task + teacher + router
    return total, {"task": float(task.detach()), "teacher_action": float(teacher.detach()),
                   "budget": float(budget.detach()), "total": float(total.detach())}


def shallow_loss(task: torch.Tensor, teacher: torch.Tensor, sem_s: torch.Tensor, sem_t: torch.Tensor,
                 layers: tuple[int, ...], w: LossWeights) -> tuple[torch.Tensor, dict[str, float]]:
    """The shallow baseline (Shallow-pi-like knowledge distillation of a dense stack of K teacher layers):
    L = task + teacher + alpha * mean_k (1 - cos(s^S_{i_k}, s^T_{i_k})).

    The student's k-th layer is the teacher's layer i_k; its output is aligned with the teacher's output of that
    layer, read through the teacher's frozen stage-1 probes (cached labels hold those features, not hidden
    states). No graph structure, per-layer action or budget terms: the compute is fixed by the layers kept.
    """
    feature = torch.stack([align_loss(sem_s[i], sem_t[i]) for i in layers]).mean()
    total = task + teacher + w.alpha * feature
    return total, {"task": float(task.detach()), "teacher_action": float(teacher.detach()),
                   "align": float(feature.detach()), "total": float(total.detach())}


def _router_terms(gates: torch.Tensor, w: LossWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """budget_weight * budget (+ balance_weight * balance), and the budget term alone for logging."""
    budget = budget_loss(gates, w.budget, w.budget_per_input)
    total = w.budget_weight * budget
    if w.balance_weight > 0:
        total = total + w.balance_weight * balance_loss(gates)
    return total, budget
