"""Build a tiny random-weight vision-language model folder (LLaVA, PaliGemma or Idefics3) fully offline.

The folder has the exact layout `save_pretrained` writes for a real checkpoint (config.json, model.safetensors,
tokenizer files, processor and preprocessor configs), so `AutoProcessor.from_pretrained(folder)` and
`AutoModelForImageTextToText.from_pretrained(folder)` load it back. Tests and smoke configs use it as a
stand-in for a pretrained VLM teacher; nothing comes from a hub.

    python -m pipeline.models.tiny_vlm OUT_DIR --family llava --image-size 64
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

DEFAULT_IMAGE_SIZE = 64   # jobs/configs/smoke.yaml collect.image_size: the smoke shards' frames
PATCH_SIZE = 8            # 64 px / 8 = 8x8 = 64 patches: <= 64 image tokens per frame
IDEFICS3_SCALE = 2        # pixel shuffle 2x2: 64 patches -> 16 image tokens
SENTENCES = ["reach to the goal position", "push the puck to the goal", "open the drawer", "pick up the red block",
             "press the button from the top", "close the window slowly", "slide the plate into the cabinet",
             "turn the faucet to the left", "put the peg in the hole"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<image>"]
IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                     *[f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]]
TEXT_SIZES = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, max_position_embeddings=256)
VISION_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    patch_size=PATCH_SIZE, num_channels=3)


def tiny_tokenizer(extra_specials: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained here on robot instructions, with the special tokens a processor needs."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=SPECIALS + extra_specials))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", extra_special_tokens={"image_token": "<image>"})


def _text_config(cls: type, tokenizer: PreTrainedTokenizerFast, **extra: object) -> object:
    return cls(**TEXT_SIZES, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **extra)


def _image_processor_sizes(image_size: int) -> dict[str, object]:
    # Mean/std 0.5 as SigLIP checkpoints use; frames arrive at the shards' size already, so resize is a no-op.
    return dict(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _llava(image_size: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    tokenizer = tiny_tokenizer([])
    config = LlavaConfig(vision_config=SiglipVisionConfig(**VISION_SIZES, image_size=image_size,
                                                          vision_use_head=False),
                         text_config=_text_config(LlamaConfig, tokenizer),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="full", vision_feature_layer=-1)
    processor = LlavaProcessor(image_processor=SiglipImageProcessor(**_image_processor_sizes(image_size)),
                               tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="full",
                               num_additional_image_tokens=0, image_token="<image>")
    return LlavaForConditionalGeneration(config), processor


def _paligemma(image_size: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    tokenizer = tiny_tokenizer([])
    image_processor = SiglipImageProcessor(**_image_processor_sizes(image_size))
    image_processor.image_seq_length = (image_size // PATCH_SIZE) ** 2   # PaliGemmaProcessor reads it from here
    # The processor adds PaliGemma's 1024 <locNNNN> and 128 <segNNN> tokens to the tokenizer: size the
    # vocabulary after it, as real checkpoints hold them (257152 = 256000 + 1152).
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    text_config = _text_config(GemmaConfig, tokenizer, head_dim=16)
    config = PaliGemmaConfig(vision_config=SiglipVisionConfig(**VISION_SIZES, image_size=image_size,
                                                              vision_use_head=False).to_dict(),
                             text_config=text_config.to_dict(), vocab_size=text_config.vocab_size,
                             hidden_size=text_config.hidden_size, projection_dim=text_config.hidden_size,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    return PaliGemmaForConditionalGeneration(config), processor


def _idefics3(image_size: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    tokenizer = tiny_tokenizer(IDEFICS3_SPECIALS)
    config = Idefics3Config(vision_config=Idefics3VisionConfig(**VISION_SIZES, image_size=image_size).to_dict(),
                            text_config=_text_config(LlamaConfig, tokenizer).to_dict(),
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=IDEFICS3_SCALE)
    # Image splitting off: one global image of image_size, no row/col tiles (a 64 px frame needs none).
    side = {"longest_edge": image_size}
    image_processor = Idefics3ImageProcessor(size=side, max_image_size=side, do_image_splitting=False,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    seq_len = (image_size // PATCH_SIZE) ** 2 // IDEFICS3_SCALE ** 2
    return Idefics3ForConditionalGeneration(config), Idefics3Processor(image_processor=image_processor,
                                                                       tokenizer=tokenizer, image_seq_len=seq_len)


BUILDERS: dict[str, Callable[[int], tuple[PreTrainedModel, ProcessorMixin]]] = {
    "llava": _llava, "paligemma": _paligemma, "idefics3": _idefics3}


def build_tiny_vlm(out_dir: str | Path, family: str = "llava", image_size: int = DEFAULT_IMAGE_SIZE,
                   seed: int = 0) -> Path:
    """Write a tiny random-weight `family` model folder (model + tokenizer + processor) into out_dir."""
    if family not in BUILDERS:
        raise ValueError(f"family={family!r} is not a tiny VLM family; choose one of: {', '.join(BUILDERS)}")
    if image_size % (PATCH_SIZE * IDEFICS3_SCALE):
        raise ValueError(f"image_size={image_size} must be a multiple of {PATCH_SIZE * IDEFICS3_SCALE} "
                         f"(patch size {PATCH_SIZE}, Idefics3 pixel shuffle {IDEFICS3_SCALE}), e.g. 64")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](image_size)
    out = Path(out_dir)
    model.eval().save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--family", choices=list(BUILDERS), default="llava")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_vlm(args.out_dir, args.family, args.image_size, args.seed))


if __name__ == "__main__":
    main()
