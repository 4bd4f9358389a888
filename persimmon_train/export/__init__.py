"""Export: training checkpoints -> plain HF folders (LoRA merged, streamed) or PEFT adapters;
the end of a run; generation; ADEPT's original release -> HF folder."""

from persimmon_train.export.exporter import ExportResult, export_checkpoint

__all__ = ["ExportResult", "export_checkpoint"]
