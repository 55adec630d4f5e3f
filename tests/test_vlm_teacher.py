"""A pretrained vision-language model as the teacher: tiny random-weight LLaVA, PaliGemma and Idefics3 folders
(save_pretrained layout, built offline) become VLAs whose prompt states are the library's own, whose checkpoints
rebuild them without the folder, and whose vision tower is frozen unless asked; bad configs and folders fail
before any Ray work, naming the key or tensor."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.cli import check_inputs
from pipeline.config import ConfigError, ModelSection, load_config
from pipeline.models.checkpoint import PolicyCard, load_policy, save_policy
from pipeline.models.student import derive_student
from pipeline.models.tiny_vlm import DEFAULT_IMAGE_SIZE, build_tiny_vlm
from pipeline.models.vla import VLA, teacher_config
from pipeline.models.vlm_backbone import load_vlm_weights, pixel_values
from pipeline.models.vlm_import import VLM_FAMILIES, decoder_hidden_states, load_vlm_parts, prepare_inputs

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["llava", "paligemma", "idefics3"]
INSTRUCTIONS = ["push the puck to the goal", "open the drawer", "reach to the goal position and an unseen word"]
MAX_TOKENS = 12
NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
              "proprio_std": [1.0] * 4}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: build_tiny_vlm(root / family, family) for family in FAMILIES}


def _teacher(folder, **model):
    section = ModelSection(pretrained_vlm=str(folder), max_instruction_tokens=MAX_TOKENS, **model)
    vla = VLA(teacher_config(section, [DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3], 4, 4)).eval()
    load_vlm_weights(vla, str(folder))
    return vla


@pytest.fixture(scope="module")
def teachers(folders):
    return {family: _teacher(folder) for family, folder in folders.items()}


def _frames(batch=len(INSTRUCTIONS)):
    return np.random.default_rng(0).integers(0, 256, (batch, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3),
                                             dtype=np.uint8)


def _inputs(batch=len(INSTRUCTIONS)):
    """What to_model_batch hands the policy: float frames in [0, 1], instructions, proprio."""
    images = torch.from_numpy(_frames(batch).astype(np.float32)).permute(0, 3, 1, 2).div_(255.0)
    return images, INSTRUCTIONS[:batch], torch.randn(batch, 4, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_prompt_states_are_the_librarys_own_model(folders, teachers, family):
    """Router forced open: at every image and text position (before proprio and the action query) the decoder's
    last hidden state is what the library's model computes from the processor's inputs, one sample at a time."""
    vla, parts = teachers[family], load_vlm_parts(str(folders[family]))
    images, instructions, proprio = _inputs()
    processed = prepare_inputs(parts, _frames(), instructions)
    ours = pixel_values(vla.cfg.vlm, images)
    torch.testing.assert_close(ours, processed["pixel_values"].reshape(ours.shape), atol=1e-6, rtol=0)
    tokens, mask, vision, text, text_mask = vla.embed(images, instructions, proprio)
    assert vision.shape == (3, parts.num_image_tokens, parts.hidden_size) and tokens.shape[1] == vla.cfg.seq_len
    states = vla.backbone(inputs_embeds=tokens, **vla.decoder_inputs(mask, tokens.dtype)).last_hidden_state
    for i, instruction in enumerate(instructions):
        alone = prepare_inputs(parts, _frames()[i:i + 1], [instruction])
        reference = decoder_hidden_states(parts, alone)[0]
        library = parts.model.model(**alone).last_hidden_state[0]
        n = reference.shape[0]
        assert torch.equal(vla.instruction_ids([instruction])[0][0, :n], alone["input_ids"][0])
        assert mask[i, :n].all() and not mask[i, n:-2].any()        # the prompt, its padding, proprio + query
        assert int(text_mask[i].sum()) == n - parts.num_image_tokens
        torch.testing.assert_close(states[i, :n], reference, atol=1e-5, rtol=0)
        torch.testing.assert_close(states[i, :n], library, atol=1e-5, rtol=0)
    assert torch.isfinite(vla(images, instructions, proprio).actions).all()


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_export_and_reload_give_the_same_actions_without_the_folder(folders, tmp_path, family):
    source = shutil.copytree(folders[family], tmp_path / "source")
    teacher = _teacher(source)
    student = derive_student(teacher, router_hidden=8).eval()
    for name, policy in (("teacher", teacher), ("student", student)):
        save_policy(policy, str(tmp_path / name), PolicyCard(normalizer=NORMALIZER))
    shutil.rmtree(source)                                   # probing, distill and serving never see it again
    x = _inputs()
    for name, policy in (("teacher", teacher), ("student", student)):
        reloaded, _ = load_policy(str(tmp_path / name))
        assert reloaded.cfg == policy.cfg and reloaded.cfg.vlm.family == family
        assert torch.equal(reloaded.instruction_ids(INSTRUCTIONS)[0], teacher.instruction_ids(INSTRUCTIONS)[0])
        for mode in ("off", "hard"):
            torch.testing.assert_close(reloaded(*x, mode=mode).actions, policy(*x, mode=mode).actions, atol=0, rtol=0)
    weights = load_file(tmp_path / "teacher" / "model.safetensors")
    assert any(k.startswith("vision.") for k in weights) and "backbone.layers.0.layer.mlp.up_proj.weight" in weights


@pytest.mark.parametrize("family", FAMILIES)
def test_the_vision_tower_is_frozen_unless_train_vision(folders, teachers, family):
    frozen = teachers[family]
    assert not any(p.requires_grad for p in frozen.vision.parameters())
    assert all(p.requires_grad for p in frozen.backbone.parameters())
    assert frozen.action_head[0].weight.requires_grad and frozen.action_query.requires_grad
    trained = _teacher(folders[family], train_vision=True)
    assert all(p.requires_grad for p in trained.vision.parameters())
    theirs = frozen.vision.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in trained.vision.state_dict().items())
    # The choice travels with the teacher, so a student derived from it (distill) freezes the same parameters.
    assert not any(p.requires_grad for p in derive_student(frozen, router_hidden=8).vision.parameters())


def test_a_long_instruction_is_cut_at_the_end_of_the_prompt(teachers):
    vla = teachers["llava"]
    ids, mask = vla.instruction_ids(["open the drawer " * 20])
    assert ids.shape == (1, vla.cfg.seq_len - 2) and mask.all()
    assert int((ids == vla.cfg.vlm.image_token_id).sum()) == vla.cfg.vlm.num_image_tokens


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_an_unmapped_or_missing_tensor_is_an_error_naming_it(folders, tmp_path):
    extra = shutil.copytree(folders["llava"], tmp_path / "extra")
    _edit_weights(extra, lambda t: t.update({"vision_tower.head.weight": torch.ones(4)}))
    with pytest.raises(ValueError, match=r"map to nothing in the llava model: vision_tower\.head\.weight"):
        _teacher(extra)
    missing = shutil.copytree(folders["idefics3"], tmp_path / "missing")
    _edit_weights(missing, lambda t: t.pop("model.connector.modality_projection.proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.connector\.modality_projection\.proj\.weight"):
        _teacher(missing)


def test_config_names_both_pretrained_keys_and_a_lone_train_vision(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.pretrained_vlm=/a/vlm", "model.pretrained_backbone=/a/llama"])
    assert "model.pretrained_vlm='/a/vlm'" in str(err.value) and "model.pretrained_backbone='/a/llama'" in str(err.value)
    with pytest.raises(ConfigError, match="model.train_vision=true: only a model.pretrained_vlm"):
        load_config(None, ["model.train_vision=true"])
    # A VLM brings its own patch size: model.patch_size no longer has to divide the frames.
    assert load_config(None, ["model.pretrained_vlm=/a/vlm", "model.patch_size=7"]).model.train_vision is False


def test_a_bad_folder_fails_before_any_ray_work(folders, tmp_path):
    folder = shutil.copytree(folders["llava"], tmp_path / "qwen")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_5_vl"}))
    cfg = load_config(REPO / "jobs" / "configs" / "smoke.yaml", [f"model.pretrained_vlm={folder}",
                                                                 f"run.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as err:
        check_inputs(cfg, "train-teacher")
    assert "model.pretrained_vlm=" in str(err.value) and all(name in str(err.value) for name in VLM_FAMILIES)
    # run collects at collect.image_size: a processor of another size is refused before collecting.
    cfg = load_config(REPO / "jobs" / "configs" / "smoke.yaml", [f"model.pretrained_vlm={folders['paligemma']}",
                                                                 "collect.image_size=32"])
    with pytest.raises(ConfigError, match=r"expects 64x64 images but the shards hold 32x32.*collect.image_size=64"):
        check_inputs(cfg, "run")
    check_inputs(load_config(REPO / "jobs" / "configs" / "smoke.yaml",
                             [f"model.pretrained_vlm={folders['idefics3']}"]), "run")
    # A tokens head with more bins than the vocabulary has rows to start them from.
    cfg = load_config(REPO / "jobs" / "configs" / "smoke.yaml", [f"model.pretrained_vlm={folders['llava']}",
                                                                 "model.action_head=tokens"])
    with pytest.raises(ConfigError, match=r"model.action_bins=256 exceeds its vocabulary \(36 tokens\).*at most 36"):
        check_inputs(cfg, "train-teacher")


@pytest.fixture(scope="module")
def episode_shards(tmp_path_factory):
    """Meta-World expert episodes at 32 px, shared by the end-to-end runs; the Ray instance they start is shut
    down after the last one (one instance for all of them: a start costs seconds on 2 cores)."""
    import ray

    from pipeline.data.shards import write_shards
    from pipeline.sim.metaworld_env import run_expert_episode

    shards = tmp_path_factory.mktemp("vlm-shards")
    write_shards([run_expert_episode(task, seed, 32, "corner", 25) for task in ("reach-v3", "push-v3")
                  for seed in (0, 1)], str(shards), rows_per_shard=50)
    yield shards
    ray.shutdown()


def _folder_tensor(spec, folder_tensors, library_name):
    """The folder's tensor that the library (and so our VLA) calls library_name, whatever the folder's layout."""
    from pipeline.models.vlm_backbone import library_key

    (tensor,) = [t for k, t in folder_tensors.items() if library_key(spec, k) == library_name]
    return tensor


@pytest.mark.slow
@pytest.mark.parametrize("family, head", [("llava", "regression"), ("paligemma", "tokens"),
                                          ("idefics3", "regression")])
def test_a_vlm_teacher_runs_through_probe_distill_and_evaluate_without_its_folder(episode_shards, tmp_path,
                                                                                 family, head):
    """The real jobs (Ray Train + DeepSpeed, Ray Data, Meta-World) on a tiny VLM of each family at 32 px:
    train-teacher reads the folder; probe-teacher, distill and evaluate run after it is deleted. The frozen vision
    tower leaves training exactly as the folder had it. PaliGemma runs with the tokens action head: its student is
    a tokens policy too, and the clipped action values reach MLflow."""
    from mlflow import MlflowClient

    from jobs import distill as distill_job
    from jobs import evaluate as evaluate_job
    from jobs import probe_teacher as probe_teacher_job
    from jobs import train_teacher as train_teacher_job

    folder = build_tiny_vlm(tmp_path / f"tiny-{family}", family, image_size=32)
    start = load_file(folder / "model.safetensors")
    run_dir = tmp_path / "run"
    overrides = [f"run.run_dir={run_dir}", f"data.shards_uri={episode_shards}", f"model.pretrained_vlm={folder}",
                 f"model.action_head={head}", "model.action_bins=16",   # at most the tiny vocabulary
                 "data.val_fraction=0.25", "collect.image_size=32", "teacher.steps=4", "teacher.warmup_steps=0",
                 "teacher.batch_size=8", "teacher.log_every=2", "probe.steps=4", "probe.batch_size=8",
                 "distill.train.steps=4", "distill.train.warmup_steps=0", "distill.train.batch_size=8",
                 "distill.eval_every=2", "evaluate.episodes_per_task=1", "evaluate.max_steps=10",
                 "evaluate.latency_calls=3", "evaluate.num_workers=1", "evaluate.envs_per_worker=2",
                 "teacher.num_workers=1", "distill.train.num_workers=1"]   # 2 small cores: one worker each
    cfg = load_config(REPO / "jobs" / "configs" / "vlm-smoke.yaml", overrides)
    # In this process, on one Ray instance (a subprocess per job cost ~20 s of start-up each).
    for job in (train_teacher_job, probe_teacher_job, distill_job, evaluate_job):
        job.main(cfg)
        if job is train_teacher_job:
            shutil.rmtree(folder)
    teacher, _ = load_policy(str(run_dir / "teacher"))
    spec = teacher.cfg.vlm
    assert spec.family == family and teacher.cfg.action_head == head
    ours = {library: teacher.state_dict()[name] for library, name in teacher.library_names.items()}
    (patch,) = [k for k in ours if k.endswith("embeddings.patch_embedding.weight")]
    assert torch.equal(ours[patch], _folder_tensor(spec, start, patch))   # frozen
    (layer,) = [k for k in ours if k.endswith("layers.1.mlp.down_proj.weight")]   # the decoder's (SigLIP: fc1/fc2)
    assert not torch.equal(ours[layer], _folder_tensor(spec, start, layer))   # trained
    student, _ = load_policy(str(run_dir / "student"))
    assert student.cfg.vlm == spec and student.router is not None and student.cfg.action_head == head
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert {"teacher", "student"} <= set(report["policies"])
    if head == "tokens":
        client = MlflowClient(cfg.tracking_uri)
        runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
        (train,) = [r for r in runs if r.data.tags.get("stage") == "train-teacher"]
        clipped = client.get_metric_history(train.info.run_id, "train/clipped_action_values")
        assert len(clipped) == 2 and all(m.value >= 0 for m in clipped)
