"""Read a Hugging Face vision-language model folder (LLaVA, PaliGemma, Idefics3/SmolVLM; local or s3://) as parts.

A pretrained VLM teacher is split into what the VLA needs: `vision` (vision tower + projector: pixel_values ->
image features in the decoder's width, exactly as the library's `get_image_features` computes them),
`embed_tokens`, the decoder (`language_model`, whose `.layers` the router gates) and the folder's processor.
Nothing is fetched from a hub: the folder is read from disk, or copied from object storage first.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin
from transformers.masking_utils import create_causal_mask

from pipeline.data import storage
from pipeline.errors import MissingInput


class LlavaVision(nn.Module):
    """LLaVA's image path: one (or several, concatenated) vision-tower hidden states, CLS dropped under the
    "default" strategy, through the multi-modal projector (LlavaModel.get_image_features)."""

    def __init__(self, tower: nn.Module, projector: nn.Module, feature_layer: int | list[int], strategy: str) -> None:
        super().__init__()
        self.tower, self.projector, self.feature_layer, self.strategy = tower, projector, feature_layer, strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.feature_layer] if isinstance(self.feature_layer, int) else list(self.feature_layer)
        selected = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
        return self.projector(torch.cat(selected, dim=-1))


class PaliGemmaVision(nn.Module):
    """PaliGemma's image path: SigLIP's last hidden state through a linear projector (no scaling in 5.x)."""

    def __init__(self, tower: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.tower, self.projector = tower, projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixel_values).last_hidden_state)


class Idefics3Vision(nn.Module):
    """Idefics3/SmolVLM's image path: SigLIP-like encoder over unpadded frames, then the connector (pixel shuffle
    by scale_factor, linear): (image_size / patch)^2 / scale^2 tokens per frame. Takes B x C x H x W, or the
    processor's B x 1 x C x H x W (one image per sample, splitting off)."""

    def __init__(self, tower: nn.Module, connector: nn.Module, patch_size: int) -> None:
        super().__init__()
        self.tower, self.connector, self.patch_size = tower, connector, patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() == 5:
            if pixel_values.shape[1] != 1:
                raise ValueError(f"pixel_values hold {pixel_values.shape[1]} images per sample; the VLA takes one "
                                 f"frame per sample: turn image splitting off (do_image_splitting=false)")
            pixel_values = pixel_values[:, 0]
        batch, _, height, width = pixel_values.shape
        # Our frames are never padded: every patch is real (the library derives the same all-true mask).
        patches = torch.ones(batch, height // self.patch_size, width // self.patch_size, dtype=torch.bool,
                             device=pixel_values.device)
        hidden = self.tower(pixel_values=pixel_values.to(next(self.connector.parameters()).dtype),
                            patch_attention_mask=patches, return_dict=True).last_hidden_state
        return self.connector(hidden)


@dataclass(frozen=True)
class VLMFamily:
    """How to find one model_type's parts and how it wants its prompt."""
    split: Callable[[PreTrainedModel], tuple[nn.Module, nn.Module]]   # model -> (vision, decoder with .layers)
    prompt: Callable[[str, str], str]                                  # (image_token, instruction) -> text
    nest_images: bool = False        # the processor wants [[frame], [frame], ...] (one image list per sample)
    position_offset: int = 0         # PaliGemma counts positions from 1
    prefix_bidirectional: bool = False   # PaliGemma: the image + prompt prefix attends both ways
    # (folder prefix, library prefix): tensor names of the older layout that hub checkpoints (and save_pretrained
    # of LLaVA and PaliGemma) still use, renamed to the library's current ones, first match wins.
    checkpoint_layout: tuple[tuple[str, str], ...] = ()


def _llava(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    inner, config = model.model, model.config
    vision = LlavaVision(inner.vision_tower, inner.multi_modal_projector, config.vision_feature_layer,
                         config.vision_feature_select_strategy)
    return vision, inner.language_model


def _paligemma(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    return PaliGemmaVision(model.model.vision_tower, model.model.multi_modal_projector), model.model.language_model


def _idefics3(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    inner = model.model
    return Idefics3Vision(inner.vision_model, inner.connector, model.config.vision_config.patch_size), inner.text_model


def _image_then_text(image_token: str, text: str) -> str:
    return image_token + text


_LLAVA_LAYOUT = (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                 ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))

VLM_FAMILIES: dict[str, VLMFamily] = {
    "llava": VLMFamily(_llava, lambda image, text: f"{image}\n{text}", checkpoint_layout=_LLAVA_LAYOUT),
    # The processor puts <bos> after the image tokens and "\n" after the prompt (big_vision's prefix format).
    "paligemma": VLMFamily(_paligemma, _image_then_text, position_offset=1, prefix_bidirectional=True,
                           checkpoint_layout=_LLAVA_LAYOUT),
    # Chat-less prompt; the processor expands <image> to <fake_token_around_image><global-img><image>*n<fake...>.
    "idefics3": VLMFamily(_idefics3, _image_then_text, nest_images=True),
    "smolvlm": VLMFamily(_idefics3, _image_then_text, nest_images=True),   # Idefics3's code under its own name
}


@dataclass
class VLMParts:
    """A pretrained VLM split for the VLA; `model` is the library's whole model (its lm_head is unused)."""
    uri: str
    family: str
    model: PreTrainedModel
    vision: nn.Module
    embed_tokens: nn.Module
    language_model: nn.Module
    processor: ProcessorMixin
    hidden_size: int
    num_layers: int
    image_token_id: int
    num_image_tokens: int
    image_size: tuple[int, int]      # (height, width) the processor hands the vision tower
    channels: int
    image_mean: list[float]
    image_std: list[float]


def read_vlm_config(uri: str) -> dict[str, Any]:
    """config.json of a VLM folder, its model_type checked against VLM_FAMILIES."""
    path = storage.join(uri, "config.json")
    if not storage.exists(path):
        raise MissingInput(f"{path} not found: {uri} is not a Hugging Face model folder (expected config.json, "
                           f"model.safetensors, tokenizer and processor files as save_pretrained writes them)")
    config = json.loads(storage.read_bytes(path))
    if config.get("model_type") not in VLM_FAMILIES:
        raise ValueError(f"{path}: model_type={config.get('model_type')!r} is not a supported vision-language "
                         f"model; choose a checkpoint of: {', '.join(VLM_FAMILIES)}")
    return config


def _local_copy(uri: str, scratch: str) -> str:
    """A local folder holding uri's files: uri itself when local; s3:// is copied (from_pretrained reads local
    paths only). Safetensors are read fully at load, so the copy can go once loading is done."""
    if not storage.is_s3(uri):
        return uri
    for file_uri in storage.list_files(uri):
        (Path(scratch) / file_uri.rsplit("/", 1)[-1]).write_bytes(storage.read_bytes(file_uri))
    return scratch


def _expected_image_size(image_processor: Any) -> tuple[int, int]:
    """(height, width) after the processor: crop_size if it centre-crops (CLIP), else size; Idefics3's frames are
    squared to max_image_size when splitting is off."""
    if getattr(image_processor, "max_image_size", None):
        side = image_processor.max_image_size["longest_edge"]
        return side, side
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    size = dict(size)
    if "height" in size:
        return size["height"], size["width"]
    side = size.get("shortest_edge") or size["longest_edge"]
    return side, side


def load_vlm_parts(uri: str, freeze_vision: bool = True) -> VLMParts:
    """Load a VLM folder with the library's own classes (no hub) and split it into VLMParts. The vision tower
    and projector are frozen unless freeze_vision=False."""
    config = read_vlm_config(uri)
    family = VLM_FAMILIES[config["model_type"]]
    with tempfile.TemporaryDirectory() as scratch:
        local = _local_copy(uri, scratch)
        model = AutoModelForImageTextToText.from_pretrained(local, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(local, local_files_only=True)
    vision, decoder = family.split(model)
    vision.requires_grad_(not freeze_vision)
    text_config = model.config.get_text_config()
    image_processor = processor.image_processor
    parts = VLMParts(
        uri=uri, family=config["model_type"], model=model, vision=vision,
        embed_tokens=decoder.get_input_embeddings(), language_model=decoder, processor=processor,
        hidden_size=text_config.hidden_size, num_layers=len(decoder.layers),
        image_token_id=model.config.image_token_id, num_image_tokens=0,
        image_size=_expected_image_size(image_processor), channels=model.config.vision_config.num_channels,
        image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std))
    blank = np.zeros((1, *parts.image_size, parts.channels), dtype=np.uint8)
    parts.num_image_tokens = int((prepare_inputs(parts, blank, [""])["input_ids"] == parts.image_token_id).sum())
    return parts


def prepare_inputs(parts: VLMParts, images_uint8_bhwc: np.ndarray, instructions: list[str]) -> dict[str, torch.Tensor]:
    """Our uint8 frames (B x H x W x C) and instructions -> the folder processor's tensors (pixel_values,
    input_ids, attention_mask, and pixel_attention_mask / token_type_ids where the family has them)."""
    if len(images_uint8_bhwc) != len(instructions):
        raise ValueError(f"{len(images_uint8_bhwc)} frames but {len(instructions)} instructions; one each per sample")
    family = VLM_FAMILIES[parts.family]
    frames = [np.asarray(frame) for frame in images_uint8_bhwc]
    images: list[Any] = [[frame] for frame in frames] if family.nest_images else frames
    token = parts.processor.image_token
    prompts = [family.prompt(token, text) for text in instructions]
    batch = parts.processor(images=images, text=prompts, padding=True, return_tensors="pt")
    return {key: value for key, value in batch.items() if key != "labels" and isinstance(value, torch.Tensor)}


def merge_image_features(parts: VLMParts, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """Text embeddings with each image placeholder replaced by the next image feature (the library's
    masked_scatter). An image token id outside the vocabulary (PaliGemma) embeds as id 0 before replacement."""
    is_image = input_ids == parts.image_token_id
    if int(is_image.sum()) != image_features.shape[0] * image_features.shape[1]:
        raise ValueError(f"{int(is_image.sum())} image tokens in input_ids but {image_features.shape[0]} x "
                         f"{image_features.shape[1]} image features; prepare inputs with prepare_inputs")
    ids = input_ids.masked_fill(is_image, 0) if parts.image_token_id >= parts.embed_tokens.num_embeddings else input_ids
    embeds = parts.embed_tokens(ids)
    return embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))


def decoder_kwargs(parts: VLMParts, inputs_embeds: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """attention_mask and position_ids the family's own forward hands its decoder. LLaVA and Idefics3: the padding
    mask, default positions. PaliGemma: positions from 1, and a prefix (token_type_ids == 0) that attends both
    ways; without token_type_ids the whole prompt is prefix."""
    family = VLM_FAMILIES[parts.family]
    mask = batch.get("attention_mask")
    if not family.prefix_bidirectional:
        return {"attention_mask": mask}
    positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + family.position_offset
    token_types = batch.get("token_type_ids", torch.zeros(inputs_embeds.shape[:2], dtype=torch.long))
    config = parts.language_model.config
    mask = create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=mask, past_key_values=None,
                              position_ids=positions, block_sequence_ids=torch.where(token_types == 0, 0, -1))
    if getattr(config, "sliding_window", None) is not None:
        raise ValueError(f"{parts.uri}: a PaliGemma decoder with sliding_window={config.sliding_window} (PaliGemma 2) "
                         f"needs a sliding mask too; only PaliGemma 1 (Gemma) decoders are supported so far")
    return {"attention_mask": mask, "position_ids": positions}


def decoder_hidden_states(parts: VLMParts, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden state over our split: vision -> merge -> language_model. The reference the VLA's
    routed forward must reproduce with every layer on."""
    features = parts.vision(batch["pixel_values"])
    merged = merge_image_features(parts, batch["input_ids"], features)
    return parts.language_model(inputs_embeds=merged, **decoder_kwargs(parts, merged, batch)).last_hidden_state


class TakesImages(Protocol):
    """What check_image_compatibility reads: VLMParts, or the VLMSpec a VLA config carries."""
    uri: str
    family: str
    image_size: tuple[int, int]
    channels: int


def check_image_compatibility(parts: TakesImages, shard_image_shape: tuple[int, ...] | list[int]) -> None:
    """Fail early, naming both shapes and the fix, when the shards' frames (H, W, C) are not what the processor
    hands the vision tower (it would silently resize or crop them, or fail deep inside the tower)."""
    height, width, channels = (int(v) for v in shard_image_shape)
    want_h, want_w = parts.image_size
    problems = []
    if channels != parts.channels:
        problems.append(f"the shards' frames have {channels} channel(s) but the vision tower takes {parts.channels} "
                        f"(num_channels in config.json's vision_config); collect RGB frames")
    if (height, width) != (want_h, want_w):
        fix = (f"collect the shards at that size (collect.image_size={want_h})" if want_h == want_w
               else f"collect frames of {want_h}x{want_w}")
        problems.append(f"the processor expects {want_h}x{want_w} images but the shards hold {height}x{width}; "
                        f"{fix}, or set the image processor's size to {height} in {parts.uri}/processor_config.json "
                        f"(preprocessor_config.json in older folders) if the vision tower takes that size")
    if problems:
        raise ValueError(f"{parts.uri} ({parts.family}) cannot take the shards' frames: " + "; ".join(problems))
