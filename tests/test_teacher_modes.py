"""Teacher modes: online targets equal probe-teacher's cached labels; probes from another teacher are refused."""

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.batches import Normalizer, to_model_batch
from pipeline.distill.fit import check_probes
from pipeline.distill.objective import StudentObjective
from pipeline.models.checkpoint import PolicyCard, load_policy, load_probes, save_policy, save_probes
from pipeline.models.student import DistillModule, derive_student
from pipeline.models.vla import VLA, teacher_config
from pipeline.stages import RunPaths
from pipeline.teacher.probing import TeacherLabeler, new_probes

STATS = {"action_mean": [0.1] * 4, "action_std": [2.0] * 4, "proprio_mean": [0.0] * 4, "proprio_std": [1.0] * 4}


@pytest.fixture()
def stages(tmp_path):
    cfg = load_config(None, [f"run.run_dir={tmp_path}", "collect.image_size=32", "model.patch_size=8",
                             "model.hidden_size=32", "model.num_layers=3"])
    torch.manual_seed(0)
    teacher = VLA(teacher_config(cfg.model, [32, 32, 3], 4, 4))
    digest = save_policy(teacher, str(RunPaths.of(cfg).teacher), PolicyCard(normalizer=STATS))
    save_probes(new_probes(teacher, cfg.model), str(RunPaths.of(cfg).probes), {"teacher_hash": digest})
    return cfg, digest


def _rows(n, rng):
    return {"episode_id": np.array([f"reach-v3/s{i:06d}" for i in range(n)]), "step": np.arange(n),
            "task": np.array(["reach-v3"] * n), "instruction": np.array(["reach the goal"] * n),
            "image": rng.integers(0, 255, (n, 32 * 32 * 3), dtype=np.uint8),
            "proprio": rng.normal(size=(n, 4)).astype(np.float32),
            "action": rng.normal(size=(n, 4)).astype(np.float32), "done": np.zeros(n, dtype=bool)}


def test_online_targets_are_the_cached_labels(stages):
    cfg, digest = stages
    teacher_uri, probes_uri = str(RunPaths.of(cfg).teacher), str(RunPaths.of(cfg).probes)
    rows = _rows(6, np.random.default_rng(0))
    labelled = TeacherLabeler(teacher_uri, probes_uri, digest, (32, 32, 3))(rows)

    teacher, _ = load_policy(teacher_uri)
    probes, _ = load_probes(probes_uri)
    frozen, _ = load_probes(probes_uri)
    objective = StudentObjective(DistillModule(derive_student(teacher, 8), probes), cfg.router, cfg.distill,
                                 teacher, frozen)
    objective.train()                               # training mode must not reach the frozen teacher
    assert not objective.teacher.training and objective.distill.training

    b = to_model_batch(rows, Normalizer.from_dict(STATS), (32, 32, 3))
    sem, act, action = objective.online_targets(b["images"], b["instructions"], b["proprio"])   # L x B x *
    np.testing.assert_allclose(sem.transpose(0, 1).reshape(6, -1).numpy(), labelled["teacher_sem"], atol=1e-5)
    np.testing.assert_allclose(act.transpose(0, 1).reshape(6, -1).numpy(), labelled["teacher_act"], atol=1e-5)
    np.testing.assert_allclose(action.numpy(), labelled["teacher_action"], atol=1e-5)
    with torch.no_grad():   # the teacher's own output, as deployed
        deployed = teacher(b["images"], b["instructions"], b["proprio"]).actions
    np.testing.assert_allclose(labelled["teacher_action"], deployed.numpy(), atol=1e-5)
    assert not any(p.requires_grad for p in objective.teacher.parameters())


def test_probes_of_another_teacher_are_refused(stages):
    cfg, digest = stages
    check_probes(str(RunPaths.of(cfg).probes), digest)
    with pytest.raises(ValueError, match=f"trained on teacher {digest}.*is ffff.*probe-teacher"):
        check_probes(str(RunPaths.of(cfg).probes), "ffff")
    with pytest.raises(FileNotFoundError, match="probes.json.*probe-teacher"):
        check_probes(str(RunPaths.of(cfg).root / "nothing"), digest)
