"""The three student families of the frontier: routed, static (a fixed layer subset under the ActDistill loss) and
shallow (the same subset distilled Shallow-pi-like): which layers each runs, what each trains, and their losses."""

import pytest
import torch
from fault_support import NORMALIZER

from pipeline.config import DistillSection, ModelSection, RouterSection
from pipeline.distill.fit import StudentJob, _student_objective, fixed_layers
from pipeline.distill.losses import LossWeights, align_loss, shallow_loss
from pipeline.distill.objective import TeacherTargets
from pipeline.models.checkpoint import PolicyCard, load_policy, save_policy, save_probes
from pipeline.models.router import evenly_spaced_layers
from pipeline.models.vla import VLA, VLAConfig
from pipeline.teacher.probing import new_probes
from pipeline.tracking.registry import Gate, ranked_passing
from pipeline.train.loop import Tracking
from pipeline.tune.frontier import frontier_plot, frontier_table, pareto
from pipeline.tune.trials import TeacherPoint, TrialResult


def test_the_fixed_layers_are_the_budgets_share_evenly_spaced_and_ending_at_the_last():
    assert evenly_spaced_layers(0.5, 8) == (1, 3, 5, 7)
    assert evenly_spaced_layers(0.375, 8) == (2, 4, 7)
    assert evenly_spaced_layers(0.25, 8) == (3, 7)
    assert evenly_spaced_layers(0.01, 8) == (7,) and evenly_spaced_layers(1.0, 8) == tuple(range(8))
    routed, static, shallow = (DistillSection(family=f) for f in ("routed", "static", "shallow"))
    assert fixed_layers(RouterSection(budget=0.25), routed, 8) is None
    assert fixed_layers(RouterSection(budget=0.25), static, 8) == fixed_layers(RouterSection(budget=0.25), shallow,
                                                                               8) == (3, 7)
    assert fixed_layers(RouterSection(budget=0.25, static_layers=[0, 5]), shallow, 8) == (0, 5)   # named layers win


def test_the_shallow_loss_is_task_plus_teacher_plus_alpha_times_the_kept_layers_alignment():
    torch.manual_seed(0)
    sem_s, sem_t = torch.randn(4, 6, 8), torch.randn(4, 6, 8)
    task, teacher = torch.tensor(0.3), torch.tensor(0.2)
    w = LossWeights(alpha=2.0)
    total, parts = shallow_loss(task, teacher, sem_s, sem_t, (1, 3), w)
    feature = (align_loss(sem_s[1], sem_t[1]) + align_loss(sem_s[3], sem_t[3])) / 2
    assert torch.allclose(total, task + teacher + 2.0 * feature)
    assert parts["align"] == pytest.approx(float(feature)) and parts["teacher_action"] == pytest.approx(0.2)


def _job(tmp_path, family, budget=0.5, **router):
    """A 4-layer random teacher and its probes on disk, and the distill job a worker receives for it."""
    torch.manual_seed(0)
    cfg = VLAConfig(backbone="llama", hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=64, vocab_size=64,
                    max_instruction_tokens=6, image_size=32, patch_size=8, proprio_dim=4, action_dim=4)
    teacher = VLA(cfg)
    digest = save_policy(teacher, str(tmp_path / "teacher"), PolicyCard(normalizer=NORMALIZER))
    model = ModelSection(hidden_size=32, num_layers=4, graph_width=16, semantic_dim=16)
    save_probes(new_probes(teacher, model), str(tmp_path / "probes"), {"teacher_hash": digest})
    distill = DistillSection(family=family, teacher_mode="online")
    return StudentJob(router=RouterSection(budget=budget, **({"gate": "soft"} | router)), distill=distill,
                      teacher_uri=str(tmp_path / "teacher"), teacher_hash=digest, probes_uri=str(tmp_path / "probes"),
                      image_shape=(32, 32, 3), card=PolicyCard(normalizer=NORMALIZER),
                      tracking=Tracking(uri="", run_id=""), seed=0)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    words = ["push the puck", "reach the goal now", "open the drawer please", "a"]
    return (torch.rand(8, 3, 32, 32, generator=g), [words[i % 4] for i in range(8)], torch.randn(8, 4, generator=g),
            torch.randn(8, 4, generator=g))


@pytest.mark.parametrize("family", ["static", "shallow"])
def test_a_fixed_family_student_trains_only_its_kept_layers_and_the_shallow_one_leaves_the_probes_alone(
        tmp_path, family):
    objective, _ = _student_objective(_job(tmp_path, family), torch.device("cpu"))
    student = objective.distill.student
    assert student.cfg.static_layers == (1, 3) and student.cfg.router_hidden is None   # 0.5 of 4 layers
    images, instructions, proprio, actions = _batch()
    loss, parts, executed = objective.train()(images, instructions, proprio, actions, None, 1.0)
    loss.backward()
    assert float(executed) == 0.5
    grads = [sum(float(p.grad.abs().sum()) for p in w.layer.parameters() if p.grad is not None)
             for w in student.backbone.layers]
    assert grads[1] > 0 and grads[3] > 0 and grads[0] == grads[2] == 0.0    # skipped layers learn nothing
    probe_grads = [p.grad for p in objective.distill.probes.parameters()]
    if family == "shallow":
        assert set(parts) == {"task", "teacher_action", "align", "total"}
        assert all(not p.requires_grad for p in objective.distill.probes.parameters())
    else:   # the ActDistill loss: per-layer terms through trainable probes, and the (constant) budget term
        assert {"align", "struct", "act", "budget"} <= set(parts)
        assert any(g is not None and float(g.abs().sum()) > 0 for g in probe_grads)


def test_a_top_k_routed_student_trains_as_the_threshold_router_and_deploys_its_k_layers(tmp_path):
    job = _job(tmp_path, "routed", budget=0.25, select="topk", gate="annealed", budget_scope="input")
    objective, _ = _student_objective(job, torch.device("cpu"))
    student = objective.distill.student
    assert student.cfg.router_keep == 1 and student.cfg.static_layers is None    # 0.25 of 4 layers
    images, instructions, proprio, actions = _batch()
    loss, parts, executed = objective.train()(images, instructions, proprio, actions, None, 1.0)
    loss.backward()
    # Fresh, the gates are all open (~0.88): the budget term pulls each input from 4 layers towards 1.
    assert float(executed) == 1.0 and parts["budget"] == pytest.approx(0.75 ** 2)
    assert float(student.router.out.bias.grad.sum()) > 0     # descending it closes gates
    out = student.eval()(images, instructions, proprio, mode="hard")
    assert out.executed.sum(1).tolist() == [1.0] * 8          # deployed: one layer per call whatever the gates


def test_the_top_k_phase_trains_the_last_steps_with_the_deployed_pattern_and_still_moves_the_router(tmp_path):
    job = _job(tmp_path, "routed", budget=0.5, select="topk", gate="annealed", budget_scope="input", topk_phase=0.3)
    objective, _ = _student_objective(job, torch.device("cpu"))
    steps = job.distill.train.steps
    assert [objective.topk_at(s) for s in (0, round(0.7 * steps) - 1, round(0.7 * steps), steps - 1)] == \
        [False, False, True, True]
    student = objective.distill.student
    images, instructions, proprio, actions = _batch()
    with torch.no_grad():
        deployed = student.eval()(images, instructions, proprio, mode="hard")
    objective.train()
    loss, parts, executed = objective(images, instructions, proprio, actions, None, 0.5, topk=True)
    loss.backward()
    # Forward: exactly the 2 layers per input that deployment runs, so the student's actions are the deployed ones
    # and the budget term (on that pattern) is zero; backward: every gate, run or not, gets the task's gradient.
    assert float(executed) == 0.5 and parts["budget"] == 0.0
    with torch.no_grad():
        trained = student(images, instructions, proprio, mode="topk", temperature=0.5)
    torch.testing.assert_close(trained.actions, deployed.actions)
    assert torch.equal(trained.executed, deployed.executed) and set(trained.executed.sum(1).tolist()) == {2.0}
    assert bool((student.router.out.weight.grad.abs().sum(1) > 0).all())
    # A threshold-select student has no per-call count to train towards.
    with pytest.raises(ValueError, match="mode=topk .* has no router_keep"):
        VLA(student.cfg.model_copy(update={"router_keep": None}))(images, instructions, proprio, mode="topk")


def test_a_router_started_static_runs_the_static_students_layers_until_training_moves_it(tmp_path):
    job = _job(tmp_path, "routed", budget=0.5, select="topk", budget_scope="input", topk_phase=1.0, start="static")
    objective, _ = _student_objective(job, torch.device("cpu"))
    student = objective.distill.student
    images, instructions, proprio, actions = _batch()
    with torch.no_grad():
        out = student.eval()(images, instructions, proprio, mode="hard")
    layers = evenly_spaced_layers(0.5, 4)                    # (1, 3)
    assert out.executed.tolist() == [[float(i in layers) for i in range(4)]] * 8
    fresh = _student_objective(_job(tmp_path / "open", "routed", budget=0.5, select="topk"), torch.device("cpu"))[0]
    assert fresh.distill.student.router.out.bias.tolist() == [2.0] * 4     # router.start=open: the teacher's start


def test_a_pinned_layer_runs_for_every_input_in_training_and_deployment_and_the_router_chooses_the_rest(tmp_path):
    job = _job(tmp_path, "routed", budget=0.5, select="topk", gate="annealed", budget_scope="input", topk_phase=1.0,
               pinned=[3])
    objective, _ = _student_objective(job, torch.device("cpu"))
    student = objective.distill.student
    assert student.cfg.router_pinned == (3,) and student.cfg.router_keep == 2
    images, instructions, proprio, actions = _batch()
    objective.train()
    loss, parts, executed = objective(images, instructions, proprio, actions, None, 0.5, topk=True)
    loss.backward()
    assert float(executed) == 0.5 and parts["budget"] == 0.0      # the pinned layer counts toward the budget
    grad = student.router.out.weight.grad.abs().sum(1)
    assert float(grad[3]) == 0.0 and bool((grad[:3] > 0).all())   # its gate is fixed; the others train
    with torch.no_grad():   # every other gate saturated at 1 beside the pinned one: a tie top-k must not break
        student.router.out.bias.fill_(40.0)
        student.router.out.bias[3] = -40.0              # and the router's own output for the pinned layer: shut
        deployed = student.eval()(images, instructions, proprio, mode="hard")
    assert deployed.executed[:, 3].tolist() == [1.0] * 8 and set(deployed.executed.sum(1).tolist()) == {2.0}
    # Saved and loaded, the student still pins the layer (a served student deploys what was trained).
    uri = str(tmp_path / "student")
    save_policy(student, uri, PolicyCard(normalizer=NORMALIZER))
    loaded, _ = load_policy(uri)
    with torch.no_grad():
        again = loaded.eval()(images, instructions, proprio, mode="hard")
    assert loaded.cfg.router_pinned == (3,) and torch.equal(again.executed, deployed.executed)


def test_the_shallow_objective_reads_cached_labels_as_it_reads_the_online_teacher(tmp_path):
    objective, _ = _student_objective(_job(tmp_path, "shallow"), torch.device("cpu"))
    objective.train()
    images, instructions, proprio, actions = _batch(1)
    online, _, _ = objective(images, instructions, proprio, actions, None, 1.0)
    targets = objective.online_targets(images, instructions, proprio)
    cached = TeacherTargets(targets.sem.clone(), targets.act.clone(), targets.action.clone())
    again, _, _ = objective(images, instructions, proprio, actions, cached, 1.0)
    assert torch.allclose(online, again)


def _trial(name, family, compute, success, ci=None):
    return TrialResult(trial=name, params={"distill.family": family, "router.budget": compute}, student_uri=name,
                       success=success, compute_ratio=compute, action_mse_norm=0.1, family=family,
                       ci95=ci or (success - 0.1, success + 0.1))


def test_the_gate_can_prefer_the_cheapest_passing_family():
    pool = [_trial("routed-50", "routed", 0.5, 0.80), _trial("static-38", "static", 0.375, 0.74),
            _trial("shallow-38", "shallow", 0.375, 0.72), _trial("shallow-25", "shallow", 0.25, 0.40)]
    gate = Gate(teacher_success=0.78, success_delta=0.08, compute_budget=0.6)   # passes at success >= 0.70
    assert [t.trial for t in ranked_passing(pool, gate)] == ["routed-50", "static-38", "shallow-38"]
    # The least compute first; at equal compute the simpler family (a dense stack needs no layer mask or router).
    assert [t.trial for t in ranked_passing(pool, gate, "compute")] == ["shallow-38", "static-38", "routed-50"]


def test_the_frontier_table_and_plot_show_every_family_and_the_teacher_with_intervals(tmp_path):
    trials = [_trial("t1", "routed", 0.4, 0.7), _trial("t2", "static", 0.375, 0.72), _trial("t3", "shallow", 0.375,
                                                                                           0.6)]
    teacher = TeacherPoint(success=0.75, ci95=(0.66, 0.82))
    front = pareto(trials)
    assert [t.trial for t in front] == ["t2"]                 # the static student beats the routed one on both axes
    table = frontier_table(trials, front, teacher).splitlines()
    assert table[2] == "| teacher | dense | | 1.00 | 0.75 | 0.66-0.82 | | | |"
    rows = {line.split(" | ")[0].strip("| "): line for line in table[3:]}
    assert " | shallow | " in rows["t3"] and "0.50-0.70" in rows["t3"] and rows["t2"].endswith("| yes |")
    frontier_plot(trials, front, teacher, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000
