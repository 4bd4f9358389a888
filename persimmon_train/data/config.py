"""DataConfig: every data setting in one Hydra-friendly dataclass (all fields have defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from persimmon_train.errors import ConfigError

FORMATS = ("text", "chat", "classification", "token_classification", "preference")
PACKED_FORMATS = ("text", "chat")
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")

# Fields that do not change the prepared data, so they stay out of the cache key.
_NOT_IN_CACHE_KEY = {"num_proc", "cache_dir", "streaming", "stream_buffer_rows"}


@dataclass
class DataConfig:
    # Sources: paths, globs, folders (files or a save_to_disk folder), or "hf:NAME[:CONFIG][@SPLIT]"
    # for a Hugging Face hub dataset already in the local cache (read offline).
    # null and [] both mean "none" (e.g. data.eval_files=null drops a config's eval files).
    train_files: Optional[list[str]] = field(default_factory=list)
    eval_files: Optional[list[str]] = field(default_factory=list)
    eval_fraction: float = 0.0  # held out of train_files when eval_files is empty
    split_seed: int = 0  # which rows the eval fraction takes (independent of the training seed)
    format: str = "text"  # text | chat | classification | token_classification | preference (dpo, reward)
    seq_len: int = 16384  # packed row length (text/chat); max length for classification formats

    # Field names
    text_field: str = "text"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    system_field: str = "system"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    txt_sample_by: str = "document"  # .txt files: one row per "document" (file), "paragraph" or "line"

    add_bos: Optional[bool] = None  # None: only when the tokenizer's bos differs from its eos
    long_docs: str = "split"  # split | drop (documents longer than seq_len, packed formats)
    on_bad_row: str = "error"  # error | skip
    labels: Optional[list[str]] = None  # fixed label set (else collected from the data)
    problem_type: Optional[str] = None  # else inferred from the labels
    num_proc: int = 1
    cache_dir: Optional[str] = None  # default $PERSIMMON_TRAIN_CACHE/data or ~/.cache/persimmon_train/data
    streaming: bool = False
    stream_buffer_rows: int = 64  # streaming: packed rows per best-fit window (and shuffle buffer)

    def __post_init__(self):
        # Hydra builds this dataclass through its constructor, so null lands here as None.
        for key in ("train_files", "eval_files"):
            value = getattr(self, key)
            setattr(self, key, [value] if isinstance(value, str) else list(value or []))

    def validate(self) -> DataConfig:
        def bad(key, msg):
            raise ConfigError(f"data.{key}: {msg}")

        if self.format not in FORMATS:
            bad("format", f"{self.format!r} is not one of {', '.join(FORMATS)}")
        if self.long_docs not in ("split", "drop"):
            bad("long_docs", f"{self.long_docs!r} is not 'split' or 'drop'")
        if self.on_bad_row not in ("error", "skip"):
            bad("on_bad_row", f"{self.on_bad_row!r} is not 'error' or 'skip'")
        if self.txt_sample_by not in ("document", "paragraph", "line"):
            bad("txt_sample_by", f"{self.txt_sample_by!r} is not 'document', 'paragraph' or 'line'")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            bad("seq_len", f"must be an integer >= 2, got {self.seq_len!r}")
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            bad("eval_fraction", f"must be in [0, 1), got {self.eval_fraction!r}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            bad("problem_type", f"{self.problem_type!r} is not one of {', '.join(PROBLEM_TYPES)}")
        if int(self.num_proc) < 1:
            bad("num_proc", f"must be >= 1, got {self.num_proc!r}")
        if not self.train_files:
            bad("train_files", "no training files given")
        if self.streaming and self.format not in PACKED_FORMATS:
            bad("streaming", f"streaming is supported for text/chat, not {self.format!r}")
        if self.streaming and self.eval_fraction and not self.eval_files:
            pass  # hash-based eval split works while streaming
        return self

    def cache_fields(self) -> dict:
        d = asdict(self)
        d["train_files"] = list(d["train_files"])
        d["eval_files"] = list(d["eval_files"])
        return {k: v for k, v in d.items() if k not in _NOT_IN_CACHE_KEY}

    @classmethod
    def from_any(cls, cfg) -> DataConfig:
        """Accept a DataConfig, a dict, or an OmegaConf node (as Hydra passes it)."""
        if isinstance(cfg, cls):
            return cfg
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:  # pragma: no cover
            pass
        known = set(cls.__dataclass_fields__)
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"data: unknown key(s) {', '.join(sorted(unknown))}")
        return cls(**cfg)  # __post_init__ normalizes the file lists
