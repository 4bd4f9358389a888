"""The end of a run: `output_dir/final/`, a plain HF model folder (LoRA merged) with the tokenizer."""

from __future__ import annotations

import logging
import os
import shutil

import torch

from persimmon_train.adapters.lora import PEFT_PREFIX, merge_lora_state_dict

log = logging.getLogger("persimmon_train")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def export_final_model(strategy, cfg, *, model_class, model_config, tokenizer, out_dir: str) -> str | None:
    """Gather the full weights (collective), merge LoRA, write config + safetensors + tokenizer.

    Written into `<out_dir>.tmp` and renamed, so `final/` only ever holds a complete model.
    """
    state = strategy.full_state_dict()
    if not strategy.is_main:
        return None
    if cfg.peft.method == "lora":
        state = merge_lora_state_dict(state, cfg.peft)
    else:
        state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    dtype = DTYPES[cfg.export.dtype]
    state = {k: v.detach().to("cpu", dtype) for k, v in state.items()}
    with torch.device("meta"):
        shell = model_class(model_config)  # only for its config and save_pretrained
    expected = set(shell.state_dict())
    if set(state) != expected:
        raise RuntimeError(f"export: weight names differ from {model_class.__name__}: "
                           f"missing {sorted(expected - set(state))[:5]} extra {sorted(set(state) - expected)[:5]}")
    tmp = out_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shell.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("final model (%s%s): %s", cfg.export.dtype, ", LoRA merged" if cfg.peft.method == "lora" else "",
             out_dir)
    return out_dir


def save_adapter_folder(strategy, cfg, out_dir: str) -> str | None:
    """The LoRA adapter alone, in PEFT format (single-process strategies only)."""
    if cfg.peft.method != "lora" or not strategy.is_main or strategy.world_size != 1:
        return None
    try:
        from persimmon_train.adapters import save_adapter

        save_adapter(strategy.unwrapped_model(), out_dir)
        return out_dir
    except Exception as exc:  # noqa: BLE001 - the merged model in final/ is the product; this is a bonus
        log.warning("could not write the PEFT adapter folder %s: %s", out_dir, exc)
        return None
