"""Pretrained VLM folders split into parts that compute what the library computes: tiny random-weight LLaVA,
PaliGemma and Idefics3 folders (built offline, save_pretrained layout) load back, and vision -> merge -> decoder
over our parts gives the library's own hidden states and logits; bad folders and bad frames fail with the fix."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from pipeline.models.tiny_vlm import DEFAULT_IMAGE_SIZE, build_tiny_vlm, main
from pipeline.models.vlm_import import (
    VLM_FAMILIES,
    check_image_compatibility,
    decoder_hidden_states,
    load_vlm_parts,
    merge_image_features,
    prepare_inputs,
    read_vlm_config,
)

FAMILIES = ["llava", "paligemma", "idefics3"]
IMAGE_TOKENS = {"llava": 64, "paligemma": 64, "idefics3": 16}   # 8x8 patches; Idefics3 pixel-shuffles 2x2
INSTRUCTIONS = ["push the puck to the goal", "open the drawer", "reach to the goal position and an unseen word"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlms")
    return {family: build_tiny_vlm(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def parts(folders):
    return {family: load_vlm_parts(str(folder)) for family, folder in folders.items()}


def _frames(batch=len(INSTRUCTIONS), size=DEFAULT_IMAGE_SIZE):
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_folder_has_the_save_pretrained_layout_and_loads_with_auto_classes(folders, family):
    folder = folders[family]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json"):
        assert (folder / name).is_file(), name
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True)
    assert model.config.get_text_config().vocab_size == len(processor.tokenizer)
    assert type(model).__name__.lower().startswith(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_metadata_describes_the_folder(parts, family):
    vlm = parts[family]
    assert (vlm.family, vlm.hidden_size, vlm.num_layers, vlm.channels) == (family, 64, 4, 3)
    assert vlm.image_size == (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    assert vlm.num_image_tokens == IMAGE_TOKENS[family]
    assert vlm.image_mean == [0.5] * 3 and vlm.image_std == [0.5] * 3
    assert len(vlm.language_model.layers) == 4
    assert not any(p.requires_grad for p in vlm.vision.parameters())       # frozen by default
    assert all(p.requires_grad for p in vlm.language_model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_our_split_gives_the_librarys_hidden_states_and_logits(parts, family):
    vlm = parts[family]
    batch = prepare_inputs(vlm, _frames(), INSTRUCTIONS)
    assert {"pixel_values", "input_ids", "attention_mask"} <= set(batch)
    assert ((batch["input_ids"] == vlm.image_token_id).sum(1) == vlm.num_image_tokens).all()
    # The image features: ours (one nn.Module) vs the library's get_image_features.
    features = vlm.vision(batch["pixel_values"])
    extra = {"pixel_attention_mask": batch["pixel_attention_mask"]} if family == "idefics3" else {}
    theirs = vlm.model.get_image_features(batch["pixel_values"], **extra).pooler_output
    theirs = torch.stack(list(theirs)) if isinstance(theirs, (list, tuple)) else theirs
    assert features.shape == (len(INSTRUCTIONS), vlm.num_image_tokens, vlm.hidden_size)
    torch.testing.assert_close(features.reshape(theirs.shape), theirs, atol=1e-5, rtol=0)
    # The decoder over merged embeddings vs the library's whole forward (padding positions excluded).
    ours = decoder_hidden_states(vlm, batch)
    library = vlm.model(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], vlm.model.model(**batch).last_hidden_state[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(vlm.model.lm_head(ours)[real], library.logits[real], atol=1e-5, rtol=0)


@torch.no_grad()
def test_paligemma_needs_its_prefix_mask_and_positions(parts):
    """A plain causal decoder call over the same merged embeddings is not PaliGemma: the family contract
    (positions from 1, bidirectional prefix) is what makes the split exact."""
    vlm = parts["paligemma"]
    batch = prepare_inputs(vlm, _frames(), INSTRUCTIONS)
    merged = merge_image_features(vlm, batch["input_ids"], vlm.vision(batch["pixel_values"]))
    plain = vlm.language_model(inputs_embeds=merged, attention_mask=batch["attention_mask"]).last_hidden_state
    real = batch["attention_mask"].bool()
    assert (plain[real] - decoder_hidden_states(vlm, batch)[real]).abs().max() > 1e-3


def test_an_unsupported_model_type_lists_the_families(folders, tmp_path):
    folder = shutil.copytree(folders["llava"], tmp_path / "qwen")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_5_vl"}))
    with pytest.raises(ValueError) as err:
        load_vlm_parts(str(folder))
    message = str(err.value)
    assert str(folder) in message and "'qwen2_5_vl'" in message
    assert all(name in message for name in VLM_FAMILIES)
    assert read_vlm_config(str(folders["idefics3"]))["model_type"] == "idefics3"


@pytest.mark.parametrize("family", FAMILIES)
def test_frames_the_processor_cannot_take_name_both_sizes_and_the_fix(parts, family):
    vlm = parts[family]
    check_image_compatibility(vlm, (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3))
    with pytest.raises(ValueError) as err:
        check_image_compatibility(vlm, [32, 32, 3])
    message = str(err.value)
    assert "64x64" in message and "32x32" in message and "collect.image_size=64" in message
    assert "processor_config.json" in message
    with pytest.raises(ValueError, match=r"1 channel\(s\).*takes 3"):
        check_image_compatibility(vlm, (64, 64, 1))


def test_the_cli_builds_another_size(tmp_path, capsys):
    main([str(tmp_path / "tiny"), "--family", "idefics3", "--image-size", "32"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "tiny")
    vlm = load_vlm_parts(str(tmp_path / "tiny"))
    assert vlm.image_size == (32, 32) and vlm.num_image_tokens == 4
    with pytest.raises(ValueError, match="multiple of 16"):
        build_tiny_vlm(tmp_path / "bad", "llava", image_size=40)
