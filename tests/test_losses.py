"""ActDistill loss terms against hand-computed values; the stop-gradient on the previous layer's action."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.losses import (
    LossWeights,
    action_loss,
    align_loss,
    balance_loss,
    budget_loss,
    distill_loss,
    layer_weights,
    regression_loss,
    struct_loss,
)


def test_layer_weights_follow_gamma_and_average_one():
    w = layer_weights(4, gamma=2.0)
    raw = torch.tensor([0.0, 1 / 9, 4 / 9, 1.0])
    torch.testing.assert_close(w, raw / raw.mean())
    assert w.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(layer_weights(5, gamma=0.0), torch.ones(5))


def test_align_and_struct_match_hand_values():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # cos: row 0 = 1/sqrt(2), row 1 = 1
    assert align_loss(s, t).item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 0.0) / 2)
    # C(s) = I; C(t) = [[1, 1/sqrt2], [1/sqrt2, 1]] -> two off-diagonal errors of 1/2 each over 4 cells
    assert struct_loss(s, t).item() == pytest.approx(2 * 0.5 / 4)


def test_budget_and_balance():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert budget_loss(g, 0.3).item() == pytest.approx((0.5 - 0.3) ** 2)
    assert balance_loss(g).item() == pytest.approx(0.25)


def test_previous_layer_action_is_a_stop_gradient_target():
    a_prev = torch.tensor([[1.0, 2.0]], requires_grad=True)
    a_cur = torch.tensor([[0.0, 0.0]], requires_grad=True)
    gt = torch.zeros(1, 2)
    loss = action_loss(a_cur, gt, gt, a_prev)
    loss.backward()
    assert a_prev.grad is None or torch.count_nonzero(a_prev.grad) == 0
    # d/da_cur of mean((a_cur - a_prev)^2) = 2 (a_cur - a_prev) / 2
    torch.testing.assert_close(a_cur.grad, torch.tensor([[-1.0, -2.0]]))


def test_total_loss_composes_the_terms_with_their_weights():
    torch.manual_seed(0)
    layers, batch = 3, 4
    sem_s, sem_t = torch.randn(layers, batch, 5), torch.randn(layers, batch, 5)
    act_s, act_t = torch.randn(layers, batch, 2), torch.randn(layers, batch, 2)
    actions, gt, gates = torch.randn(batch, 2), torch.randn(batch, 2), torch.rand(batch, layers)
    w = LossWeights(alpha=0.7, beta=1.3, eta=0.5, gamma=2.0, budget_weight=2.0, balance_weight=0.0, budget=0.4)
    total, parts = distill_loss(F.mse_loss(actions, gt), gt, sem_s, act_s, sem_t, act_t, gates, w)
    lw = layer_weights(layers, 2.0)
    expected = torch.nn.functional.mse_loss(actions, gt) + 2.0 * (gates.mean() - 0.4) ** 2
    for l in range(layers):
        expected = expected + lw[l] * (0.7 * (align_loss(sem_s[l], sem_t[l]) + 0.5 * struct_loss(sem_s[l], sem_t[l]))
                                       + 1.3 * action_loss(act_s[l], gt, act_t[l], act_s[l - 1] if l else None))
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["total"] == pytest.approx(total.item())


def test_regression_loss_is_expert_plus_teacher_action_error_plus_budget():
    g = torch.Generator().manual_seed(1)
    actions, gt, teacher = (torch.randn(6, 4, generator=g) for _ in range(3))
    gates = torch.rand(6, 5, generator=g)
    w = LossWeights(budget=0.4, budget_weight=2.0)
    total, parts = regression_loss(F.mse_loss(actions, gt), F.mse_loss(actions, teacher), gates, w)
    expected = F.mse_loss(actions, gt) + F.mse_loss(actions, teacher) + 2.0 * (gates.mean() - 0.4) ** 2
    torch.testing.assert_close(total, expected)
    assert set(parts) == {"task", "teacher_action", "budget", "total"}   # no per-layer terms


def test_per_input_budget_bounds_every_input_not_just_the_batch_mean():
    # Two inputs: one runs all 4 layers, one none. The batch mean is on budget (0.5), each input is 0.5 off it.
    gates = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    assert budget_loss(gates, 0.5).item() == 0.0
    per_input = budget_loss(gates, 0.5, per_input=True)
    assert per_input.item() == pytest.approx(0.25)
    per_input.backward()
    # The gradient lowers the busy input's gates and raises the idle one's.
    assert (gates.grad[0] > 0).all() and (gates.grad[1] < 0).all()
    w = LossWeights(budget=0.5, budget_per_input=True)
    total, parts = regression_loss(torch.zeros(()), torch.zeros(()), gates.detach(), w)
    assert parts["budget"] == pytest.approx(0.25) and total.item() == pytest.approx(0.25)
