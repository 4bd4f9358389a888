"""PersimmonConfig: the architecture numbers, read from and written to HF `config.json`.

Defaults are the released Persimmon-8B; `PRESETS` names the architectures a run starts from
(`model=<name>`). `from_dict` reads both transformers 4.x configs (top-level `rope_theta`,
`rope_scaling`, `partial_rotary_factor`) and 5.x configs (one `rope_parameters` dict); `to_dict`
writes both spellings so either transformers version loads it with the same numbers (5.x would
otherwise fall back to its own rope_theta default of 10000).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from persimmon_train.errors import ConfigError

ACTIVATIONS = ("relu2", "relu", "gelu", "silu")
ROPE_SCALING_TYPES = ("linear", "dynamic")
PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
# Attention kernels (model/attention.py). A runtime choice, not architecture: never written to config.json.
ATTENTION_BACKENDS = ("auto", "sdpa", "segments", "flex", "varlen")

# Keys transformers writes that carry no architecture information for us; dropped silently.
_IGNORED_KEYS = {
    "transformers_version",
    "model_type",
    "architectures",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "use_cache",
    "initializer_range",
    "tie_word_embeddings",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
}


@dataclass
class PersimmonConfig:
    vocab_size: int = 262144
    hidden_size: int = 4096
    intermediate_size: int = 16384
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    hidden_act: str = "relu2"
    max_position_embeddings: int = 16384
    rope_theta: float = 25000.0
    partial_rotary_factor: float = 0.5
    rope_scaling: dict | None = None  # {"type": "linear"|"dynamic", "factor": f > 1}
    qk_layernorm: bool = True
    layer_norm_eps: float = 1e-5
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    classifier_dropout: float | None = None
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    # Classification heads.
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    label2id: dict[str, int] | None = None
    problem_type: str | None = None
    # Which attention kernel runs (see ATTENTION_BACKENDS); not saved to config.json.
    attention: str = "auto"
    # Keys we do not model but keep so a config round-trips (e.g. quantization settings).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.id2label is not None:
            self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            self.num_labels = len(self.id2label)
            if self.label2id is None:
                self.label2id = {v: k for k, v in self.id2label.items()}
        self.validate()

    # ------------------------------------------------------------------ derived numbers
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def num_parameters(self, head: str = "causal_lm") -> int:
        """Parameter count computed from the numbers (no tensors built)."""
        h, i, n, v, d = (
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
            self.vocab_size,
            self.head_dim,
        )
        attn = h * 3 * h + 3 * h + h * h + h + (4 * d if self.qk_layernorm else 0)
        mlp = h * i + i + i * h + h
        layer = attn + mlp + 4 * h
        body = v * h + n * layer + 2 * h
        if head == "causal_lm":
            return body + v * h
        if head == "sequence_classification":
            return body + h * self.num_labels
        return body + h * self.num_labels + self.num_labels

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def positive_int(key):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config key '{key}' must be a positive integer, got {value!r}")

        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "num_labels",
        ):
            positive_int(key)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"config key 'num_attention_heads' ({self.num_attention_heads}) must divide "
                f"'hidden_size' ({self.hidden_size})"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"config key 'hidden_act' is {self.hidden_act!r}; known: {', '.join(ACTIVATIONS)}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"config key 'partial_rotary_factor' must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(
                f"config key 'partial_rotary_factor' ({self.partial_rotary_factor}) gives rotary dims "
                f"{self.rotary_dim} of head_dim {self.head_dim}; it must be a positive even number"
            )
        if not self.rope_theta > 0:
            raise ConfigError(f"config key 'rope_theta' must be > 0, got {self.rope_theta}")
        for key in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"config key '{key}' must be in [0, 1), got {getattr(self, key)}")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict):
                raise ConfigError(f"config key 'rope_scaling' must be a dict, got {rs!r}")
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ROPE_SCALING_TYPES:
                raise ConfigError(f"config key 'rope_scaling.type' is {kind!r}; known: {', '.join(ROPE_SCALING_TYPES)}")
            factor = rs.get("factor")
            if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1.0:
                raise ConfigError(f"config key 'rope_scaling.factor' must be a number > 1, got {factor!r}")
            self.rope_scaling = {"type": kind, "factor": float(factor)}
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"config key 'attention' is {self.attention!r}; known: {', '.join(ATTENTION_BACKENDS)}")
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"config key 'problem_type' is {self.problem_type!r}; known: {', '.join(PROBLEM_TYPES)}")

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> PersimmonConfig:
        """Build from a transformers 4.x or 5.x `config.json` dict."""
        d = dict(raw)
        model_type = d.get("model_type")
        if model_type not in (None, "persimmon"):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'persimmon'")
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope or "rope_theta" in d:
            d["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta")))
        if "partial_rotary_factor" in rope or "partial_rotary_factor" in d:
            d["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", d.get("partial_rotary_factor")))
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type and rope_type != "default":
            d["rope_scaling"] = {"type": rope_type, "factor": rope.get("factor")}
        elif rope.get("rope_type") == "default":
            d["rope_scaling"] = None
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known and k not in _IGNORED_KEYS}
        for key in ("eos_token_id", "bos_token_id"):
            if isinstance(kwargs.get(key), list):  # some configs list several eos ids; keep the first
                kwargs[key] = kwargs[key][0] if kwargs[key] else None
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> PersimmonConfig:
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such config file")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(raw, source=path)

    def to_dict(self, architectures: list[str] | None = None) -> dict:
        """A config.json dict that transformers 4.x and 5.x both load with these numbers."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", "attention")}
        d.update(self.extra)
        rope_parameters = {
            "rope_type": "default",
            "rope_theta": self.rope_theta,
            "partial_rotary_factor": self.partial_rotary_factor,
        }
        if self.rope_scaling:
            rope_parameters.update(rope_type=self.rope_scaling["type"], factor=self.rope_scaling["factor"])
        d["rope_parameters"] = rope_parameters
        d = copy.deepcopy(d)  # callers (transformers among them) mutate what they are given
        if d["id2label"] is None:
            d.pop("id2label"), d.pop("label2id")
        else:
            d["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if d["classifier_dropout"] is None:
            d.pop("classifier_dropout")
        d["model_type"] = "persimmon"
        d["tie_word_embeddings"] = False
        d["use_cache"] = True
        if architectures:
            d["architectures"] = architectures
        return d

    def save_pretrained(self, folder: str | os.PathLike, architectures: list[str] | None = None) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(architectures), f, indent=2, sort_keys=True)
            f.write("\n")

    def save_generation_config(self, folder: str | os.PathLike) -> None:
        """generation_config.json with the special ids (causal LM folders; transformers reads it)."""
        ids = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}
        with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({k: v for k, v in ids.items() if v is not None}, f, indent=2)
            f.write("\n")

    def replace(self, **changes) -> PersimmonConfig:
        return dataclasses.replace(self, **changes)


# Named architectures: `model=<name>` in a run's config (conf/model/<name>.yaml names one and may set
# any key over it). PersimmonConfig's defaults are the released Persimmon-8B.
PRESETS: dict[str, PersimmonConfig] = {
    # A small random-init Persimmon for the embedded default run and tests (CPU, seconds per step).
    "tiny": PersimmonConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512
    ),
    "persimmon_8b": PersimmonConfig(),  # ADEPT's base release
    "persimmon_8b_chat": PersimmonConfig(),  # ADEPT's chat release ("human: {prompt}\n\nadept:"): the same numbers
}
