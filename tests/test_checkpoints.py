"""Checkpoints in Hugging Face layout from a local folder or s3:// (moto on 127.0.0.1); 7B sizing on meta."""

import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.data import storage
from pipeline.evaluate.flops import decoder_layer_flops
from pipeline.models.checkpoint import PolicyCard, load_policy, save_policy
from pipeline.models.hf_import import load_hf_backbone, pretrained_dims, read_hf_config
from pipeline.models.student import derive_student
from pipeline.models.variants import hf_checkpoint_params, size_on_meta, variant
from pipeline.models.vla import VLA, VLAConfig

NORMALIZER = {"action_mean": [0.0] * 4, "action_std": [1.0] * 4, "proprio_mean": [0.0] * 4,
              "proprio_std": [1.0] * 4}


def _upload(folder: Path, uri: str) -> None:
    for f in folder.iterdir():
        storage.write_bytes(storage.join(uri, f.name), f.read_bytes())


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=50, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder, safe_serialization=True)
    _tokenizer().save_pretrained(folder)
    return folder, model


def _tokenizer():
    """A word-level tokenizer trained here on a few instructions (nothing comes from a hub)."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["push the puck", "reach the goal"], trainers.WordLevelTrainer(special_tokens=["[PAD]",
                                                                                                         "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _vla_for(uri):
    return VLA(VLAConfig(**pretrained_dims(uri), max_instruction_tokens=6, image_size=32, patch_size=8,
                         proprio_dim=4, action_dim=4)).eval()


def _same_decoder(vla, model):
    embeds = torch.randn(2, 10, 32)
    ours = vla.backbone(inputs_embeds=embeds).last_hidden_state
    theirs = model.model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_hf_decoder_loads_from_a_local_folder(hf_folder):
    folder, model = hf_folder
    vla = _vla_for(str(folder))
    counts = load_hf_backbone(vla, str(folder))
    assert counts["skipped"] == 1                      # the LM head: the VLA has an action head instead
    _same_decoder(vla, model)


@pytest.mark.slow
def test_hf_decoder_and_our_checkpoints_load_from_s3(hf_folder, s3_server, tmp_path):
    folder, model = hf_folder
    _upload(folder, f"{s3_server}/llama-tiny")
    vla = _vla_for(f"{s3_server}/llama-tiny")
    load_hf_backbone(vla, f"{s3_server}/llama-tiny")
    _same_decoder(vla, model)
    # A teacher and its routed student, written to and read back from s3://.
    student = derive_student(vla, router_hidden=8).eval()
    for name, policy in (("teacher", vla), ("student", student)):
        save_policy(policy, f"{s3_server}/{name}", PolicyCard(normalizer=NORMALIZER))
        reloaded, meta = load_policy(f"{s3_server}/{name}")
        x = (torch.rand(2, 3, 32, 32), ["push the puck", "reach"], torch.randn(2, 4))
        torch.testing.assert_close(reloaded(*x, mode="hard").actions, policy(*x, mode="hard").actions)
        assert meta.normalizer == NORMALIZER
    # The same URI rewritten with other weights of the same size: the node's cached copy is not reused.
    with torch.no_grad():
        vla.action_head[-1].bias.add_(1.0)
    digest = save_policy(vla, f"{s3_server}/teacher", PolicyCard(normalizer=NORMALIZER))
    reloaded, meta = load_policy(f"{s3_server}/teacher")
    assert meta.hash == digest and torch.equal(reloaded.action_head[-1].bias, vla.action_head[-1].bias)


def test_a_wrong_folder_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a policy checkpoint"):
        load_policy(str(tmp_path))


def test_llama2_7b_is_sized_on_the_meta_device_in_seconds():
    started = time.perf_counter()
    assert hf_checkpoint_params("llama2-7b") == pytest.approx(6.74e9, rel=0.01)
    cfg = VLAConfig(**variant("llama2-7b"), max_instruction_tokens=32, image_size=224, patch_size=14,
                    proprio_dim=8, action_dim=7, router_hidden=256)
    size = size_on_meta(cfg)
    # The VLA keeps the decoder (no LM head) and adds vision, proprio, action head and router.
    assert size["params_backbone"] == pytest.approx(6.74e9 - 32000 * 4096, rel=0.001)
    assert 0 < size["params_router"] < 2e6
    assert size["flops_backbone"] == 32 * decoder_layer_flops(cfg)
    assert 3e12 < size["flops_total"] < 5e12           # ~3.8 TFLOPs for 290 tokens through 32 layers
    assert time.perf_counter() - started < 60
