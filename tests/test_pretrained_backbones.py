"""Pretrained decoders are the decoders they claim to be: tiny random-weight Llama, Qwen2, Mistral and Gemma
folders (saved with save_pretrained, configs far from our defaults) give the library's own hidden states inside
our VLA, read instructions with their own tokenizer, and survive our checkpoints without the original folder."""

import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModel,
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pipeline.config import ModelSection
from pipeline.models.backbones import BACKBONES
from pipeline.models.checkpoint import PolicyCard, load_policy, save_policy
from pipeline.models.hf_import import load_hf_backbone, pretrained_dims, read_hf_config
from pipeline.models.student import derive_student
from pipeline.models.vla import VLA, VLAConfig, teacher_config, tokenize

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "configs" / "smoke.yaml"
NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
              "proprio_std": [1.0] * 4}
SENTENCES = ["reach to the goal position", "push the puck to the goal", "open the drawer", "pick up the red block",
             "press the button from the top", "close the window slowly"]
INSTRUCTIONS = ["push the puck to the goal", "open the drawer", "reach to the goal position and then stop and wait",
                "an unseen sentence"]
MAX_TOKENS = 6
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=64, max_position_embeddings=64)

# Each config differs from our defaults (eps 1e-6, rope theta 1e4, no bias, head_dim = hidden/heads, untied):
# a decoder rebuilt from the sizes alone would give different hidden states.
FAMILIES = {
    "llama": (LlamaForCausalLM, LlamaConfig(**SIZES, rms_norm_eps=1e-2, head_dim=16, attention_bias=True,
                                            mlp_bias=True, tie_word_embeddings=True,
                                            rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                             "rope_theta": 5e5})),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SIZES, rms_norm_eps=1e-2, tie_word_embeddings=True,
                                            use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "mistral": (MistralForCausalLM, MistralConfig(**SIZES, rms_norm_eps=1e-2, head_dim=16, sliding_window=5,
                                                  rope_parameters={"rope_type": "yarn", "factor": 2.0,
                                                                   "rope_theta": 1e6,
                                                                   "original_max_position_embeddings": 32})),
    "gemma": (GemmaForCausalLM, GemmaConfig(**SIZES, rms_norm_eps=1e-2, head_dim=16, attention_bias=True,
                                            rope_parameters={"rope_type": "default", "rope_theta": 5e4})),
}


def _tokenizer(kind):
    """A tiny tokenizer trained here on a few sentences (WordLevel or BPE), with a pad token."""
    special = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=special)
    else:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(special_tokens=special)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def _save_folder(folder, family, tokenizer=True):
    torch.manual_seed(0)
    model_cls, config = FAMILIES[family]
    model_cls(config).save_pretrained(folder)
    if tokenizer:
        _tokenizer("bpe" if family in ("qwen2", "gemma") else "wordlevel").save_pretrained(folder)
    if family == "llama":   # a config.json as older checkpoints write it: rope_theta and rope_scaling
        path = folder / "config.json"
        raw = json.loads(path.read_text())
        rope = raw.pop("rope_parameters")
        raw.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "linear", "factor": rope["factor"]})
        path.write_text(json.dumps(raw))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    return {family: _save_folder(root / family, family) for family in FAMILIES}


def _vla(folder, **extra):
    return VLA(VLAConfig(**pretrained_dims(str(folder)), max_instruction_tokens=MAX_TOKENS, image_size=32,
                         patch_size=8, proprio_dim=4, action_dim=4, **extra)).eval()


def _loaded_vla(folder):
    vla = _vla(folder)
    load_hf_backbone(vla, str(folder))
    return vla


def _inputs(batch=len(INSTRUCTIONS)):
    torch.manual_seed(1)
    return torch.rand(batch, 3, 32, 32), INSTRUCTIONS[:batch], torch.randn(batch, 4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_decoder_is_built_from_the_whole_config_json(folders, family):
    vla = _vla(folders[family])
    ours = vla.backbone.config.to_dict()
    theirs = AutoModel.from_pretrained(folders[family]).config.to_dict()
    overridden = {"use_cache", "attention_dropout", "dtype", "_name_or_path", "architectures"}
    assert {k: v for k, v in ours.items() if k not in overridden} == \
           {k: v for k, v in theirs.items() if k not in overridden}
    assert ours["use_cache"] is False and ours["attention_dropout"] == 0.0


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_hidden_states_equal_the_librarys_own_model(folders, family):
    folder = folders[family]
    vla = _loaded_vla(folder)
    library = AutoModel.from_pretrained(folder).eval()
    tokens, mask, _, text, text_mask = vla.embed(*_inputs())
    # The whole VLA sequence (vision, instruction, proprio, query) with padding: our prepared mask or theirs.
    ours = vla.backbone(inputs_embeds=tokens, attention_mask=vla._attention_mask(mask)).last_hidden_state
    theirs = library(inputs_embeds=tokens, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # The instruction alone, from token ids: our text embeddings are what the library makes of the same ids
    # (Gemma's sqrt(hidden) scale included).
    ids, _ = vla.instruction_ids(INSTRUCTIONS)
    torch.testing.assert_close(text, library.get_input_embeddings()(ids), atol=0, rtol=0)
    ours = vla.backbone(inputs_embeds=text, attention_mask=text_mask).last_hidden_state
    theirs = library(input_ids=ids, attention_mask=text_mask).last_hidden_state
    real = text_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_instructions_go_through_the_folders_tokenizer(folders, family):
    vla = _vla(folders[family])
    tokenizer = AutoTokenizer.from_pretrained(folders[family])
    expected = tokenizer(INSTRUCTIONS, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                         return_tensors="pt")
    for _ in range(2):   # the second call is served from the per-instruction cache
        ids, mask = vla.instruction_ids(INSTRUCTIONS)
        assert torch.equal(ids, expected["input_ids"]) and torch.equal(mask, expected["attention_mask"])
    assert vla.tokenizer.hf_tokenizer is vla.tokenizer.hf_tokenizer          # loaded once, kept on the model
    assert mask[2].all()                                               # truncated to model.max_instruction_tokens
    if family == "llama":                                              # word-level: "open the drawer" is padded
        assert mask[1].tolist() == [1, 1, 1, 0, 0, 0]


def test_a_from_scratch_teacher_still_hashes_words():
    model = ModelSection(max_instruction_tokens=MAX_TOKENS, hidden_size=32, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, patch_size=8)
    vla = VLA(teacher_config(model, [32, 32, 3], 4, 4))
    assert vla.cfg.hf_config is None and vla.tokenizer is None
    ids, mask = vla.instruction_ids(INSTRUCTIONS)
    expected = tokenize(INSTRUCTIONS, model.vocab_size, MAX_TOKENS)
    assert torch.equal(ids, expected[0]) and torch.equal(mask, expected[1])


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
@torch.no_grad()
def test_teacher_student_and_export_rebuild_the_same_decoder_without_the_folder(folders, tmp_path, family):
    source = shutil.copytree(folders[family], tmp_path / "source")
    teacher = _loaded_vla(source)
    student = derive_student(teacher, router_hidden=8).eval()
    for name, policy in (("teacher", teacher), ("student", student)):
        save_policy(policy, str(tmp_path / name), PolicyCard(normalizer=NORMALIZER))
    shutil.rmtree(source)                                  # probing, distill and serving never see it again
    for name, policy in (("teacher", teacher), ("student", student)):
        reloaded, _ = load_policy(str(tmp_path / name))
        assert reloaded.backbone.config.to_dict() == policy.backbone.config.to_dict()
        assert torch.equal(reloaded.instruction_ids(INSTRUCTIONS)[0], teacher.instruction_ids(INSTRUCTIONS)[0])
        x = _inputs()
        torch.testing.assert_close(reloaded(*x, mode="hard").actions, policy(*x, mode="hard").actions,
                                   atol=0, rtol=0)


def test_a_checkpoint_from_before_the_hf_config_field_still_loads(tmp_path):
    cfg = VLAConfig(backbone="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, vocab_size=64, max_instruction_tokens=MAX_TOKENS, image_size=32,
                    patch_size=8, proprio_dim=4, action_dim=4)
    save_policy(VLA(cfg), str(tmp_path), PolicyCard(normalizer=NORMALIZER))
    path = tmp_path / "config.json"
    card = json.loads(path.read_text())
    for key in ("hf_config", "tokenizer"):
        card["vla"].pop(key)
    path.write_text(json.dumps(card))
    reloaded, _ = load_policy(str(tmp_path))
    assert reloaded.cfg == cfg and reloaded.tokenizer is None
    assert reloaded.backbone.config.rms_norm_eps == 1e-6   # our defaults, as before


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_an_unmapped_or_missing_tensor_is_an_error_naming_it(tmp_path):
    extra = _save_folder(tmp_path / "extra", "mistral")
    _edit_weights(extra, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match=r"map to nothing.*model\.layers\.0\.self_attn\.q_norm\.weight"):
        load_hf_backbone(_vla(extra), str(extra))
    missing = _save_folder(tmp_path / "missing", "mistral")
    _edit_weights(missing, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 decoder tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_backbone(_vla(missing), str(missing))


def test_tied_embeddings_saved_under_the_heads_name_load(tmp_path):
    folder = _save_folder(tmp_path / "tied", "llama")        # tie_word_embeddings: true
    table = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    _edit_weights(folder, lambda t: t.update({"lm_head.weight": t.pop("model.embed_tokens.weight")}))
    vla = _vla(folder)
    load_hf_backbone(vla, str(folder))
    assert torch.equal(vla.backbone.embed_tokens.weight, table)


def test_a_folder_without_a_tokenizer_names_the_folder_and_the_fix(tmp_path):
    folder = _save_folder(tmp_path / "bare", "llama", tokenizer=False)
    with pytest.raises(FileNotFoundError, match=rf"{folder} holds no tokenizer files.*save_pretrained"):
        pretrained_dims(str(folder))


def test_an_unknown_architecture_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported.*llama, qwen2, mistral, gemma"):
        read_hf_config(str(tmp_path))


def test_the_config_choices_are_the_registry():
    assert typing.get_args(ModelSection.model_fields["backbone"].annotation) == tuple(BACKBONES)


@pytest.mark.slow
def test_train_teacher_from_a_pretrained_folder_tokenizes_and_reloads_identically(tmp_path):
    """The real job (Ray Train + DeepSpeed) on a few Meta-World steps: the teacher it writes carries the
    folder's tokenizer and full config, and saving and loading it again changes no action."""
    import ray

    from jobs import train_teacher as teacher_job
    from pipeline.cli import run_cli
    from pipeline.data.shards import write_shards
    from pipeline.sim.metaworld_env import run_expert_episode

    shards = tmp_path / "shards"
    write_shards([run_expert_episode(task, 0, 32, "corner", 30) for task in ("reach-v3", "push-v3")], str(shards),
                 rows_per_shard=60)
    folder = _save_folder(tmp_path / "qwen2-tiny", "qwen2")
    # `python -m jobs.train_teacher` without a new interpreter (its __main__ is this run_cli call); Ray starts here,
    # in the main thread, and stops with the test.
    try:
        code = run_cli(teacher_job.main, "train-teacher", [
            "--config", str(SMOKE), f"run.run_dir={tmp_path / 'run'}", f"data.shards_uri={shards}",
            "data.val_fraction=0", f"model.pretrained_backbone={folder}", "model.patch_size=8", "teacher.steps=2",
            "teacher.warmup_steps=0", "teacher.batch_size=8", f"model.max_instruction_tokens={MAX_TOKENS}"])
    finally:
        ray.shutdown()
    assert code == 0
    expected = AutoTokenizer.from_pretrained(folder)(INSTRUCTIONS, padding="max_length", truncation=True,
                                                     max_length=MAX_TOKENS, return_tensors="pt")["input_ids"]
    start = load_file(folder / "model.safetensors")
    shutil.rmtree(folder)
    teacher, card = load_policy(str(tmp_path / "run" / "teacher"))
    # The decoder started from the folder's weights: two small optimizer steps moved it only slightly.
    end = teacher.state_dict()["backbone.layers.1.layer.mlp.down_proj.weight"]
    moved = (end - start["model.layers.1.mlp.down_proj.weight"]).abs().max()
    assert 0 < moved < 0.05
    assert teacher.cfg.hf_config["sliding_window"] == 4 and teacher.cfg.hf_config["rms_norm_eps"] == 1e-2
    assert torch.equal(teacher.instruction_ids(INSTRUCTIONS)[0], expected)
    save_policy(teacher, str(tmp_path / "again"), card)
    again, _ = load_policy(str(tmp_path / "again"))
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(again(*x).actions, teacher(*x).actions, atol=0, rtol=0)
