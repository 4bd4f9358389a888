"""Autoregressive decoding with a KV cache: greedy, or sampling with temperature / top-k / top-p.

Positions follow transformers' `generate`: with a padding mask, position = (number of real tokens
so far) - 1, so left-padded prompts decode exactly as they would unpadded.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .decoder import KVCache


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf; always keeps the best token."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens ranked above it already reach top_p.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Return prompt + generated ids ([batch, prompt_len + n]); rows stop at `eos_token_id`.

    Finished rows are filled with `pad_token_id` (or eos) until every row is done. `on_token`
    receives each new column of tokens as it is produced (for streaming to a console).
    """
    config = model.config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else eos
    pad = pad_token_id
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    was_training = model.training
    model.eval()
    cache = KVCache(config.num_hidden_layers)
    out = input_ids
    step_ids = input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    try:
        for _ in range(max_new_tokens):
            positions = _positions(attention_mask)[:, -step_ids.shape[1] :]
            logits = (
                model(step_ids, attention_mask=attention_mask, position_ids=positions, cache=cache)
                .logits[:, -1, :]
                .float()
            )
            if do_sample:
                logits = filter_logits(logits / max(temperature, 1e-5), top_k, top_p)
                next_ids = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
            else:
                next_ids = logits.argmax(-1)
            if pad is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
            out = torch.cat((out, next_ids[:, None]), dim=-1)
            if on_token is not None:
                on_token(next_ids)
            if eos is not None:
                finished = finished | (next_ids == eos)
                if bool(finished.all()):
                    break
            step_ids = next_ids[:, None]
            attention_mask = torch.cat((attention_mask, torch.ones_like(step_ids)), dim=-1)
    finally:
        model.train(was_training)
    return out
