"""The VLA policy: vision patches + instruction tokens + proprioception -> HF decoder -> continuous action.

Teacher and student are this one class: the teacher has no router (or runs it forced open), the
student carries a router that decides which decoder layers run for each input.
"""

from __future__ import annotations

import zlib
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn
from transformers import PretrainedConfig

from pipeline.config import ModelSection
from pipeline.data.manifest import Stats
from pipeline.errors import BadInput
from pipeline.models.action_head import ACTION_HEADS, TokenHead, regression_head, token_range
from pipeline.models.backbones import backbone_config, backbone_dims, build_backbone, pretrained_config
from pipeline.models.router import (GatedLayer, GateMode, GateState, Router, StaticRouter, decide, pin_gates,
                                    top_k_mask)
from pipeline.models.tokenizer import BackboneTokenizer
from pipeline.models.vlm_backbone import (
    VLMPrompter,
    VLMSpec,
    build_vlm_modules,
    pixel_values,
    read_vlm_spec,
    vlm_dims,
)
from pipeline.models.vlm_import import VLM_FAMILIES, check_image_compatibility


class VLAConfig(BaseModel):
    """Everything needed to rebuild a VLA; stored as config.json beside the safetensors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    backbone: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    max_instruction_tokens: int
    image_size: int
    patch_size: int
    proprio_dim: int
    action_dim: int
    vision_stem: str = "patch"        # patch: one strided conv; mlp: two patchify stages with a GELU
    router_hidden: int | None = None  # None: a teacher (no router)
    # router.select=topk: at inference exactly this many layers run per call, the ones with the largest gates;
    # None: every layer whose gate passes the threshold (and every checkpoint written before this field existed).
    router_keep: int | None = None
    # router.pinned: layers the router runs for every input (gates fixed at 1); None: it chooses every layer (and
    # every checkpoint written before this field existed).
    router_pinned: tuple[int, ...] | None = None
    static_layers: tuple[int, ...] | None = None  # a fixed set of layers instead of a router (ablation)
    # A pretrained backbone's full config.json; None: a from-scratch decoder with our defaults (and every
    # checkpoint written before this field existed).
    hf_config: dict[str, Any] | None = None
    # That backbone's tokenizer as the text files save_pretrained writes (name -> content); None: instructions
    # are hashed words (from-scratch teachers).
    tokenizer: dict[str, str] | None = None
    # A pretrained vision-language model the VLA is built from (vision tower + projector, its prompt and its
    # language model as the routed decoder); hf_config then holds its language model's config. None: our stem.
    vlm: VLMSpec | None = None
    # The action head (pipeline/models/action_head.py): regression, or tokens with `action_bins` bins per dimension
    # between action_low and action_high (normalised units: the data's 1st and 99th percentiles).
    action_head: str = "regression"
    action_bins: int = 256
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _tokens_head_has_its_range(self) -> VLAConfig:
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"unknown action head {self.action_head!r}; choose one of {', '.join(ACTION_HEADS)}")
        if self.action_head == "tokens":
            sizes = (len(self.action_low or ()), len(self.action_high or ()))
            if sizes != (self.action_dim, self.action_dim):
                raise ValueError(f"a tokens action head needs action_low and action_high of action_dim="
                                 f"{self.action_dim} values each (the bins' range), got {sizes}")
            if any(lo >= hi for lo, hi in zip(self.action_low, self.action_high)):
                raise ValueError(f"action_low {self.action_low} must lie below action_high {self.action_high}")
        return self

    @model_validator(mode="after")
    def _sizes_match_the_hf_config(self) -> VLAConfig:
        if self.hf_config is None:
            return self
        theirs = backbone_dims(self.hf_config)
        wrong = {k: (getattr(self, k), v) for k, v in theirs.items() if getattr(self, k) != v}
        if wrong:
            raise ValueError(f"the VLA config disagrees with its hf_config (the backbone's config.json) on "
                             f"{wrong} (ours, config.json); take the sizes from the config.json (backbone_dims)")
        return self

    @property
    def num_patches(self) -> int:
        """Vision tokens per frame: our stem's patches, or the VLM's image features."""
        if self.vlm is not None:
            return self.vlm.num_image_tokens
        return (self.image_size // self.patch_size) ** 2

    @property
    def action_queries(self) -> int:
        """Query tokens after proprio: one for the regression head, one per action dimension for tokens."""
        return self.action_dim if self.action_head == "tokens" else 1

    @property
    def seq_len(self) -> int:
        # vision patches, instruction tokens (a VLM: its whole prompt, image tokens included), proprio, action queries
        tail = 1 + self.action_queries
        if self.vlm is not None:
            return self.vlm.text_length(self.max_instruction_tokens) + tail
        return self.num_patches + self.max_instruction_tokens + tail


# model.attention's choices; pipeline/config.py ModelSection.attention lists the same names.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")

STEM_FIRST, STEM_WIDTH = 4, 64   # the mlp stem's first patchify (pixels) and its channel width


class PatchMLP(nn.Module):
    """Two patchify stages with a GELU between: 4x4 pixel patches -> 64 channels, then (p/4)^2 of those -> d.

    The same maths as Conv(k=4, s=4) -> GELU -> Conv(k=p/4, s=p/4), written as reshapes and matrix
    products: at batch 1 on CPU small strided conv kernels cost ~1.5 ms per call (as much as two
    decoder layers at the demo width), the two matmuls ~0.1-0.2 ms.
    """

    def __init__(self, d: int, patch_size: int, width: int = STEM_WIDTH, first: int = STEM_FIRST) -> None:
        super().__init__()
        if patch_size % first or patch_size < first:
            raise ValueError(f"model.vision_stem=mlp needs model.patch_size divisible by {first}, got {patch_size}; "
                             f"use 8 or 16, or model.vision_stem=patch")
        self.first, self.second = first, patch_size // first
        self.stage1 = nn.Linear(3 * first * first, width)
        self.stage2 = nn.Linear(width * self.second ** 2, d)
        self.act = nn.GELU()

    @staticmethod
    def _patchify(x: torch.Tensor, k: int) -> torch.Tensor:
        """B x C x H x W -> B x C*k*k x H/k x W/k (non-overlapping k x k blocks, channels-major)."""
        b, c, h, w = x.shape
        x = x.reshape(b, c, h // k, k, w // k, k).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(b, c * k * k, h // k, w // k)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._patchify(images, self.first).permute(0, 2, 3, 1)        # B x H/4 x W/4 x 48
        x = self.act(self.stage1(x)).permute(0, 3, 1, 2)                   # B x width x H/4 x W/4
        x = self._patchify(x, self.second).permute(0, 2, 3, 1)            # B x H/p x W/p x width*(p/4)^2
        return self.stage2(x).permute(0, 3, 1, 2)                          # B x d x H/p x W/p


VISION_STEMS = ("patch", "mlp")


def vision_stem(kind: str, d: int, patch_size: int) -> nn.Module:
    """Image -> (B, d, H/p, W/p) patch features: patch (one p x p strided conv, a ViT stem) or mlp (PatchMLP)."""
    if kind == "patch":
        return nn.Conv2d(3, d, kernel_size=patch_size, stride=patch_size)
    if kind == "mlp":
        return PatchMLP(d, patch_size)
    raise KeyError(f"unknown vision stem {kind!r}; choose one of {', '.join(VISION_STEMS)}")


def tokenize(instructions: list[str], vocab_size: int, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hash words into vocab buckets (0 is padding): deterministic, offline, no tokenizer download."""
    rows = [[1 + zlib.crc32(word.encode()) % (vocab_size - 1) for word in str(text).lower().split()[:max_len]]
            for text in instructions]
    # One tensor from padded lists: writing ids element by element cost ~0.07 ms per batch-1 call.
    ids = torch.tensor([row + [0] * (max_len - len(row)) for row in rows], dtype=torch.long)
    ids = ids.reshape(len(instructions), max_len)
    return ids, (ids != 0).long()


class VLAOutput(NamedTuple):
    """A named tuple, not a dataclass: ZeRO-3's module hooks only see tensors inside tuples, lists and
    dicts, and with a dataclass output they released the weights that backward still needed."""

    actions: torch.Tensor                 # B x action_dim (normalised units)
    gates: torch.Tensor | None            # B x L router output, None for a teacher
    executed: torch.Tensor                # B x L, 1 where the layer ran
    hidden: list[torch.Tensor] | None     # per-layer B x N x d when recorded
    token_mask: torch.Tensor              # B x N, 1 for real tokens
    action_logits: torch.Tensor | None = None   # B x A x bins for a tokens head (actions are its decoded bins)


class VLA(nn.Module):
    def __init__(self, cfg: VLAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        # Construction order (and so the seeded initial weights) of a VLA with our stem is as it always was.
        if cfg.vlm is None:
            self.patch = vision_stem(cfg.vision_stem, d, cfg.patch_size)
            self.patch_pos = nn.Parameter(torch.zeros(1, cfg.num_patches, d))
            self.vision_norm = nn.LayerNorm(d)
        self.proprio = nn.Sequential(nn.Linear(cfg.proprio_dim, d), nn.GELU(), nn.Linear(d, d))
        self.action_query = nn.Parameter(torch.zeros(1, cfg.action_queries, d))
        if cfg.vlm is None:
            nn.init.normal_(self.patch_pos, std=0.02)
        nn.init.normal_(self.action_query, std=0.02)
        library: dict[str, torch.Tensor] = {}
        self.tokenizer: BackboneTokenizer | None = None
        self.prompter: VLMPrompter | None = None
        if cfg.vlm is not None:
            # The VLM's vision tower + projector (frozen unless vlm.train_vision) and its language model.
            self.vision, self.backbone, library = build_vlm_modules(cfg.vlm)
            self.prompter = VLMPrompter(cfg.vlm, cfg.max_instruction_tokens)
        else:
            self.backbone = build_backbone(cfg.backbone, _decoder_config(cfg))
            # Instructions: the backbone's own tokenizer (loaded on first use), hashed words for from-scratch ones.
            if cfg.tokenizer is not None:
                self.tokenizer = BackboneTokenizer(cfg.tokenizer, cfg.hf_config, cfg.max_instruction_tokens)
        self.gate_state = GateState()
        for i, layer in enumerate(list(self.backbone.layers)):
            self.backbone.layers[i] = GatedLayer(layer, i, self.gate_state)
        self.action_head = (TokenHead(d, cfg.action_bins, cfg.action_low, cfg.action_high)
                            if cfg.action_head == "tokens" else regression_head(d, cfg.action_dim))
        # The decoder's sdpa mask, causal part: built once (see _attention_mask); None where the decoder must
        # build its own. Not saved with the weights.
        self.register_buffer("causal", self._prepared_causal(), persistent=False)
        self.router: Router | StaticRouter | None = None
        if cfg.router_hidden:
            self.router = Router(d, cfg.router_hidden, cfg.num_layers)
        elif cfg.static_layers:
            self.router = StaticRouter(cfg.static_layers, cfg.num_layers)
        # A VLM's tensors by the library's names -> ours (the same tensors): how its folder's weights map in.
        ours = {id(t): name for name, t in self.state_dict(keep_vars=True).items()}
        self.library_names = {name: ours[id(t)] for name, t in library.items()}

    def _prepared_causal(self) -> torch.Tensor | None:
        hf_cfg, n = self.backbone.config, self.cfg.seq_len
        window = getattr(hf_cfg, "sliding_window", None)
        prepared = (hf_cfg._attn_implementation == "sdpa" and (window is None or window >= n)
                    and not getattr(hf_cfg, "use_bidirectional_attention", False))
        return torch.ones(n, n, dtype=torch.bool).tril() if prepared else None

    def set_attention(self, implementation: str) -> VLA:
        """The decoder's attention implementation (model.attention): sdpa (built with it), flash_attention_2 (GPU,
        flash_attn; gets the B x N padding mask, no N x N mask is built) or eager. A run-time choice, not part of
        the checkpoint: the same weights run under any of them."""
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise KeyError(f"unknown attention implementation {implementation!r} (model.attention); choose one of "
                           f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        # The attention modules read the config's implementation at every call (transformers 5.23).
        self.backbone.config._attn_implementation = implementation
        causal = self._prepared_causal()
        self.causal = causal.to(self.action_query.device) if causal is not None else None
        return self

    def checkpoint_layers(self) -> VLA:
        """Activation checkpointing (train.activation_checkpointing): each inner Hugging Face decoder layer (a
        GradientCheckpointingLayer) keeps only its inputs and recomputes its forward in backward. Our GatedLayer
        wrapper stays outside the checkpoint: its per-forward gate state is thread-local, and autograd may run
        the recompute on another thread, where that state would not be visible."""
        self.backbone.activation_checkpointing_enable()
        return self

    def embed(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input embeddings (B x N x d), token mask, and the vision, text, text-mask parts the router reads."""
        if self.cfg.vlm is not None:
            prompt, prompt_mask, vision, text, text_mask = self._embed_vlm_prompt(images, instructions)
        else:
            vision = self.vision_norm(self.patch(images).flatten(2).transpose(1, 2) + self.patch_pos)
            ids, text_mask = self.instruction_ids(instructions)
            ids, text_mask = ids.to(images.device), text_mask.to(images.device)
            # The decoder's own embedding module, as its forward(input_ids=...) would call it. For Gemma this
            # matters: in transformers 5.23 the sqrt(hidden_size) scale lives in GemmaTextScaledWordEmbedding, not
            # in GemmaModel.forward, which passes inputs_embeds through unscaled. So text tokens here are scaled
            # exactly as the library scales the same ids, and the vision/proprio tokens (inputs_embeds) are not.
            text = self.backbone.get_input_embeddings()(ids)
            prompt = torch.cat([vision, text], dim=1)
            ones = torch.ones(vision.shape[:2], dtype=torch.long, device=images.device)
            prompt_mask = torch.cat([ones, text_mask], 1)
        batch = images.shape[0]
        tail = torch.cat([self.proprio(proprio).unsqueeze(1), self.action_query.expand(batch, -1, -1)], 1)
        tokens = torch.cat([prompt, tail], dim=1)
        mask = torch.cat([prompt_mask, torch.ones(batch, tail.shape[1], dtype=torch.long, device=images.device)], 1)
        return tokens, mask, vision, text, text_mask

    def _embed_vlm_prompt(self, images: torch.Tensor, instructions: list[str]
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The VLM's prompt as its own forward embeds it: token embeddings with each image placeholder replaced by
        the next image feature (the library's masked_scatter). Vision = the image features; text = every other
        prompt token (template and instruction), which every row holds the same number of."""
        spec = self.cfg.vlm
        ids, mask = self.instruction_ids(instructions)
        ids, mask = ids.to(images.device), mask.to(images.device)
        vision = self.vision(pixel_values(spec, images))
        is_image = ids == spec.image_token_id
        table = self.backbone.get_input_embeddings()
        # PaliGemma's image token lies past the embedding table: it embeds as id 0 before it is replaced.
        embeds = table(ids.masked_fill(is_image, 0) if spec.image_token_id >= table.num_embeddings else ids)
        prompt = embeds.masked_scatter(is_image.unsqueeze(-1), vision.to(embeds.dtype))
        batch, d = ids.shape[0], embeds.shape[-1]
        return prompt, mask, vision, embeds[~is_image].reshape(batch, -1, d), mask[~is_image].reshape(batch, -1)

    def instruction_ids(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B x max_instruction_tokens ids and attention mask: the backbone's tokenizer, or hashed words. A VLM: the
        ids of its whole prompt (B x its text_length), image placeholders included."""
        if self.prompter is not None:
            return self.prompter(instructions)
        if self.tokenizer is not None:
            return self.tokenizer(instructions)
        return tokenize(instructions, self.cfg.vocab_size, self.cfg.max_instruction_tokens)

    def forward(self, images: torch.Tensor, instructions: list[str], proprio: torch.Tensor,
                mode: GateMode = "off", threshold: float = 0.5, record: bool = False,
                temperature: float = 1.0, lockstep: bool = False) -> VLAOutput:
        """mode: off (teacher / router forced open), soft, straight_through, topk (training), hard (inference).

        lockstep: hard mode on every rank of a ZeRO-3 group at once (validation): ranks call the same layers in
        the same order (see router.decide). Never for a served or single-process model: it is a collective."""
        tokens, mask, vision, text, text_mask = self.embed(images, instructions, proprio)
        batch, layers = images.shape[0], self.cfg.num_layers
        gates = self.router(vision, text, text_mask, temperature) if (self.router is not None and mode != "off") else None
        pinned = self.cfg.router_pinned or ()
        if gates is not None:
            gates = pin_gates(gates, pinned)
        state = self.gate_state   # this thread's; reset when the call ends, so nothing outlives it
        try:
            state.mode, state.gates, state.threshold = (mode if gates is not None else "off"), gates, threshold
            state.hidden = [] if record else None
            if gates is None:
                executed = torch.ones(batch, layers, device=images.device)
            elif mode == "hard":
                executed = decide(state, gates, threshold, lockstep, self.cfg.router_keep, pinned)
            elif mode == "straight_through":
                executed = (gates >= threshold).to(gates.dtype)
            elif mode == "topk":
                if self.cfg.router_keep is None:
                    raise ValueError("mode=topk trains the pattern a router.select=topk student deploys, but this "
                                     "model has no router_keep; build it with student_config(..., keep)")
                state.run = top_k_mask(gates, self.cfg.router_keep, pinned)
                executed = state.run.to(gates.dtype)
            else:
                executed = gates.detach()
            out = self.backbone(inputs_embeds=tokens, **self.decoder_inputs(mask, tokens.dtype), use_cache=False)
            hidden = state.hidden
        finally:
            state.reset()
        logits = None
        if isinstance(self.action_head, TokenHead):
            logits = self.action_head(out.last_hidden_state[:, -self.cfg.action_queries:])
            actions = self.action_head.decode(logits)
        else:
            actions = self.action_head(out.last_hidden_state[:, -1])
        return VLAOutput(actions=actions, gates=gates, executed=executed, hidden=hidden, token_mask=mask,
                         action_logits=logits)

    def decoder_inputs(self, mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The attention mask (and positions) the decoder gets for the B x N token mask. A PaliGemma VLM: what its
        own forward hands its decoder: positions from 1, and the prompt (prefix) attending both ways, proprio and
        action query causally after it; the prefix never sees them, so its states are the VLM's own."""
        family = VLM_FAMILIES[self.cfg.vlm.family] if self.cfg.vlm is not None else None
        if family is None or not family.prefix_bidirectional:
            return {"attention_mask": self._attention_mask(mask)}
        n, implementation = mask.shape[1], self.backbone.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            raise ValueError(f"model.attention={implementation}: a {self.cfg.vlm.family} teacher's prefix mask needs "
                             f"model.attention=sdpa or eager")
        real = mask.bool()
        prefix = real.clone()
        prefix[:, -(1 + self.cfg.action_queries):] = False   # proprio and the action queries follow the prefix
        causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        allowed = ((causal | (prefix[:, :, None] & prefix[:, None, :])) & real[:, None, :])[:, None]
        if implementation == "eager":   # an additive mask, as the library's eager path takes it
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        positions = torch.arange(n, device=mask.device).unsqueeze(0) + family.position_offset
        return {"attention_mask": allowed, "position_ids": positions}

    def _attention_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The decoder's B x 1 x N x N boolean mask (causal, padding keys masked), the one its sdpa path
        builds from the B x N token mask, in one tensor op: the decoder's own builder cost ~0.2 ms of a
        ~3 ms batch-1 student call. Another attention implementation or a sliding window shorter than the
        sequence: the B x N mask itself, from which eager builds its additive mask and flash_attention_2 takes
        the padding lengths (or None when nothing is padded) without any N x N mask."""
        if self.causal is None:
            return mask
        return self.causal & mask.bool()[:, None, None, :]


def _decoder_config(cfg: VLAConfig) -> PretrainedConfig:
    """The decoder's config: a pretrained one exactly as its config.json says, else our from-scratch defaults."""
    if cfg.hf_config is not None:
        return pretrained_config(cfg.hf_config, cfg.seq_len)
    return backbone_config(cfg.backbone, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
                           num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                           intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
                           max_positions=max(64, cfg.seq_len))


def teacher_config(model: ModelSection, image_shape: list[int], proprio_dim: int, action_dim: int,
                   action_stats: Stats | None = None) -> VLAConfig:
    """A teacher's config: widths from the model section, input/output sizes from the data manifest. A tokens
    head takes its bins' range from the manifest's action statistics (action_stats)."""
    head = action_head_fields(model, action_dim, action_stats)
    cfg = _teacher_body(model, image_shape, proprio_dim, action_dim, head)
    pretrained = model.pretrained_vlm or model.pretrained_backbone
    if cfg.action_head == "tokens" and pretrained and cfg.vocab_size < cfg.action_bins:
        raise ValueError(f"model.action_bins={cfg.action_bins} exceeds the vocabulary of {pretrained} "
                         f"({cfg.vocab_size} tokens): the bins start from its last action_bins token rows; set "
                         f"model.action_bins to at most {cfg.vocab_size}")
    return cfg


def action_head_fields(model: ModelSection, action_dim: int, action_stats: Stats | None) -> dict[str, Any]:
    """The VLAConfig fields of model.action_head: a tokens head's bins and their range (normalised units)."""
    if model.action_head == "regression":
        return {}
    if action_stats is None:
        raise ValueError("model.action_head=tokens bins each action dimension between the data's 1st and 99th "
                         "percentiles: pass the manifest's action_stats")
    if len(action_stats.q01) != action_dim:
        raise ValueError(f"action_stats hold {len(action_stats.q01)} dimensions, the actions {action_dim}")
    low, high = token_range(action_stats)
    return {"action_head": "tokens", "action_bins": model.action_bins, "action_low": low, "action_high": high}


def _teacher_body(model: ModelSection, image_shape: list[int], proprio_dim: int, action_dim: int,
                  head: dict[str, Any]) -> VLAConfig:
    if model.pretrained_vlm:
        # A VLM fixes its vision tower, prompt and decoder; the shards' frames must be what its processor makes.
        spec = read_vlm_spec(model.pretrained_vlm, model.train_vision)
        try:
            check_image_compatibility(spec, image_shape)
        except ValueError as exc:
            raise BadInput(str(exc)) from None
        return VLAConfig(**vlm_dims(spec), max_instruction_tokens=model.max_instruction_tokens,
                         image_size=image_shape[0], proprio_dim=proprio_dim, action_dim=action_dim, **head)
    if image_shape[0] != image_shape[1]:
        raise ValueError(f"images are {image_shape[0]}x{image_shape[1]}; the vision encoder needs square images")
    if image_shape[0] % model.patch_size:
        raise ValueError(f"model.patch_size={model.patch_size} does not divide the shards' image size "
                         f"{image_shape[0]}; choose a divisor such as 8 or 16")
    dims = dict(backbone=model.backbone, hidden_size=model.hidden_size, num_layers=model.num_layers,
                num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
                intermediate_size=model.intermediate_size, vocab_size=model.vocab_size)
    if model.pretrained_backbone:
        from pipeline.models.hf_import import pretrained_dims

        # A pretrained decoder fixes its own architecture and tokenizer; the model section's widths do not apply.
        dims = pretrained_dims(model.pretrained_backbone)
    return VLAConfig(**dims, max_instruction_tokens=model.max_instruction_tokens, image_size=image_shape[0],
                     patch_size=model.patch_size, proprio_dim=proprio_dim, action_dim=action_dim,
                     vision_stem=model.vision_stem, **head)
