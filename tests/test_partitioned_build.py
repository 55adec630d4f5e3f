"""ZeRO-3 builds partitioned: on 2 real DeepSpeed ranks (gloo, no Ray) the distill objective is constructed already
split over the ranks, filled from the mapped teacher and probe files, and exported on rank 0 only; plus the mapped
safetensors reader against the library's own."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from pipeline.config import load_config
from pipeline.models.checkpoint import PolicyCard, save_policy, save_probes
from pipeline.models.vla import VLA, VLAConfig
from pipeline.models.weights import MappedSafetensors
from pipeline.teacher.probing import new_probes

TEACHER = VLAConfig(backbone="llama", hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=128, vocab_size=300, max_instruction_tokens=8, image_size=32, patch_size=8,
                    proprio_dim=4, action_dim=4)
NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4, "proprio_std": [1.0] * 4}


def test_mapped_safetensors_reads_what_the_library_reads(tmp_path):
    tensors = {"w": torch.randn(3, 5), "h": torch.randn(7).to(torch.bfloat16), "ids": torch.arange(4),
               "empty": torch.zeros(0, 2), "flag": torch.tensor([True, False])}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    mapped, theirs = MappedSafetensors(tmp_path / "x.safetensors"), load_file(tmp_path / "x.safetensors")
    assert sorted(mapped.names()) == sorted(theirs)
    for name, value in theirs.items():
        assert mapped.shape(name) == tuple(value.shape)
        assert mapped.tensor(name).dtype == value.dtype and torch.equal(mapped.tensor(name), value)


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04 a zip, e.g. a torch.save file")
    with pytest.raises(ValueError, match=r"model\.safetensors is not a safetensors file"):
        MappedSafetensors(tmp_path / "model.safetensors")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, folder: str, precision: str, out: str) -> None:
    """One DeepSpeed rank: the distill job's own objective builder, then its export."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from pipeline.distill.fit import StudentJob, _student_objective
    from pipeline.models.checkpoint import read_policy_config
    from pipeline.train.engine import close_engine, full_state_dict, init_worker, make_engine

    cfg = load_config(None, ["distill.teacher_mode=online", "distill.train.zero_stage=3",
                             f"distill.train.precision={precision}", "distill.train.batch_size=2"])
    card = read_policy_config(f"{folder}/teacher")
    job = StudentJob(router=cfg.router, distill=cfg.distill, teacher_uri=f"{folder}/teacher", teacher_hash=card.hash,
                     probes_uri=f"{folder}/probes", image_shape=(32, 32, 3), card=card, tracking=None, seed=0)
    device = torch.device("cpu")
    init_worker(device)
    torch.manual_seed(0)
    objective, _ = _student_objective(job, device)
    report = {"local": sum(p.ds_tensor.numel() for p in objective.parameters()),
              "whole_tensors": sum(p.numel() for p in objective.parameters()),
              "total": sum(p.ds_numel for p in objective.parameters()),
              "teacher_frozen": not any(p.requires_grad for p in objective.teacher.parameters()),
              "dtypes": sorted({str(p.ds_tensor.dtype) for p in objective.parameters()})}
    engine, _ = make_engine(objective, cfg.distill.train, device=device, hidden_size=TEACHER.hidden_size)
    report["student"] = full_state_dict(engine, "distill.student.")
    report["teacher"] = full_state_dict(engine, "teacher.")
    torch.save(report, f"{out}.{rank}")
    close_engine(engine)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("precision", ["bf16"])   # fp32 ZeRO-3 end to end: tests/test_zero3_validation.py
def test_zero3_builds_the_objective_partitioned_and_exports_on_rank0_only(tmp_path, precision):
    torch.manual_seed(1)
    teacher = VLA(TEACHER)
    digest = save_policy(teacher, str(tmp_path / "teacher"), PolicyCard(normalizer=NORMALIZER))
    cfg = load_config(None, [])
    save_probes(new_probes(teacher, cfg.model), str(tmp_path / "probes"), {"teacher_hash": digest})

    mp.spawn(_rank, args=(_free_port(), str(tmp_path), precision, str(tmp_path / "report")), nprocs=2)

    ranks = [torch.load(tmp_path / f"report.{r}", weights_only=True) for r in range(2)]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    for r in ranks:
        # Built split: no parameter is whole anywhere, each rank holds half (plus padding to equal chunks), the
        # online teacher among them, frozen, in the training dtype.
        assert r["whole_tensors"] == 0
        assert r["total"] / 2 <= r["local"] < r["total"] / 2 + 2 * 400
        assert r["teacher_frozen"] and r["dtypes"] == [str(dtype)]
    # The export: rank 0 holds the consolidated student and teacher, the other rank nothing.
    assert ranks[1]["student"] == {} and ranks[1]["teacher"] == {}
    want = {k: v.to(dtype) for k, v in teacher.state_dict().items()}
    student, online_teacher = ranks[0]["student"], ranks[0]["teacher"]
    assert set(student) == set(want) | {k for k in student if k.startswith("router.")}
    assert all(torch.equal(student[k], v) for k, v in want.items()), "the student is not the teacher's weights"
    assert set(online_teacher) == set(want) and all(torch.equal(online_teacher[k], v) for k, v in want.items())


def _vlm_rank(rank: int, port: int, folder: str, out: str) -> None:
    """One DeepSpeed rank of train-teacher's build for a VLM teacher with a tokens head, then its export."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    from pipeline.config import ModelSection
    from pipeline.data.manifest import Stats
    from pipeline.models.tiny_vlm import DEFAULT_IMAGE_SIZE
    from pipeline.models.vla import teacher_config
    from pipeline.models.vlm_backbone import load_vlm_weights
    from pipeline.train.engine import building, close_engine, full_state_dict, init_worker, make_engine

    train = load_config(None, ["teacher.zero_stage=3", "teacher.precision=bf16"]).teacher
    stats = Stats(mean=[0.0] * 4, std=[1.0] * 4, q01=[-1.0] * 4, q99=[1.0] * 4)
    model = ModelSection(pretrained_vlm=folder, action_head="tokens", action_bins=16)
    vla_cfg = teacher_config(model, [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3], 4, 4, stats)
    device = torch.device("cpu")
    init_worker(device)
    with building(train, device, vla_cfg.hidden_size):
        vla = VLA(vla_cfg)
    load_vlm_weights(vla, folder)
    report = {"whole_tensors": sum(p.numel() for p in vla.parameters()),
              "vision_frozen": not any(p.requires_grad for p in vla.vision.parameters()),
              "library_names": vla.library_names}
    engine, _ = make_engine(vla, train, device=device, hidden_size=vla_cfg.hidden_size)
    report["state"] = full_state_dict(engine, "")
    torch.save(report, f"{out}.{rank}")
    close_engine(engine)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_builds_a_vlm_teacher_partitioned_from_its_folder(tmp_path):
    """A tiny LLaVA with a tokens head under ZeRO-3: built split over 2 ranks (the library's in-constructor init
    deferred), every weight streamed in from the folder, and gathered on rank 0 equal to the folder's, the
    tokens head equal to its LM head's last rows."""
    from pipeline.models.tiny_vlm import build_tiny_vlm
    from pipeline.models.vlm_backbone import library_key

    folder = build_tiny_vlm(tmp_path / "llava", "llava")
    mp.spawn(_vlm_rank, args=(_free_port(), str(folder), str(tmp_path / "report")), nprocs=2)

    ranks = [torch.load(tmp_path / f"report.{r}", weights_only=True) for r in range(2)]
    assert all(r["whole_tensors"] == 0 and r["vision_frozen"] for r in ranks)
    assert ranks[1]["state"] == {}
    state, ours = ranks[0]["state"], ranks[0]["library_names"]
    spec = type("Spec", (), {"family": "llava"})()
    folder_tensors = {library_key(spec, k): v for k, v in load_file(folder / "model.safetensors").items()}
    for library, name in ours.items():
        assert torch.equal(state[name], folder_tensors[library].to(torch.bfloat16)), name
    lm_head = folder_tensors["lm_head.weight"]
    assert torch.equal(state["action_head.proj.weight"], lm_head[-16:].flip(0).to(torch.bfloat16))
