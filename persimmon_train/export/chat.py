"""Chat with an export or a checkpoint: prompt in the chat format, tokens streamed as they come."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator

import torch

from persimmon_train.errors import ConfigError


@contextlib.contextmanager
def model_folder(path: str) -> Iterator[str]:
    """An HF model folder for `path`: the folder itself, or a checkpoint exported to a temp folder."""
    from persimmon_train.export.exporter import export_checkpoint
    from persimmon_train.storage.checkpoints import MANIFEST

    if not os.path.exists(path):
        raise ConfigError(f"model: {path} does not exist")
    if os.path.isfile(os.path.join(path, "config.json")):
        yield path
        return
    if not (os.path.isfile(os.path.join(path, MANIFEST)) or os.path.isdir(os.path.join(path, "checkpoints"))):
        raise ConfigError(f"model: {path} is neither a model folder (config.json) nor a training checkpoint")
    with tempfile.TemporaryDirectory(prefix="persimmon-generate-") as tmp:
        # fp32: the exact trained weights; the caller casts once when loading.
        out = os.path.join(tmp, "model")
        export_checkpoint(path, out, dtype="fp32")
        yield out


def load_causal_lm(path: str, dtype: torch.dtype, device: str = "cpu"):
    """(model, tokenizer) from an export folder or a training checkpoint of a causal-LM run."""
    from persimmon_train.data import Tokenizer
    from persimmon_train.model import PersimmonForCausalLM

    with model_folder(path) as folder:
        architectures = _architectures(folder)
        if architectures[0] != "PersimmonForCausalLM":
            raise ConfigError(f"model: {path} is a {architectures[0]}; generation needs a causal LM")
        model = PersimmonForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        tokenizer = Tokenizer(folder)
    return model, tokenizer


def _architectures(folder: str) -> list[str]:
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("architectures") or ["PersimmonForCausalLM"]
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"model: {path} is unreadable ({exc})") from None


class IncrementalDecoder:
    """Text of the generated tokens so far, handed out as new suffixes.

    Decoding token by token breaks multi-byte characters (byte-fallback pieces) and sentencepiece's
    leading-space rule, so the whole tail is decoded each time and only the new end is emitted --
    held back while it ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer, stop_ids: set[int]):
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        if token_id not in self.stop_ids:
            self.ids.append(token_id)
        return self._new_text(final=False)

    def finish(self) -> str:
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.emitted):
            return ""  # an earlier piece decoded differently in context; cannot unprint it
        new, self.emitted = text[len(self.emitted) :], text
        return new


def stream_generate(
    model,
    tokenizer,
    prompt: str,
    *,
    chat: bool = True,
    max_new_tokens: int = 64,
    greedy: bool = True,
    temperature: float = 0.7,
    top_k: int = 0,
    top_p: float = 0.9,
    seed: int = 0,
    write: Callable[[str], object] | None = None,
) -> tuple[list[int], str]:
    """Generate after `prompt` (wrapped as `human: ...\\n\\nadept:` when chat), writing text as it comes.

    Returns (generated ids, without the prompt; the final eos included if produced) and the text.
    """
    text = tokenizer.chat_prompt(prompt) if chat else prompt
    ids = torch.tensor([tokenizer.encode(text)], dtype=torch.long, device=next(model.parameters()).device)
    if ids.shape[1] == 0:
        raise ConfigError("prompt: empty (nothing to continue from)")
    decoder = IncrementalDecoder(tokenizer, {tokenizer.eos_id})
    generator = torch.Generator(device=ids.device).manual_seed(seed)

    def on_token(column: torch.Tensor) -> None:
        piece = decoder.push(int(column[0]))
        if piece and write is not None:
            write(piece)

    out = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=tokenizer.eos_id,
        generator=generator,
        on_token=on_token,
    )
    tail = decoder.finish()
    if tail and write is not None:
        write(tail)
    return out[0, ids.shape[1] :].tolist(), decoder.emitted
