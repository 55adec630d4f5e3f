"""Training-time gates: a short training with budget rho=0.3 ends running ~30% of the layers."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.distill.losses import budget_loss
from pipeline.models.graph import topk_graph
from pipeline.models.router import anneal_temperature, budget_gates, forward_mode
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA, VLAConfig

WORDS = ["push the puck", "reach the goal now", "open the drawer please", "a"]


def batch(n, g):
    return torch.rand(n, 3, 32, 32, generator=g), [WORDS[i % 4] for i in range(n)], torch.randn(n, 4, generator=g)


@pytest.mark.parametrize("gate", ["straight_through", "annealed"])
def test_budget_term_drives_the_executed_fraction_to_rho(gate):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = VLAConfig(backbone="llama", hidden_size=32, num_layers=10, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, vocab_size=64, max_instruction_tokens=6, image_size=32, patch_size=8,
                    proprio_dim=4, action_dim=4)
    teacher = VLA(cfg).eval()
    student = derive_student(teacher, router_hidden=16)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    steps, rho = 100, 0.3
    for step in range(steps):
        x = batch(16, g)
        with torch.no_grad():
            target = teacher(*x).actions                 # random data, the teacher's actions as labels
        temperature = anneal_temperature(step, steps, 0.05) if gate == "annealed" else 1.0
        out = student(*x, mode=forward_mode(gate), temperature=temperature)
        loss = F.mse_loss(out.actions, target) + budget_loss(budget_gates(out.gates, gate, 0.5), rho)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        executed = student.eval()(*batch(64, g), mode="hard").executed.mean().item()
    assert abs(executed - rho) <= 0.1, executed


@pytest.mark.parametrize("gate", ["straight_through", "annealed"])
def test_budget_gates_are_the_executed_pattern_forward_and_soft_backward(gate):
    # A gate parked at 0.55 runs its layer at inference: the budget counts it as 1, not 0.55.
    gates = torch.tensor([[0.2, 0.55]], requires_grad=True)
    used = budget_gates(gates, gate, 0.5)
    torch.testing.assert_close(used, torch.tensor([[0.0, 1.0]]))
    used.sum().backward()
    assert gates.grad.tolist() == [[1.0, 1.0]]
    assert budget_gates(gates, "soft", 0.5) is gates


def test_topk_graph_keeps_the_k_largest_scaled_logits_and_never_links_to_padding():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    phi, psi = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    index, weights = topk_graph(x, mask, phi, psi, k=2)
    logits = (phi(x) @ psi(x).transpose(1, 2)) / 8 ** 0.5
    logits[..., 4] = float("-inf")
    top, expected_index = logits.topk(2, dim=-1)
    assert torch.equal(index, expected_index) and not (index == 4).any()
    torch.testing.assert_close(weights, torch.softmax(top, dim=-1))


def test_router_parameters_get_their_own_learning_rate_and_no_parameter_is_lost():
    from pipeline.train.engine import param_groups

    cfg = VLAConfig(backbone="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, vocab_size=64, max_instruction_tokens=6, image_size=32, patch_size=8,
                    proprio_dim=4, action_dim=4)
    student = derive_student(VLA(cfg), router_hidden=16)
    student.patch.requires_grad_(False)                      # frozen parameters stay out of every group
    rest, router = param_groups(student, {"router": 3e-4})
    assert "lr" not in rest and router["lr"] == 3e-4         # the rest: the optimizer's default (train.lr)
    assert {id(p) for p in router["params"]} == {id(p) for p in student.router.parameters()}
    trainable = {id(p) for p in student.parameters() if p.requires_grad}
    assert {id(p) for p in rest["params"]} | {id(p) for p in router["params"]} == trainable
    assert len(param_groups(student, {})) == 1
