"""Adapters: LoRA through peft (apply, merge for export, save in PEFT format)."""

from persimmon_train.adapters.lora import apply_lora, lora_config, merge_lora_state_dict, save_adapter

__all__ = ["apply_lora", "lora_config", "merge_lora_state_dict", "save_adapter"]
