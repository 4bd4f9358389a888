"""Persimmon in native PyTorch: config, decoder, three heads, chunked loss, generation."""

from .config import PersimmonConfig
from .decoder import KVCache, PersimmonModel
from .heads import (
    HEADS,
    ModelOutput,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonPreTrainedModel,
)

__all__ = [
    "HEADS",
    "KVCache",
    "ModelOutput",
    "PersimmonConfig",
    "PersimmonForCausalLM",
    "PersimmonForSequenceClassification",
    "PersimmonForTokenClassification",
    "PersimmonModel",
    "PersimmonPreTrainedModel",
]
