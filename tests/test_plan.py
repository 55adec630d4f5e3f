"""`actdistill plan`: 7B sizing on the meta device, ZeRO memory vs DeepSpeed's estimators, the written config."""

import json
import time

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from pipeline import plan
from pipeline.config import load_config
from pipeline.models.graph import ProbeSet
from pipeline.models.student import DistillModule, derive_student
from pipeline.models.variants import hf_checkpoint_params
from pipeline.models.vla import VLA, VLAConfig

CLUSTER_YAML = "infra/configs/cluster.yaml"
SMOKE = "jobs/configs/smoke.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(CLUSTER_YAML)


@pytest.fixture(scope="module")
def plan_8x80(cfg):
    started = time.perf_counter()
    result = plan.make_plan(cfg, plan.make_cluster(8, 80), "llama2-7b")
    assert time.perf_counter() - started < 30          # ~1 s of work; generous for a shared CPU
    return result


def count(module):
    return sum(t.numel() for t in module.parameters())


def test_the_7b_plan_counts_the_parameters_of_the_modules_the_jobs_build(cfg, plan_8x80):
    # Built on the meta device the way the jobs build them: train-teacher's VLA, distill's derive_student
    # of it, probe-teacher's new_probes, and what distill's optimizer updates (DistillModule).
    from pipeline.teacher.probing import new_probes

    with torch.device("meta"):
        teacher = VLA(plan_8x80.vla)
        student = derive_student(teacher, cfg.router.hidden)
        probes = new_probes(teacher, cfg.model)
        trained = DistillModule(student, probes)
    p = plan_8x80.params
    assert (p.teacher, p.decoder, p.router, p.probes, p.trained) == (
        count(teacher), count(teacher.backbone), count(student.router), count(probes), count(trained))
    # Meta's published Llama-2-7B size; ours drops the LM head (32000 x 4096) and keeps the embedding.
    assert hf_checkpoint_params("llama2-7b") == 6_738_415_616
    assert p.decoder == 6_738_415_616 - 32000 * 4096
    assert 6.6e9 < p.trained < 6.7e9 and p.probes < 0.01 * p.trained   # graph width 128 keeps probes small
    # DeepSpeed's largest layer: the most parameters one module holds itself (the instruction embedding).
    own = max(sum(t.numel() for t in m.parameters(recurse=False)) for m in trained.modules())
    assert p.largest_layer == own == 32000 * 4096
    assert plan_8x80.flops["train_step"] == pytest.approx(
        3 * (plan_8x80.flops["student_forward"] + plan_8x80.flops["probes_forward"]))
    assert plan_8x80.choice.option.stage == 2 and plan_8x80.deepspeed["zero_optimization"]["stage"] == 2


def test_zero3_memory_falls_with_gpus_below_zero2_and_matches_deepspeeds_estimators(plan_8x80):
    params, ds = plan_8x80.params, plan.planned_deepspeed_config(plan_8x80.train, plan.OPTIONS[1], 64)
    zero2, zero3 = plan.OPTIONS[:2]
    previous = float("inf")
    for gpus in (2, 4, 8, 16, 64):
        cluster = plan.make_cluster(gpus, 80)
        s2 = plan.state_memory(zero2, params, cluster, ds, online=False)
        s3 = plan.state_memory(zero3, params, cluster, ds, online=False)
        assert s3.gpu < s2.gpu and s3.gpu < previous
        previous = s3.gpu
        # ZeRO-2: our terms are DeepSpeed's 2P + 18P/N plus the reduce bucket it leaves out.
        assert s2.gpu - s2.buffers == pytest.approx(s2.deepspeed_gpu, rel=1e-6)
        # ZeRO-3: DeepSpeed counts 18P/N + 4 x largest layer; we add the 2-byte weight shard it omits,
        # the prefetch and the reduce buckets.
        assert s3.gpu - s3.deepspeed_gpu == pytest.approx(
            2 * params.trained / gpus + s3.buffers - 4 * params.largest_layer, rel=1e-6)


def test_the_written_deepspeed_config_loads_in_deepspeed_with_the_chosen_stage(tmp_path, capsys):
    out = tmp_path / "ds.json"
    code = plan.main(["--config", CLUSTER_YAML, "--variant", "llama2-7b", "--gpus", "4", "--gpu-memory-gib", "24",
                      "--cpu-memory-gib", "512", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "FITS (cached): ZeRO-3+opt at micro-batch 32 x 2" in printed
    loaded = DeepSpeedConfig(str(out))
    assert loaded.zero_optimization_stage == 3
    assert loaded.zero_config.offload_optimizer.device == "cpu"
    assert loaded.bfloat16_config.enabled
    assert loaded.train_micro_batch_size_per_gpu == 32 and loaded.gradient_accumulation_steps == 2
    # The plan is for GPUs: with optimizer offload the config names DeepSpeed's own (CPU) AdamW, as make_engine
    # builds it on GPUs; ZeRO-3's buckets are sized from the 4096-wide decoder, not DeepSpeed's fixed defaults.
    written = json.loads(out.read_text())
    assert written["optimizer"]["type"] == "AdamW" and "zero_force_ds_cpu_optimizer" not in written
    assert written["zero_optimization"]["reduce_bucket_size"] == 4096 * 4096


def test_an_impossible_cluster_is_reported_with_its_figures(tmp_path, capsys):
    out = tmp_path / "ds.json"
    code = plan.main(["--config", CLUSTER_YAML, "--variant", "llama2-7b", "--gpus", "1", "--gpu-memory-gib", "8",
                      "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and not out.exists()
    assert "DOES NOT FIT (cached)" in printed and "of 7.2 GiB usable per GPU" in printed
    assert "needs >= 21 GPUs of 8 GiB" in printed and "--cpu-memory-gib" in printed


def test_an_unknown_variant_lists_the_choices(capsys):
    code = plan.main(["--variant", "llama3-70b", "--gpus", "8", "--gpu-memory-gib", "80"])
    assert code == 2
    assert "unknown variant 'llama3-70b'; choose from llama2-7b, qwen2-1.5b, mistral-7b, llava-7b, paligemma-3b, smolvlm-2b" in capsys.readouterr().err


def test_a_bad_cluster_names_the_flag_and_a_fix():
    with pytest.raises(ValueError, match=r"--gpus-per-node=8: must divide --gpus=12, e.g. 6"):
        plan.make_cluster(12, 80, gpus_per_node=8)


def _saved_bytes_per_layer(layers, probes_on, **dims):
    """Bytes autograd saves for a bf16 forward of a tiny student (+ probes) on CPU, parameters excluded."""
    torch.manual_seed(0)
    vla = VLAConfig(num_layers=layers, **dims)
    student = VLA(vla)
    model = DistillModule(student, ProbeSet(layers, vla.hidden_size, 16, 8, 8, 4, vla.action_dim)).to(torch.bfloat16)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen.setdefault(key, t.untyped_storage().nbytes())
        return t

    batch = 3
    x = (torch.rand(batch, 3, vla.image_size, vla.image_size, dtype=torch.bfloat16), ["push the puck"] * batch,
         torch.randn(batch, vla.proprio_dim, dtype=torch.bfloat16))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (model if probes_on else student)(*x, mode="straight_through", threshold=0.5)
    return sum(seen.values()) / batch


def test_the_activation_estimate_matches_what_autograd_saves():
    dims = dict(backbone="llama", hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=176, vocab_size=50,
                max_instruction_tokens=6, image_size=32, patch_size=8, proprio_dim=4, action_dim=4, router_hidden=8)
    model = load_config(None, ["model.graph_width=16", "model.semantic_dim=8", "model.top_k=8",
                               "model.graph_heads=4"]).model
    vla = VLAConfig(num_layers=2, **dims)
    for probes_on in (False, True):
        measured = (_saved_bytes_per_layer(3, probes_on, **dims) - _saved_bytes_per_layer(1, probes_on, **dims)) / 2
        estimate = vla.seq_len * plan.decoder_layer_bytes_per_token(vla, gated=True)
        if probes_on:
            estimate += plan.probe_bytes_per_sample(vla, model)
        assert estimate == pytest.approx(measured, rel=0.02)


SEVEN_B_WIDE = ["model.hidden_size=4096", "model.intermediate_size=11008", "model.num_heads=32",
                "model.num_kv_heads=32", "model.vocab_size=32000", "model.num_layers=2", "collect.image_size=32",
                "model.patch_size=8", "model.max_instruction_tokens=8", "distill.teacher_mode=online",
                "distill.train.batch_size=1", "distill.train.precision=fp32"]


def test_the_cpu_plan_shards_model_states_under_zero3_and_refuses_a_machine_too_small(capsys):
    """bench/scale.py's config: 2 layers of 7B width, 2 CPU workers, online teacher."""
    cfg = load_config(SMOKE, SEVEN_B_WIDE + ["distill.train.zero_stage=3"])
    zero3 = plan.cpu_plan(cfg, (32, 32, 3), 4, 4)
    whole = plan.cpu_plan(load_config(SMOKE, SEVEN_B_WIDE + ["distill.train.zero_stage=0"]), (32, 32, 3), 4, 4)
    p = zero3.params.trained
    # fp32 ZeRO-3 on 2 workers: 4 bytes of weights, 4 of gradients and 8 of AdamW per trained parameter, halved;
    # the frozen teacher's 4 bytes halved too; no master copy in fp32.
    assert zero3.breakdown["weights"] == zero3.breakdown["gradients"] == 2 * p
    assert zero3.breakdown["adam"] == 4 * p and zero3.breakdown["master"] == 0
    assert zero3.breakdown["frozen teacher"] == 2 * zero3.params.frozen
    assert zero3.export == 4 * (zero3.params.teacher + zero3.params.router)
    states = ("weights", "gradients", "adam", "frozen teacher")
    # Unsharded (ZeRO-0) every worker holds all 16 bytes per trained parameter and the whole frozen teacher.
    assert sum(whole.breakdown[k] for k in states) == 2 * sum(zero3.breakdown[k] for k in states)

    base = ["--device", "cpu", "--config", SMOKE, *SEVEN_B_WIDE, "distill.train.zero_stage=3"]
    assert plan.main([*base[:4], "--cpu-memory-gib", "24", *base[4:]]) == 0
    assert plan.main([*base[:4], "--cpu-memory-gib", "12", *base[4:]]) == 1
    printed = capsys.readouterr().out
    assert "rank 0 (+ export)" in printed and "DOES NOT FIT" in printed and "--cpu-memory-gib=12" in printed


def test_a_gpu_plan_whose_nodes_lack_the_ram_is_refused_naming_it(tmp_path, capsys):
    code = plan.main(["--config", CLUSTER_YAML, "--variant", "llama2-7b", "--gpus", "8", "--gpu-memory-gib", "80",
                      "--cpu-memory-gib", "16", "--out", str(tmp_path / "ds.json")])
    printed = capsys.readouterr().out
    assert code == 1 and not (tmp_path / "ds.json").exists()
    assert "host RAM per node" in printed
    assert "DOES NOT FIT (cached): the nodes' RAM" in printed and "--cpu-memory-gib=16" in printed
