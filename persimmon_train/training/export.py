"""The end of a run: `output_dir/final/`, a plain HF model folder (LoRA merged) with the tokenizer."""

from __future__ import annotations

import logging

from persimmon_train.adapters.lora import PEFT_PREFIX, merge_lora_state_dict
from persimmon_train.export.hf_folder import DTYPES, write_hf_folder

log = logging.getLogger("persimmon_train")


def export_final_model(strategy, cfg, *, model_class, model_config, tokenizer, out_dir: str) -> str | None:
    """Gather the full weights (collective), merge LoRA, write config + safetensors + tokenizer.

    Written by the same code as `recipes/export.py` (`write_hf_folder`: names and shapes checked,
    `<out_dir>.tmp` renamed into place, so `final/` only ever holds a complete model).
    """
    state = strategy.full_state_dict()
    if not strategy.is_main:
        return None
    if cfg.peft.method == "lora":
        state = merge_lora_state_dict(state, cfg.peft)
    else:
        state = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    write_hf_folder(out_dir, state.items(), model_class=model_class, config=model_config, tokenizer=tokenizer,
                    dtype=DTYPES[cfg.export.dtype])
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
