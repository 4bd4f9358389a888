"""A LoRA checkpoint as a PEFT adapter folder: adapter_config.json + adapter_model.safetensors.

The keys are peft's saved names -- the training names without the adapter name
(`base_model.model.model.layers.0.self_attn.query_key_value.lora_A.weight`,
`base_model.model.score.weight` for a trained head) -- so `peft.PeftModel.from_pretrained` loads
the folder onto transformers' Persimmon classes (or ours) built from the base model.
"""

from __future__ import annotations

import os

import torch

from persimmon_train.adapters.lora import ADAPTER_NAME, lora_config
from persimmon_train.export.safetensors_stream import staged_folder, write_safetensors_file

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_saved_name(key: str) -> str:
    """Training name -> the name peft writes (and expects) in adapter_model.safetensors."""
    return (key.replace(f".modules_to_save.{ADAPTER_NAME}.", ".")
               .replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.")
               .replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B."))


def write_adapter_folder(out_dir: str, raw: dict[str, torch.Tensor], cfg, *, dtype: torch.dtype,
                         tokenizer=None) -> list[str]:
    """Write the adapter (weights cast to `dtype`) with its LoraConfig; returns the files written."""
    config = lora_config(cfg.peft, cfg.task)
    config.base_model_name_or_path = cfg.model.path
    config.inference_mode = True
    weights = {peft_saved_name(k): v.detach().to("cpu", dtype).contiguous() for k, v in raw.items()}
    with staged_folder(out_dir) as tmp:
        os.makedirs(tmp)
        write_safetensors_file(os.path.join(tmp, ADAPTER_WEIGHTS), weights)
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return sorted(os.listdir(out_dir))
