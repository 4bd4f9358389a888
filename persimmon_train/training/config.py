"""The typed run configuration (Hydra structured config) and its checks.

The dataclasses here are the schema: Hydra merges `conf/*.yaml` and command-line overrides into
them, so an unknown key or a value of the wrong type fails at start-up naming the key. Checks
that need more than a type (lora r > 0, seq_len within the model's positions, ...) live in
`validate_run_config` and raise `ConfigError` naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from persimmon_train.data.config import DataConfig
from persimmon_train.errors import ConfigError
from persimmon_train.model.config import PRESETS, PersimmonConfig
from persimmon_train.training.tasks import TASKS as TASK_SPECS

TASKS = tuple(TASK_SPECS)  # causal_lm, sequence_classification, token_classification
PRECISIONS = ("auto", "bf16", "fp32")
EXPORT_DTYPES = ("bf16", "fp32")
SCHEDULES = ("cosine", "linear", "constant")
TRACKERS = ("wandb", "none")
WANDB_MODES = ("online", "offline", "disabled")
DEFAULT_LORA_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


# PersimmonConfig keys a run does not set: the tokenizer gives the special ids, the data the labels.
_NOT_RUN_KEYS = ("initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "num_labels", "id2label")
_NOT_RUN_KEYS += ("label2id", "problem_type", "extra")
# Keys whose default is the run's own; every other key defaults to the preset's value.
_RUN_DEFAULTS = {
    "vocab_size": None,  # null: a random init takes the tokenizer's size (model.path: its config.json's)
    # Fine-tuning dropout is an explicit choice: the released config.json says 0.6 (pre-training).
    # These values replace whatever config.json says; null keeps config.json's (or the preset's) value.
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "classifier_dropout": None,
    "attention": "auto",  # the attention kernel: auto | sdpa | segments | flex | varlen (docs/model.md)
}
ARCHITECTURE_KEYS = tuple(
    f.name for f in dataclasses.fields(PersimmonConfig) if f.name not in _NOT_RUN_KEYS and f.name not in _RUN_DEFAULTS
)


def _schema_type(hint):
    """Optional[<the field's type>] for Hydra; a dict stays Any (OmegaConf 2.3 cannot merge a dict
    override into a None-valued Optional[Dict] field)."""
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    return Any if base is dict or typing.get_origin(base) is dict else Optional[base]


_HINTS = typing.get_type_hints(PersimmonConfig)
_ModelKeys = dataclasses.make_dataclass(
    "_ModelKeys",
    [
        ("name", str, field(default="tiny")),  # a preset: persimmon_train.model.config.PRESETS
        ("path", Optional[str], field(default=None)),  # an HF folder (config.json + safetensors) to start from
        ("allow_random_init", bool, field(default=True)),  # false for released sizes: no model.path is a mistake
        *[(key, _schema_type(_HINTS[key]), field(default=None)) for key in ARCHITECTURE_KEYS],
        *[(key, _schema_type(_HINTS[key]), field(default=value)) for key, value in _RUN_DEFAULTS.items()],
    ],
)


@dataclass
class ModelConfig(_ModelKeys):
    """`model=<preset>` with any PersimmonConfig key set over it, or `path` to start from an HF
    model folder (its config.json is the architecture; rope_scaling, dropout and attention still apply).

    The fields are PersimmonConfig's own (derived, never copied): an architecture key left null
    takes the preset's value when the run config is validated (`with_preset`).
    """

    def with_preset(self) -> ModelConfig:
        """Fill every unset architecture key from the preset `name`; the filled config is validated once."""
        unset = [key for key in ARCHITECTURE_KEYS if getattr(self, key) is None]
        if unset:
            if self.name not in PRESETS:
                raise ConfigError(
                    f"model.{unset[0]}: not set, and model.name={self.name!r} is no preset to take it from "
                    f"(presets: {', '.join(PRESETS)})"
                )
            for key in unset:
                setattr(self, key, copy.deepcopy(getattr(PRESETS[self.name], key)))
        self.architecture()  # validates every key (naming it model.<key>)
        return self

    def architecture(self, **changes) -> PersimmonConfig:
        """The PersimmonConfig these keys describe (plus `changes`: special ids, labels), validated."""
        keys = {key: getattr(self, key) for key in (*ARCHITECTURE_KEYS, *_RUN_DEFAULTS)}
        keys = {key: value for key, value in keys.items() if value is not None}
        if keys.get("rope_scaling") is not None:
            keys["rope_scaling"] = dict(keys["rope_scaling"])
        try:
            return PRESETS.get(self.name, PersimmonConfig()).replace(**{**keys, **changes})
        except ConfigError as error:
            raise ConfigError(str(error).replace("config key '", "config key 'model.", 1)) from None


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # tokenizer.model or a folder; null: model.path, else the demo tokenizer


@dataclass
class PeftConfig:
    method: str = "none"  # none | lora
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    # Extra fully-trained modules; classification heads ("score") are always added.
    modules_to_save: list[str] = field(default_factory=list)
    use_rslora: bool = False
    # QLoRA: none | nf4 (the frozen decoder Linear weights held in 4-bit NF4, bf16 compute;
    # docs/training.md "QLoRA")
    quantize_base: str = "none"


@dataclass
class StrategyConfig:
    """How the model is placed: single | fsdp | deepspeed (docs/distributed.md)."""

    name: str = "single"
    device: str = "auto"  # auto | cpu | cuda | cuda:N (distributed: cuda -> cuda:LOCAL_RANK)
    # -- distributed (fsdp, deepspeed)
    backend: str = "auto"  # process-group backend: auto (nccl on GPUs, gloo on CPU) | nccl | gloo
    timeout_minutes: float = 30.0  # collective timeout
    # -- fsdp
    reshard_after_forward: bool = True  # free gathered layer weights after forward (re-gather in backward)
    cpu_offload: bool = False  # parameter shards, grads and optimizer state in host memory
    replicate_degree: int = 1  # HSDP: >1 replicas x (world/replicas) shards, e.g. the number of nodes
    # -- deepspeed
    stage: Optional[int] = None  # ZeRO stage 1 | 2 | 3
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme (stage 3 only)
    nvme_path: Optional[str] = None  # for *_offload=nvme
    config_file: Optional[str] = None  # a DeepSpeed JSON used as-is (checked against trainer.*)
    extra: Any = None  # dict deep-merged into the generated DeepSpeed config


@dataclass
class TrackerConfig:
    backend: str = "none"  # wandb | none (metrics.jsonl and train.log are always written)
    project: str = "persimmon-train"
    entity: Optional[str] = None
    name: Optional[str] = None  # run name; default: the output_dir's folder name
    tags: list[str] = field(default_factory=list)
    mode: Optional[str] = None  # online | offline | disabled; null: online if WANDB_API_KEY is set, else offline


@dataclass
class OptimConfig:
    lr: float = 2e-4
    weight_decay: float = 0.0  # never applied to norms and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: Optional[float] = 1.0  # max global grad norm; null or 0: no clipping
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)


@dataclass
class TrainerConfig:
    max_steps: int = 100
    seed: int = 0
    micro_batch_size: int = 1  # per rank
    grad_accum_steps: int = 1
    # bf16 (autocast, float32 master weights) | fp32 | auto: bf16 where bf16 matmuls beat fp32 (CUDA
    # with bf16, CPUs with AMX), else fp32 (AVX512-BF16 without AMX is ~2x slower, emulation ~40x).
    precision: str = "auto"
    activation_checkpointing: int = 0  # 0: off, 1: every layer, k: every k-th layer
    log_every_n_steps: int = 1
    eval_every_n_steps: int = 0  # 0: only at the end
    eval_max_batches: Optional[int] = None  # cap on eval batches (null: the whole eval set)
    eval_at_start: bool = False
    max_nonfinite_steps: int = 5  # stop after this many NaN/Inf losses in a row
    progress_bar: bool = True
    peak_tflops: Optional[float] = None  # per-device peak for MFU; null: known GPUs only
    num_threads: Optional[int] = None  # torch CPU threads; null: torch's default
    compile: bool = False  # torch.compile each decoder layer (after checkpointing, before sharding)
    # Time budget: after this many minutes (from the start of the run, rank 0's clock) the run saves
    # and stops like a preemption signal (exit code 3); null: no budget.
    max_minutes: Optional[float] = None
    # Starts in a row from the same checkpoint step (restarts.json) before a restart refuses (exit 2).
    max_restarts_without_progress: int = 3
    # Refuse at start a run whose memory estimate (training/memory_plan.py, `persimmon-train
    # estimate`) exceeds the device's memory (GPU total; CPU MemAvailable). false: run anyway.
    check_memory: bool = True


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # 0: no training checkpoints
    keep_last: int = 3  # 0: keep all
    # strategy=fsdp: copy the state to host memory and write it in a background thread while
    # training goes on (at most one save in flight). Not `async`: a Python keyword cannot be a field.
    async_save: bool = False


@dataclass
class ExportConfig:
    enabled: bool = True  # write output_dir/final/ at the end
    dtype: str = "bf16"  # bf16 | fp32


@dataclass
class DPOConfig:
    """`persimmon-train dpo` (objective=dpo): TRL's DPO loss on packed preference pairs."""

    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo (IPO on log-probs averaged over response tokens)
    label_smoothing: float = 0.0  # conservative DPO (sigmoid only)


@dataclass
class RewardConfig:
    """`persimmon-train reward` (objective=reward): Bradley-Terry loss, one score per document."""

    margin: float = 0.0  # -log sigmoid(s_chosen - s_rejected - margin)


OBJECTIVES = ("sft", "dpo", "reward")


@dataclass
class RunConfig:
    task: str = "causal_lm"
    # What the head is trained on: sft (labels: finetune/classify/tag), dpo or reward (preference pairs).
    objective: str = "sft"
    output_dir: Optional[str] = None  # null: outputs/<job>/<timestamp>
    resume: Optional[str] = None  # auto | latest | PATH to checkpoints/step_N
    # An output_dir that holds a run is refused unless resumed or started over: overwrite=true
    # replaces that run's own files (checkpoints/step_N, metrics.jsonl, ...), never anything else.
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)


SCHEMA_NAME = "run_schema"


def register_schema() -> None:
    """Put the schema in Hydra's ConfigStore so `conf/<job>.yaml` can list it in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)


# ---------------------------------------------------------------------------- checks


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _at_least(key: str, value, low) -> None:
    if value is None or value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value!r}")


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """Value checks Hydra's types cannot express. Raises ConfigError naming the key."""
    _one_of("task", cfg.task, TASKS)
    t = cfg.trainer
    _one_of("trainer.precision", t.precision, PRECISIONS)
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "log_every_n_steps", "max_nonfinite_steps"):
        _at_least(f"trainer.{key}", getattr(t, key), 1)
    for key in ("activation_checkpointing", "eval_every_n_steps", "max_restarts_without_progress"):
        _at_least(f"trainer.{key}", getattr(t, key), 0)
    if t.eval_max_batches is not None:
        _at_least("trainer.eval_max_batches", t.eval_max_batches, 1)
    if t.max_minutes is not None and not t.max_minutes > 0:
        raise ConfigError(f"trainer.max_minutes: must be > 0 (or null: no time budget), got {t.max_minutes!r}")
    if t.num_threads is not None and t.num_threads < 1:
        raise ConfigError(f"trainer.num_threads: must be >= 1 (or null: torch's default), got {t.num_threads!r}")
    o = cfg.optim
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    if not o.lr > 0:
        raise ConfigError(f"optim.lr: must be > 0, got {o.lr!r}")
    _at_least("optim.weight_decay", o.weight_decay, 0)
    _at_least("optim.warmup_steps", o.warmup_steps, 0)
    if o.grad_clip is not None and not o.grad_clip >= 0:  # 0 and null: no clipping
        raise ConfigError(f"optim.grad_clip: must be >= 0 (0 or null: no clipping), got {o.grad_clip!r}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio!r}")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, key) < 1.0:
            raise ConfigError(f"optim.{key}: must be in [0, 1), got {getattr(o, key)!r}")
    p = cfg.peft
    _one_of("peft.method", p.method, ("none", "lora"))
    _one_of("peft.quantize_base", p.quantize_base, ("none", "nf4"))
    if p.quantize_base != "none" and p.method != "lora":
        raise ConfigError(
            f"peft.quantize_base: {p.quantize_base} quantizes the frozen base under LoRA adapters; "
            f"it needs peft=lora (peft.method is {p.method})"
        )
    if p.quantize_base != "none" and cfg.strategy.name == "deepspeed":
        raise ConfigError(
            f"peft.quantize_base: {p.quantize_base} works under strategy=single and strategy=fsdp, "
            f"not strategy=deepspeed (ZeRO partitions flat bf16/fp32 buffers, not NF4 tensors)"
        )
    if p.method == "lora":
        if p.r < 1:
            raise ConfigError(f"peft.r: LoRA rank must be >= 1, got {p.r!r}")
        if not p.alpha > 0:
            raise ConfigError(f"peft.alpha: must be > 0, got {p.alpha!r}")
        if not 0.0 <= p.dropout < 1.0:
            raise ConfigError(f"peft.dropout: must be in [0, 1), got {p.dropout!r}")
        if not p.target_modules:
            raise ConfigError("peft.target_modules: empty; LoRA needs at least one module name")
    validate_strategy(cfg)
    _one_of("tracker.backend", cfg.tracker.backend, TRACKERS)
    if cfg.tracker.mode is not None:
        _one_of("tracker.mode", cfg.tracker.mode, WANDB_MODES)
    _at_least("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps, 0)
    _at_least("checkpoint.keep_last", cfg.checkpoint.keep_last, 0)
    _one_of("export.dtype", cfg.export.dtype, EXPORT_DTYPES)
    m = cfg.model.with_preset()  # the architecture keys, validated once (rope_scaling, dropout, attention, ...)
    if m.path is None and not m.allow_random_init:
        raise ConfigError(
            f"model.path: model={m.name} needs model.path=DIR (an HF folder with the released "
            f"weights); random init is only for small test models"
        )
    if m.path is None:
        check_seq_len(cfg.data.seq_len, m.max_position_embeddings, m.rope_scaling, "model")
    if cfg.objective == "sft":
        _one_of(f"data.format (task {cfg.task})", cfg.data.format, TASK_SPECS[cfg.task].formats)
    validate_preference(cfg)
    if cfg.overwrite and cfg.resume is not None:
        raise ConfigError(
            f"overwrite: overwrite=true starts the run over, resume={cfg.resume} continues it; pass one of them"
        )
    if cfg.resume is not None and cfg.output_dir is None and cfg.resume in ("latest", "auto"):
        raise ConfigError(f"resume: '{cfg.resume}' needs output_dir=DIR (the run folder to continue)")
    return cfg


def validate_preference(cfg: RunConfig) -> None:
    """objective=dpo|reward: preference data, the matching head, keys of the other objectives refused."""
    _one_of("objective", cfg.objective, OBJECTIVES)
    for section, defaults in (("dpo", DPOConfig()), ("reward", RewardConfig())):
        if cfg.objective != section and getattr(cfg, section) != defaults:
            changed = [
                k for k in defaults.__dataclass_fields__ if getattr(getattr(cfg, section), k) != getattr(defaults, k)
            ]
            raise ConfigError(
                f"{section}.{changed[0]}: {section}.* keys configure `persimmon-train {section}`; "
                f"this run's objective is {cfg.objective}"
            )
    if cfg.objective == "sft":
        if cfg.data.format == "preference":
            raise ConfigError(
                "data.format: preference pairs train with `persimmon-train dpo` or `persimmon-train reward`"
            )
        return
    head = {"dpo": "causal_lm", "reward": "sequence_classification"}[cfg.objective]
    if cfg.task != head:
        raise ConfigError(f"task: objective={cfg.objective} trains the {head} head, got task={cfg.task}")
    _one_of(f"data.format (objective {cfg.objective})", cfg.data.format, ("preference",))
    if cfg.strategy.name == "deepspeed":
        raise ConfigError(
            f"strategy: objective={cfg.objective} runs under strategy=single or strategy=fsdp, not deepspeed"
        )
    d = cfg.dpo
    _one_of("dpo.loss", d.loss, ("sigmoid", "ipo"))
    if not d.beta > 0:
        raise ConfigError(f"dpo.beta: must be > 0, got {d.beta!r}")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing: must be in [0, 0.5), got {d.label_smoothing!r}")
    if d.label_smoothing and d.loss != "sigmoid":
        raise ConfigError(f"dpo.label_smoothing: conservative DPO smooths the sigmoid loss, not dpo.loss={d.loss}")


STRATEGIES = ("single", "fsdp", "deepspeed")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
OFFLOAD = ("none", "cpu", "nvme")


def validate_strategy(cfg: RunConfig) -> None:
    s = cfg.strategy
    _one_of("strategy.name", s.name, STRATEGIES)
    if cfg.checkpoint.async_save and s.name != "fsdp":
        raise ConfigError(
            f"checkpoint.async_save: only strategy=fsdp writes checkpoints in the background (DCP); "
            f"strategy={s.name} writes them synchronously: set checkpoint.async_save=false"
        )
    if not DEVICE_PATTERN.fullmatch(str(s.device)):
        raise ConfigError(f"strategy.device: {s.device!r} is not one of auto, cpu, cuda, cuda:N")
    _one_of("strategy.backend", s.backend, ("auto", "nccl", "gloo", "ccl", "mpi"))
    if not s.timeout_minutes > 0:
        raise ConfigError(f"strategy.timeout_minutes: must be > 0, got {s.timeout_minutes!r}")
    _at_least("strategy.replicate_degree", s.replicate_degree, 1)
    if s.name != "deepspeed":
        return
    if s.config_file is None:
        if s.stage is None:
            raise ConfigError("strategy.stage: strategy=deepspeed needs a ZeRO stage (1, 2 or 3)")
        _one_of("strategy.stage", s.stage, (1, 2, 3))
    _one_of("strategy.offload_optimizer", s.offload_optimizer, OFFLOAD)
    _one_of("strategy.offload_param", s.offload_param, OFFLOAD)
    if s.offload_param != "none" and s.stage != 3:
        raise ConfigError(f"strategy.offload_param: parameter offload needs strategy.stage=3, got stage {s.stage}")
    if "nvme" in (s.offload_optimizer, s.offload_param) and not s.nvme_path:
        raise ConfigError("strategy.nvme_path: offload to nvme needs a folder on a fast local disk")
    if s.extra is not None and not isinstance(s.extra, dict):
        raise ConfigError(f"strategy.extra: expected a mapping of DeepSpeed config keys, got {s.extra!r}")


def check_seq_len(seq_len: int, max_positions: int, rope_scaling, where: str) -> None:
    """Rows longer than the trained positions need RoPE scaling, else quality silently collapses."""
    if seq_len > max_positions and not rope_scaling:
        raise ConfigError(
            f"data.seq_len: {seq_len} is above {where} max_position_embeddings={max_positions} and "
            f"model.rope_scaling is not set (set model.rope_scaling={{type:linear,factor:F}} or lower data.seq_len)"
        )
