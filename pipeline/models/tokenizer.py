"""The instruction tokenizer of a pretrained backbone: read from its folder, carried inside our checkpoints.

A pretrained decoder only understands the ids of its own tokenizer, so a teacher started from a Hugging Face
folder tokenizes instructions with `AutoTokenizer.from_pretrained(folder)`. The files that tokenizer writes
with `save_pretrained` travel in the VLA config (config.json of every policy we save), so probing,
distillation, evaluation and the served student tokenize identically without the original folder.
"""

from __future__ import annotations

import json
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.data import storage
from pipeline.errors import MissingInput

# Files a Hugging Face tokenizer may consist of (any of them makes a folder tokenizable).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja")
MAX_CACHED_INSTRUCTIONS = 4096   # a task suite has tens of instructions; the bound only guards free text
# A fast tokenizer called with padding/truncation from two threads at once can fail ("Already borrowed"): a
# policy served from threads encodes one new instruction at a time. Module-level so models stay deep-copyable.
_ENCODING = threading.Lock()


def _with_pad_token(tokenizer: PreTrainedTokenizerBase, where: str) -> PreTrainedTokenizerBase:
    """Llama-2's tokenizer has no pad token: pad with eos (or unk). Padded positions are masked out of
    attention, so the id only has to exist."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"the tokenizer in {where} has no pad, eos or unk token to pad instructions with; "
                             f"set one (tokenizer.pad_token = ...) and save it again with save_pretrained")
        tokenizer.pad_token = fallback
    return tokenizer


def read_tokenizer_files(uri: str, hf_config: dict[str, Any]) -> dict[str, str]:
    """The backbone folder's tokenizer as the text files `save_pretrained` writes (name -> content)."""
    present = [name for name in TOKENIZER_FILES if storage.exists(storage.join(uri, name))]
    if not present:
        raise MissingInput(
            f"{uri} holds no tokenizer files (looked for {', '.join(TOKENIZER_FILES)}); a pretrained backbone "
            f"reads instructions with its own tokenizer: save it into the folder with "
            f"AutoTokenizer.from_pretrained(<source>).save_pretrained('{uri}')")
    with tempfile.TemporaryDirectory() as source, tempfile.TemporaryDirectory() as saved:
        for name in present:   # s3:// folders are copied locally: AutoTokenizer reads local paths only
            (Path(source) / name).write_bytes(storage.read_bytes(storage.join(uri, name)))
        (Path(source) / "config.json").write_text(json.dumps(hf_config))
        tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(source), uri)
        tokenizer.save_pretrained(saved)
        # A fast tokenizer is whole in tokenizer.json; binary leftovers (a sentencepiece model) are not carried,
        # so the carried files are rebuilt once here and must give the very same tokenizer.
        files = {p.name: p.read_text() for p in sorted(Path(saved).iterdir()) if _is_text(p)}
    _check_rebuilt(tokenizer, BackboneTokenizer(files, hf_config, 1).hf_tokenizer, uri, hf_config["vocab_size"])
    return files


def _check_rebuilt(original: PreTrainedTokenizerBase, rebuilt: PreTrainedTokenizerBase, uri: str,
                   vocab_size: int) -> None:
    """The carried files must rebuild the folder's tokenizer, and every id must index the embedding table."""
    probe = "Pick up the red block, then open the drawer 2x!"
    if rebuilt.get_vocab() != original.get_vocab() or rebuilt(probe)["input_ids"] != original(probe)["input_ids"]:
        raise ValueError(f"the tokenizer in {uri} does not survive save_pretrained as text files (tokenizer.json); "
                         f"convert it to a fast tokenizer and save it into the folder again")
    if len(original) > vocab_size:
        raise ValueError(f"the tokenizer in {uri} has {len(original)} tokens but config.json says "
                         f"vocab_size={vocab_size}: its ids run past the embedding table; is it this model's "
                         f"tokenizer?")


def _is_text(path: Path) -> bool:
    try:
        path.read_text()
    except UnicodeDecodeError:
        return False
    return True


class BackboneTokenizer:
    """Instruction -> (ids, attention mask) with the backbone's own tokenizer, padded and truncated to a fixed
    length. Loaded once per model on first use; each instruction's row is cached, because a policy sees the
    same few task instructions at every step: a cached batch-1 call costs ~0.04 ms on CPU, no more than
    hashing words, against ~0.12 ms for a tokenizer call."""

    def __init__(self, files: dict[str, str], hf_config: dict[str, Any] | None, max_len: int) -> None:
        self.files, self.hf_config, self.max_len = files, hf_config, max_len
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._rows: dict[str, tuple[list[int], list[int]]] = {}

    @property
    def hf_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            with tempfile.TemporaryDirectory() as folder:
                for name, text in self.files.items():
                    (Path(folder) / name).write_text(text)
                if self.hf_config is not None:
                    (Path(folder) / "config.json").write_text(json.dumps(self.hf_config))
                self._tokenizer = _with_pad_token(AutoTokenizer.from_pretrained(folder), "the VLA config")
        return self._tokenizer

    def _row(self, text: str) -> tuple[list[int], list[int]]:
        row = self._rows.get(text)
        if row is None:
            # With padding to a fixed max_length each row is independent of the rest of the batch.
            with _ENCODING:
                enc = self.hf_tokenizer(text, padding="max_length", truncation=True, max_length=self.max_len)
            row = (list(enc["input_ids"]), list(enc["attention_mask"]))
            if len(self._rows) >= MAX_CACHED_INSTRUCTIONS:
                self._rows.clear()
            self._rows[text] = row
        return row

    def __call__(self, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row(str(text)) for text in instructions]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long).reshape(len(rows), self.max_len)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.long).reshape(len(rows), self.max_len)
        return ids, mask

