"""Export: training checkpoints -> plain HF folders (LoRA merged, streamed) or PEFT adapters; generation."""

from persimmon_train.export.checkpoint_source import Checkpoint, is_checkpoint, iter_checkpoint_weights, locate_checkpoint
from persimmon_train.export.exporter import ExportResult, export_checkpoint
from persimmon_train.export.hf_folder import write_hf_folder
from persimmon_train.export.safetensors_stream import ShardWriter, iter_weights_folder

__all__ = ["Checkpoint", "ExportResult", "ShardWriter", "export_checkpoint", "is_checkpoint",
           "iter_checkpoint_weights", "iter_weights_folder", "locate_checkpoint", "write_hf_folder"]
