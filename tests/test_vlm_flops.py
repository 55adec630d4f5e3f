"""FLOPs of a VLM teacher by part (vision tower, projector, decoder, head) against torch's FlopCounterMode on tiny
LLaVA, PaliGemma and Idefics3 folders; the real-size VLM variants on the meta device; the per-part FLOPs in
evaluate's report."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import ModelSection
from pipeline.evaluate.flops import policy_flops, vit_flops
from pipeline.evaluate.report import EvaluationReport, PolicyReport, summary_table
from pipeline.models.student import derive_student
from pipeline.models.tiny_vlm import DEFAULT_IMAGE_SIZE, build_tiny_vlm
from pipeline.models.variants import size_on_meta, vlm_variant_config
from pipeline.models.vla import VLA, teacher_config

FAMILIES = ["llava", "paligemma", "idefics3"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    out = {}
    for family in FAMILIES:
        section = ModelSection(pretrained_vlm=str(build_tiny_vlm(root / family, family)), max_instruction_tokens=8)
        out[family] = VLA(teacher_config(section, [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3], 4, 4)).eval()
    return out


def _counted(model, **kwargs):
    """torch's count of one batch-1 call, attention on sdpa's math kernel (two bmm: CPU's fused kernel counts 0)."""
    images = torch.rand(1, 3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        out = model(images, ["open the drawer"], torch.zeros(1, 4), **kwargs)
    return counter, out


def _part(counter, prefix):
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name == prefix)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_part_of_a_vlm_teacher_matches_torchs_flop_counter(teachers, family):
    # Exact (tolerance 0): every matrix product is counted on both sides; norms, activations, softmax on neither.
    teacher = teachers[family]
    counter, _ = _counted(teacher)
    flops = policy_flops(teacher.cfg, float(teacher.cfg.num_layers))
    projector = "connector" if family == "idefics3" else "projector"
    assert _part(counter, "VLA.vision.tower") == flops["vision_tower"] > 0
    assert _part(counter, f"VLA.vision.{projector}") == flops["projector"] > 0
    assert _part(counter, "VLA.backbone") == flops["backbone"]
    assert counter.get_total_flops() == flops["total"]
    assert flops["vision"] == flops["vision_tower"] + flops["projector"]


@pytest.mark.parametrize("kind", ["clip", "siglip_with_head"])
def test_a_clip_class_token_and_a_siglip_pooling_head_are_counted(kind):
    # The tiny folders' towers are SigLIP without head; LLaVA-1.5's is CLIP (a class token), a SigLIP may keep its head.
    from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                 image_size=32)
    config = CLIPVisionConfig(**sizes) if kind == "clip" else SiglipVisionConfig(**sizes, vision_use_head=True)
    tower = (CLIPVisionModel if kind == "clip" else SiglipVisionModel)(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        tower(torch.rand(1, 3, 32, 32))
    assert counter.get_total_flops() == vit_flops(config, 32, 32)


def test_a_routed_vlm_student_counts_the_layers_it_ran_and_its_router(teachers):
    student = derive_student(teachers["llava"], router_hidden=16).eval()
    torch.nn.init.normal_(student.router.out.weight, std=3.0)
    counter, out = _counted(student, mode="hard")
    executed = float(out.executed.sum())
    assert 0 < executed < student.cfg.num_layers, "the test needs a call that skips some layers"
    assert counter.get_total_flops() == policy_flops(student.cfg, executed, 16)["total"]


# (parameters of our VLA: lower, upper bound), and the published checkpoint's count the VLA's own add up to once its
# proprio + action head (ours) are swapped for the LM head (theirs; tied in Gemma: none).
SIZES = {"llava-7b": ((6.9e9, 7.0e9), 7.06e9, 32064 * 4096), "paligemma-3b": ((2.9e9, 2.95e9), 2.92e9, 0),
         "smolvlm-2b": ((2.1e9, 2.2e9), 2.25e9, 49155 * 2048)}


@pytest.mark.parametrize("name", list(SIZES))
def test_vlm_variants_are_sized_from_the_modules_built_on_the_meta_device(name):
    cfg = vlm_variant_config(name, max_instruction_tokens=12, proprio_dim=39, action_dim=4)
    with torch.device("meta"):
        model = VLA(cfg)
    sized = size_on_meta(cfg)
    assert sized["params_total"] == sum(p.numel() for p in model.parameters())
    assert sized["params_vision_tower"] == sum(p.numel() for p in model.vision.tower.parameters())
    parts = ("params_vision_tower", "params_projector", "params_backbone", "params_head")
    assert sum(sized[k] for k in parts) == sized["params_total"]
    (low, high), published, lm_head = SIZES[name]
    assert low < sized["params_total"] < high
    assert sized["params_total"] - sized["params_head"] + lm_head == pytest.approx(published, rel=0.005)
    assert sized["flops_vision"] == sized["flops_vision_tower"] + sized["flops_projector"] > 0


def test_the_plan_of_a_vlm_variant_prints_its_split(capsys, tmp_path):
    from pipeline import plan

    code = plan.main(["--config", "infra/configs/cluster.yaml", "--variant", "llava-7b", "--gpus", "8",
                      "--gpu-memory-gib", "80", "--out", str(tmp_path / "ds.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "vision tower 303.5 M, projector 21.0 M, decoder 6,607.6 M" in out
    assert "576 image tokens (llava, 336px / 14)" in out
    assert "(vision tower 0.382 TFLOPs, projector 0.024 TFLOPs" in out
    # The frozen vision tower and projector hold weights only: no gradients, master copy or AdamW state.
    assert "frozen in the trained model                324.5 M" in out


@pytest.mark.parametrize("train_vision", [False, True])
def test_the_plan_trains_a_vlms_vision_tower_only_with_train_vision(train_vision):
    from pipeline import plan
    from pipeline.config import load_config

    cfg = load_config("infra/configs/cluster.yaml")
    vla = vlm_variant_config("llava-7b", 12, 39, 4)
    vla = vla.model_copy(update={"vlm": vla.vlm.model_copy(update={"train_vision": train_vision})})
    params = plan.count_params(vla, cfg.model, cfg.router.hidden, "distill")
    vision = params.vision_tower + params.projector
    assert params.held == (0 if train_vision else vision)
    assert params.trained + params.held == params.teacher + params.router + params.probes
    option = plan.Option(name="ZeRO-3", stage=3)
    from pipeline.train.engine import deepspeed_config

    ds_config = deepspeed_config(cfg.distill.train.model_copy(update={"zero_stage": 3}), "cuda", vla.hidden_size)
    states = plan.state_memory(option, params, plan.Cluster(gpus=8, gpu_memory_gib=80, gpus_per_node=8), ds_config,
                               online=False)
    # weights: every parameter in bf16, sharded 8 ways; the optimizer's fp32 state: the trained ones only
    assert states.weights == pytest.approx(2 * (params.trained + params.held) / 8)
    assert states.adam == pytest.approx(8 * params.trained / 8)


def test_a_report_of_a_vlm_policy_carries_its_flops_by_part(teachers):
    cfg = teachers["paligemma"].cfg
    flops = policy_flops(cfg, float(cfg.num_layers))
    policy = PolicyReport(success=0.5, episodes=2, ci95=(0.1, 0.9), per_task={}, executed_fraction=1.0,
                          layer_frequency=[1.0] * cfg.num_layers, flops=flops, action_mse_norm=0.1,
                          action_mse_raw=0.1, heldout_rows=8, latency_ms_median=1.0, latency_ms_p90=1.0)
    report = EvaluationReport(tasks=[], seeds=[0], max_steps=1, policies={"teacher": policy})
    again = EvaluationReport.model_validate_json(report.to_json())
    metrics = again.flat_metrics()
    assert metrics["teacher/flops_vision_tower"] == flops["vision_tower"] > 0
    assert metrics["teacher/flops_projector"] == flops["projector"] > 0
    assert f"- teacher: vision tower {flops['vision_tower'] / 1e6:.2f}, projector" in summary_table(again)
