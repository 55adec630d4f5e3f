"""A pretrained vision-language model as the VLA's backbone: what our checkpoints carry of it, its modules, its
image preprocessing and prompt, and its weights streamed from the folder's safetensors.

A VLA built from a VLM folder (model.pretrained_vlm) runs the folder's vision tower + projector on the frame, its
tokenizer on the prompt (the family's format, image tokens expanded by its processor), and its language model's
decoder layers (the routed layers) over [prompt with image features merged in, proprio token, action query].
Everything needed to rebuild it travels in the VLA config (`VLMSpec`: the folder's config.json, the processor's
text files, the preprocessing constants), so no later stage ever reads the folder again.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import AutoModel, AutoProcessor, PretrainedConfig, ProcessorMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from pipeline.data import storage
from pipeline.models.action_head import TokenHead, lm_head_rows
from pipeline.models.backbones import _for_the_vla, _init_deferred_under_zero3, backbone_dims
from pipeline.models.tokenizer import _is_text
from pipeline.models.vlm_import import VLM_FAMILIES, _expected_image_size, read_vlm_config
from pipeline.models.weights import TensorSource, assign, stream_into

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")
PROBE_INSTRUCTION = "Pick up the red block, then open the drawer 2x!"
# A processor call (tokenizer with padding) from two threads at once can fail: one new instruction at a time.
_ENCODING = threading.Lock()


class VLMSpec(BaseModel):
    """The VLM part of a VLA config: enough to rebuild the modules, the preprocessing and the prompt offline."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    uri: str                                # the folder it was imported from (a record; never read again)
    family: str                             # a VLM_FAMILIES key (config.json's model_type)
    config: dict[str, Any]                  # the folder's config.json
    processor: dict[str, str]               # the processor's text files as save_pretrained writes them
    image_token_id: int
    num_image_tokens: int                   # image features per frame (the vision tokens the router pools)
    prompt_tokens: int                      # non-image tokens of the prompt around an empty instruction
    image_size: tuple[int, int]             # (height, width) the vision tower takes
    channels: int
    pixel_scale: float                      # pixel value x this before normalising (1/255 when it rescales)
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    train_vision: bool = False              # false: vision tower + projector frozen (model.train_vision)

    def text_length(self, max_instruction_tokens: int) -> int:
        """Prompt tokens per sample, image tokens included: the prompt is padded or cut to this."""
        return self.num_image_tokens + self.prompt_tokens + max_instruction_tokens


def hf_config(spec: VLMSpec) -> PretrainedConfig:
    """The folder's config.json as the library reads it (legacy names mapped by from_dict as from_pretrained)."""
    return CONFIG_MAPPING[spec.family].from_dict(dict(spec.config))


def text_config_dict(spec: VLMSpec) -> dict[str, Any]:
    """The language model's config as a plain config.json dict (what VLAConfig.hf_config holds for a VLM), through
    JSON as a checkpoint stores it (id2label's int keys become strings)."""
    return json.loads(hf_config(spec).get_text_config().to_json_string(use_diff=False))


def vlm_dims(spec: VLMSpec) -> dict[str, Any]:
    """The VLA config fields the VLM fixes: the decoder's sizes, its config, and the spec itself."""
    text = text_config_dict(spec)
    patch = int(spec.config.get("vision_config", {}).get("patch_size", 14))
    return {**backbone_dims(text), "hf_config": text, "vlm": spec, "patch_size": patch}


def _processor_folder(uri: str, scratch: str) -> str:
    """A local folder with uri's config, tokenizer and processor files: uri itself when local; from s3:// only
    those files are copied (never the weights)."""
    if not storage.is_s3(uri):
        return uri
    for file_uri in storage.list_files(uri):
        name = file_uri.rsplit("/", 1)[-1]
        if not name.endswith(WEIGHT_SUFFIXES):
            (Path(scratch) / name).write_bytes(storage.read_bytes(file_uri))
    return scratch


def _saved_processor_files(processor: ProcessorMixin) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as saved:
        processor.save_pretrained(saved)
        return {p.name: p.read_text() for p in sorted(Path(saved).iterdir()) if p.is_file() and _is_text(p)}


def _preprocessing(processor: ProcessorMixin) -> dict[str, Any]:
    """The image processor's constants for frames that already have its size: rescale, then normalise."""
    image_processor = processor.image_processor
    channels = len(image_processor.image_mean)
    normalise = getattr(image_processor, "do_normalize", True)
    return dict(image_size=_expected_image_size(image_processor),
                pixel_scale=float(image_processor.rescale_factor) if getattr(image_processor, "do_rescale", True)
                else 1.0,
                image_mean=tuple(float(v) for v in image_processor.image_mean) if normalise else (0.0,) * channels,
                image_std=tuple(float(v) for v in image_processor.image_std) if normalise else (1.0,) * channels)


def read_vlm_spec(uri: str, train_vision: bool = False) -> VLMSpec:
    """The spec of a VLM folder (local or s3://): its config.json, its processor (files and constants) and the
    prompt's shape. Reads no weights. An unsupported model_type names the supported families."""
    config = read_vlm_config(uri)
    with tempfile.TemporaryDirectory() as scratch:
        processor = AutoProcessor.from_pretrained(_processor_folder(uri, scratch), local_files_only=True)
    library = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    spec = VLMSpec(uri=uri, family=config["model_type"], config=config, processor=_saved_processor_files(processor),
                   image_token_id=int(library.image_token_id), num_image_tokens=0, prompt_tokens=0,
                   channels=int(library.vision_config.num_channels), train_vision=train_vision,
                   **_preprocessing(processor))
    ids = prompt_ids(processor, spec, "")
    images = sum(1 for i in ids if i == spec.image_token_id)
    spec = spec.model_copy(update={"num_image_tokens": images, "prompt_tokens": len(ids) - images})
    rebuilt = VLMPrompter(spec, 1).processor
    if prompt_ids(rebuilt, spec, PROBE_INSTRUCTION) != prompt_ids(processor, spec, PROBE_INSTRUCTION):
        raise ValueError(f"the processor in {uri} does not survive save_pretrained as text files (its tokenizer "
                         f"must be a fast tokenizer, whole in tokenizer.json); convert it and save it again")
    return spec


def prompt_ids(processor: ProcessorMixin, spec: VLMSpec, instruction: str) -> list[int]:
    """One instruction in the family's prompt format -> the processor's ids (image tokens expanded), unpadded."""
    family = VLM_FAMILIES[spec.family]
    blank = np.zeros((*spec.image_size, spec.channels), dtype=np.uint8)   # only its size matters to the ids
    images: list[Any] = [[blank]] if family.nest_images else [blank]
    with _ENCODING:
        batch = processor(images=images, text=[family.prompt(processor.image_token, instruction)],
                          return_tensors="pt")
    return batch["input_ids"][0].tolist()


class VLMPrompter:
    """Instruction -> (ids, attention mask) of the whole prompt, image placeholders included, right-padded (or
    cut at the end) to a fixed length. The processor is rebuilt from the carried files on first use; each
    instruction's row is cached (a policy sees the same few instructions at every step)."""

    def __init__(self, spec: VLMSpec, max_instruction_tokens: int) -> None:
        self.spec, self.length = spec, spec.text_length(max_instruction_tokens)
        self._processor: ProcessorMixin | None = None
        self._rows: dict[str, tuple[list[int], list[int]]] = {}

    @property
    def processor(self) -> ProcessorMixin:
        if self._processor is None:
            with tempfile.TemporaryDirectory() as folder:
                for name, text in self.spec.processor.items():
                    (Path(folder) / name).write_text(text)
                (Path(folder) / "config.json").write_text(json.dumps(self.spec.config))
                self._processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        return self._processor

    def _row(self, text: str) -> tuple[list[int], list[int]]:
        row = self._rows.get(text)
        if row is None:
            ids = prompt_ids(self.processor, self.spec, text)[:self.length]   # image tokens come first: never cut
            pad = self.processor.tokenizer.pad_token_id or 0
            row = (ids + [pad] * (self.length - len(ids)), [1] * len(ids) + [0] * (self.length - len(ids)))
            if len(self._rows) >= 4096:   # a task suite has tens of instructions; the bound guards free text
                self._rows.clear()
            self._rows[text] = row
        return row

    def __call__(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row(str(text)) for text in instructions]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), self.length)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.long).reshape(len(rows), self.length)
        return ids, mask


def pixel_values(spec: VLMSpec, images: torch.Tensor) -> torch.Tensor:
    """Our frames (B x C x H x W in [0, 1], i.e. uint8 / 255) -> the processor's pixel_values: rescaled and
    normalised with its constants. Frames must already have its size (the driver checks the shards; a resize here
    would not be the processor's)."""
    if tuple(images.shape[-2:]) != spec.image_size or images.shape[1] != spec.channels:
        raise ValueError(f"frames of {images.shape[1]}x{images.shape[2]}x{images.shape[3]} (CxHxW) but {spec.uri} "
                         f"({spec.family}) takes {spec.channels}x{spec.image_size[0]}x{spec.image_size[1]}; collect "
                         f"the shards at that size (collect.image_size={spec.image_size[0]})")
    shape = (1, -1, 1, 1)
    mean = torch.tensor(spec.image_mean, dtype=images.dtype, device=images.device).view(shape)
    std = torch.tensor(spec.image_std, dtype=images.dtype, device=images.device).view(shape)
    return (images * (255.0 * spec.pixel_scale) - mean) / std


def build_vlm_modules(spec: VLMSpec) -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    """The VLM's (vision tower + projector, language model) with random weights, built from its config.json with
    the library's classes (its base model: no LM head), and every tensor of both by the name the library's
    ForConditionalGeneration gives it (`model.` + the base model's name), to map the folder's weights."""
    config = hf_config(spec)
    _for_the_vla(config.get_text_config())
    with _init_deferred_under_zero3():
        base = AutoModel.from_config(config, attn_implementation="sdpa")
    vision, decoder = VLM_FAMILIES[spec.family].split(SimpleNamespace(model=base, config=base.config))
    vision.requires_grad_(spec.train_vision)
    return vision, decoder, {"model." + name: t for name, t in base.state_dict(keep_vars=True).items()}


def _is_unused(key: str) -> bool:
    """The LM head (the VLA has an action head) and rotary frequencies older checkpoints saved."""
    return key.startswith("lm_head.") or key.endswith("rotary_emb.inv_freq")


def library_key(spec: VLMSpec, folder_key: str) -> str:
    """A folder's tensor name -> the library's current name: LLaVA and PaliGemma folders (hub checkpoints, and what
    save_pretrained still writes) keep the older layout, e.g. language_model.model.layers.0... ->
    model.language_model.layers.0..."""
    for old, new in VLM_FAMILIES[spec.family].checkpoint_layout:
        if folder_key.startswith(old):
            return new + folder_key[len(old):]
    return folder_key


def load_vlm_weights(vla: nn.Module, uri: str) -> dict[str, int]:
    """Copy every weight of the VLA's VLM parts (vision tower, projector, decoder) from the folder, one tensor at a
    time from the mapped safetensors. A tensor that maps to nothing, or a VLM weight the folder lacks, is an error
    naming it, raised before any weight is copied."""
    from pipeline.models.hf_import import _shard_names  # hf_import imports the VLA, which imports this module

    spec: VLMSpec = vla.cfg.vlm
    wanted: dict[str, str] = vla.library_names          # library name -> our state_dict name
    source = TensorSource.open(uri, _shard_names(uri))
    loaded = {library_key(spec, k): k for k in source.names() if not _is_unused(library_key(spec, k))}
    unmapped = sorted(folder for key, folder in loaded.items() if key not in wanted)
    if unmapped:
        raise ValueError(f"{uri} holds {len(unmapped)} tensor(s) that map to nothing in the {spec.family} model: "
                         f"{', '.join(unmapped[:5])}; is config.json's model_type the architecture these weights "
                         f"were saved from?")
    embed = next((k for k, v in wanted.items() if v == "backbone.embed_tokens.weight"), None)
    tied = hf_config(spec).get_text_config().tie_word_embeddings
    if embed is not None and embed not in loaded and tied:   # tied embeddings saved once, under the head's name
        head = next((k for k in source.names() if library_key(spec, k) == "lm_head.weight"), None)
        if head is not None:
            loaded[embed] = head
    missing = sorted(set(wanted) - set(loaded))
    if missing:
        raise ValueError(f"{uri} lacks {len(missing)} tensor(s) of the {spec.family} model: {', '.join(missing[:5])}; "
                         f"is it the same architecture and size as its config.json says?")
    stream_into(vla, source, {wanted[key]: folder for key, folder in loaded.items()})
    if isinstance(vla.action_head, TokenHead):
        # The language model's head, or the tied embeddings it shares: the rows OpenVLA gives the action bins.
        head = next((k for k in source.names() if library_key(spec, k) == "lm_head.weight"), None)
        rows = source.tensor(head if head is not None else loaded[embed])
        assign(vla.action_head.proj.weight, lm_head_rows(vla.action_head, rows, uri))
    return {"loaded": len(loaded), "skipped": len(source.names()) - len(loaded)}
