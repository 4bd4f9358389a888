"""Adapters: LoRA through peft (apply, merge for export, names and settings in PEFT format)."""

from persimmon_train.adapters.lora import apply_lora, lora_config, merge_lora_weight, peft_saved_name, peft_settings

__all__ = ["apply_lora", "lora_config", "merge_lora_weight", "peft_saved_name", "peft_settings"]
