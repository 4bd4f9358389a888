"""The memory planner: what one rank of a run will hold, computed from the config alone.

`plan_memory(cfg, model_config, world_size, device)` is arithmetic on the numbers of the run's
config and the model's config (no tensor is built, no weight read); `persimmon-train estimate`
prints its table and every training run logs it at start and refuses (one line, exit 2) a run
whose estimate exceeds the device's memory, unless `trainer.check_memory=false` (`check_run`).

What a rank holds (docs/memory.md explains each term):
- weights, by dtype: trainable parameters as float32 masters; frozen matrices in bf16 for a bf16
  run (parallel/frozen_weights.py), float32 otherwise; 1-D frozen tensors float32; NF4 matrices
  (`peft.quantize_base=nf4`) at 0.5 byte a parameter plus their block scalers. FSDP divides them
  by the shard group (world size / HSDP replicas); ZeRO-3 by the world size.
- gradients: float32, trainable parameters only (FSDP: the shard; ZeRO-2/3: the partition);
- optimizer state: AdamW's two float32 moments per trainable parameter (FSDP and ZeRO: sharded);
- activations of one micro-batch, for the configured activation checkpointing: without it every
  layer's saved tensors; with it each checkpointed layer keeps its input and one layer at a time
  is recomputed; the attention kernel saves O(seq) (flash / varlen / flex / segments), and a
  dense-mask SDPA adds its [batch, seq, seq] mask;
- the chunked loss's logits chunk (model/loss.py: LOGITS_CHUNK_BYTES) and, for a trained head,
  its weight-sized gradient accumulator;
- communication buffers: FSDP's all-gathered root and two layers in the compute dtype plus the
  largest group's unsharded gradients and float32 reduce-scatter input; DeepSpeed's reduce /
  all-gather / prefetch buckets;
- runtime: a fixed term for what is not the model -- on CPU the Python/torch process and the data
  (RUNTIME_CPU_BYTES, measured once on the embedded default run), on a GPU the CUDA context and
  allocator slack (RUNTIME_CUDA_BYTES, an allowance, not measured here).
The peak is weights + gradients + optimizer state + communication + runtime + the larger of (the
forward/backward transients) and (AdamW's step temporaries). Calibration against measured peaks:
docs/benchmarks.md ("Memory planner").
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

log = logging.getLogger("persimmon_train")

GiB = 2**30
MiB = 2**20
# What a CPU process holds besides the model: Python, torch, the tokenizer, the data and loader,
# allocator slack. Measured: the embedded default run (2-layer, hidden 128) peaks at 0.69 GB, 0.09 GB of it its
# activations.
RUNTIME_CPU_BYTES = 570 * MiB
# CUDA context, cuBLAS / kernel workspaces and caching-allocator slack on a GPU: an allowance.
RUNTIME_CUDA_BYTES = 1 * GiB
# DeepSpeed's defaults for the buckets our generated config leaves unset (elements).
DS_DEFAULT_BUCKETS = {
    "reduce_bucket_size": 500_000_000,
    "allgather_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
}
# NF4 (QLoRA): 4 bits a parameter, one int8 scaler per block of 64, one float32 scale per 256 scalers.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def levers(cfg) -> str:
    """What would make the run smaller, leaving out what it already does."""
    out = []
    if cfg.peft.method != "lora":
        out.append("peft=lora")
    if getattr(cfg.peft, "quantize_base", None) != "nf4":
        out.append("peft.quantize_base=nf4 (QLoRA)")
    if cfg.trainer.activation_checkpointing != 1:
        out.append("trainer.activation_checkpointing=1")
    out.append("more ranks (strategy=fsdp / deepspeed)")
    out.append(
        f"a smaller data.seq_len ({cfg.data.seq_len}) or trainer.micro_batch_size ({cfg.trainer.micro_batch_size})"
    )
    return ", ".join(out)


@dataclass(frozen=True)
class Tensor:
    """One parameter of the model: name, element count, dimensions, FSDP group ('layer' or 'root')."""

    name: str
    numel: int
    ndim: int
    group: str


@dataclass
class MemoryPlan:
    """Per-rank bytes of a run, by kind. `total` is the estimated peak."""

    weights: dict[str, int]  # dtype -> bytes ("float32 trainable", "bf16 frozen", ...)
    gradients: int
    optimizer: int
    activations: int
    logits_chunk: int
    communication: int
    runtime: int
    step_temporaries: int
    device: str
    world_size: int
    shard_group: int
    precision: str
    available: int | None = None  # the device's memory (bytes); None: unknown
    trainable_params: int = 0
    total_params: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def total(self) -> int:
        steady = self.weight_bytes + self.gradients + self.optimizer + self.communication + self.runtime
        return steady + max(self.activations + self.logits_chunk, self.step_temporaries)

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def rows(self) -> list[tuple[str, int]]:
        rows = [(f"weights, {kind}", size) for kind, size in self.weights.items() if size]
        rows += [
            ("gradients (float32, trainable)", self.gradients),
            ("optimizer state (AdamW, 2 x float32)", self.optimizer),
            ("activations (one micro-batch)", self.activations),
            ("loss: logits chunk (+ head gradient)", self.logits_chunk),
            ("communication buffers", self.communication),
            ("runtime (fixed)", self.runtime),
        ]
        return rows

    def table(self) -> str:
        where = "host memory (MemAvailable)" if self.device == "cpu" else "GPU memory"
        lines = [
            f"memory estimate per rank ({self.device}, {self.world_size} rank(s), shard group {self.shard_group}, "
            f"precision {self.precision}; {self.trainable_params / 1e6:.2f}M of {self.total_params / 1e6:.2f}M "
            f"parameters trainable):"
        ]
        lines += [f"  {label:<44} {_gb(size):>10}" for label, size in self.rows()]
        if self.step_temporaries > self.activations + self.logits_chunk:
            lines.append(f"  {'(optimizer step temporaries, the peak)':<44} {_gb(self.step_temporaries):>10}")
        lines.append(f"  {'total (estimated peak)':<44} {_gb(self.total):>10}")
        if self.available is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {where:<44} {_gb(self.available):>10}  -> {verdict}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line for the run's log."""
        dtypes = ", ".join(f"{kind} {size / 1e9:.2f}" for kind, size in self.weights.items() if size)
        against = f" of {_gb(self.available)} available" if self.available is not None else ""
        return (
            f"memory estimate per rank: {_gb(self.total)}{against} ({self.device}, {self.precision}): weights "
            f"{_gb(self.weight_bytes)} [{dtypes}], gradients {_gb(self.gradients)}, optimizer "
            f"{_gb(self.optimizer)}, activations {_gb(self.activations)}, logits chunk {_gb(self.logits_chunk)}, "
            f"communication {_gb(self.communication)}, runtime {_gb(self.runtime)} "
            f"(`persimmon-train estimate` with this run's overrides prints the table)"
        )


def _gb(size: int | float) -> str:
    return f"{size / 1e9:.2f} GB"


# ---------------------------------------------------------------------------- the model's tensors


def model_tensors(model_config, task: str = "causal_lm") -> list[Tensor]:
    """Every parameter of the model as (name, numel, ndim, group), from the config's numbers."""
    c = model_config
    h, i, v, d = c.hidden_size, c.intermediate_size, c.vocab_size, c.head_dim
    out = [Tensor("model.embed_tokens.weight", v * h, 2, "root")]
    for n in range(c.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes = [
            ("input_layernorm.weight", h, 1),
            ("input_layernorm.bias", h, 1),
            ("self_attn.query_key_value.weight", 3 * h * h, 2),
            ("self_attn.query_key_value.bias", 3 * h, 1),
            ("self_attn.dense.weight", h * h, 2),
            ("self_attn.dense.bias", h, 1),
            ("post_attention_layernorm.weight", h, 1),
            ("post_attention_layernorm.bias", h, 1),
            ("mlp.dense_h_to_4h.weight", i * h, 2),
            ("mlp.dense_h_to_4h.bias", i, 1),
            ("mlp.dense_4h_to_h.weight", h * i, 2),
            ("mlp.dense_4h_to_h.bias", h, 1),
        ]
        if c.qk_layernorm:
            shapes += [(f"self_attn.{q}_layernorm.{w}", d, 1) for q in "qk" for w in ("weight", "bias")]
        out += [Tensor(p + name, numel, ndim, "layer") for name, numel, ndim in shapes]
    out += [Tensor("model.final_layernorm.weight", h, 1, "root"), Tensor("model.final_layernorm.bias", h, 1, "root")]
    if task == "causal_lm":
        out.append(Tensor("lm_head.weight", v * h, 2, "root"))
    else:
        out.append(Tensor("score.weight", c.num_labels * h, 2, "root"))
        if task == "token_classification":
            out.append(Tensor("score.bias", c.num_labels, 1, "root"))
    return out


# Input and output features of LoRA's target Linears (peft matches a target by the module name's end).
def _linear_features(model_config) -> dict[str, tuple[int, int]]:
    h, i = model_config.hidden_size, model_config.intermediate_size
    return {
        "self_attn.query_key_value": (h, 3 * h),
        "self_attn.dense": (h, h),
        "mlp.dense_h_to_4h": (h, i),
        "mlp.dense_4h_to_h": (i, h),
    }


def _matches(module: str, targets) -> bool:
    return any(module == t or module.endswith("." + t) for t in targets)


@dataclass
class _Inventory:
    """Parameter bytes of the whole (unsharded) model, split the ways the planner needs."""

    weights: dict[str, int]  # dtype label -> bytes
    trainable: int = 0  # parameters
    total: int = 0
    largest_trainable: int = 0
    layer_trainable: int = 0  # one decoder layer's trainable parameters
    layer_params: int = 0  # one decoder layer's parameters (all)
    root_params: int = 0  # embedding + head + final norm
    root_trainable: int = 0
    head_trainable: bool = False


def _inventory(cfg, model_config, precision: str) -> _Inventory:
    peft = cfg.peft
    lora = peft.method == "lora"
    nf4 = lora and getattr(peft, "quantize_base", None) == "nf4"
    frozen_matrix = ("bf16", 2) if precision == "bf16" else ("float32", 4)
    inv = _Inventory(weights={})

    def add(label: str, nbytes: float) -> None:
        inv.weights[label] = inv.weights.get(label, 0) + int(round(nbytes))

    features = _linear_features(model_config)
    extra = list(peft.modules_to_save) + (["score"] if cfg.task != "causal_lm" else [])
    layer0 = "model.layers.0."
    for t in model_tensors(model_config, cfg.task):
        module = t.name.rsplit(".", 1)[0]
        inv.total += t.numel
        in_layer0 = t.name.startswith(layer0)
        if t.group == "root":
            inv.root_params += t.numel
        elif in_layer0:
            inv.layer_params += t.numel
        trainable = not lora or _matches(module, extra)
        if lora and _matches(module, extra) and not t.name.startswith("score."):
            # peft's modules_to_save: the original stays (frozen) beside a trained copy.
            add(
                f"{frozen_matrix[0]} frozen" if t.ndim >= 2 else "float32 frozen",
                t.numel * (frozen_matrix[1] if t.ndim >= 2 else 4),
            )
        if trainable:
            add("float32 trainable", 4 * t.numel)
            inv.trainable += t.numel
            inv.largest_trainable = max(inv.largest_trainable, t.numel)
            if t.group == "root":
                inv.root_trainable += t.numel
                inv.head_trainable |= t.name == "lm_head.weight"
            elif in_layer0:
                inv.layer_trainable += t.numel
            continue
        if t.ndim < 2:
            add("float32 frozen (1-D)", 4 * t.numel)
        elif nf4 and t.group == "layer":
            add("nf4 frozen (+ scalers)", NF4_BYTES_PER_PARAM * t.numel)
        else:
            add(f"{frozen_matrix[0]} frozen", frozen_matrix[1] * t.numel)
        if lora and t.ndim >= 2 and t.group == "layer":
            linear = module.split(".", 3)[3]  # model.layers.N.<self_attn.dense>
            if linear in features and _matches(linear, peft.target_modules):
                fan_in, fan_out = features[linear]
                adapters = peft.r * (fan_in + fan_out)
                add("float32 trainable", 4 * adapters)
                inv.trainable += adapters
                inv.total += adapters
                inv.largest_trainable = max(inv.largest_trainable, peft.r * max(fan_in, fan_out))
                if in_layer0:
                    inv.layer_trainable += adapters
                    inv.layer_params += adapters
    return inv


# ---------------------------------------------------------------------------- activations


def _attention_backend(cfg, device: str) -> str:
    """What `model.attention=auto` resolves to for training rows (model/attention.py resolve_backend)."""
    name = cfg.model.attention
    if name != "auto":
        return name
    packed = cfg.data.format in ("text", "chat")
    if not packed:
        return "sdpa"
    return "varlen" if device == "cuda" else "segments"


def layer_activation_bytes(cfg, model_config, precision: str, tokens: int) -> int:
    """Bytes one decoder layer saves for backward over `tokens` tokens (no checkpointing).

    bf16 (autocast, float32 residual stream): the layer input 4h, the bf16 cast of each LayerNorm
    output 2h + 2h, q/k LayerNorm inputs in float32 8h, SDPA's bf16 q, k, v 6h and output 2h, the
    dense input 2h, the residual sum 4h, relu's output and its square 2i + 2i: 30h + 4i per token.
    float32: the input 4h, LayerNorm outputs 4h + 4h, the fused qkv output 12h, q/k after RoPE 8h,
    attention output and dense input 4h + 4h, the residual sum 4h, relu / square 4i + 4i: 44h + 8i.
    LoRA adds, per target Linear, a copy of its input for lora_A (compute dtype) and, with dropout,
    a 1-byte mask.
    """
    h, i, a = model_config.hidden_size, model_config.intermediate_size, model_config.num_attention_heads
    bf16 = precision == "bf16"
    per_token = (30 * h + 4 * i) if bf16 else (44 * h + 8 * i)
    if cfg.peft.method == "lora":
        inputs = {"self_attn.query_key_value": h, "self_attn.dense": h, "mlp.dense_h_to_4h": h, "mlp.dense_4h_to_h": i}
        width = sum(n for name, n in inputs.items() if _matches(name, cfg.peft.target_modules))
        copy = 2 if bf16 else (4 if cfg.peft.dropout > 0 else 0)
        per_token += width * (copy + (1 if cfg.peft.dropout > 0 else 0))
    # The kernels keep a float32 log-sum-exp per head and query (flash, varlen, flex, segments).
    per_token += 4 * a
    return per_token * tokens


def activation_bytes(cfg, model_config, precision: str, device: str) -> tuple[int, list[str]]:
    """Peak forward/backward transients of one micro-batch (activations + the loss's hidden copies)."""
    notes = []
    b, s = cfg.trainer.micro_batch_size, cfg.data.seq_len
    tokens = b * s
    n = model_config.num_hidden_layers
    h = model_config.hidden_size
    layer = layer_activation_bytes(cfg, model_config, precision, tokens)
    k = cfg.trainer.activation_checkpointing
    checkpointed = 0 if k <= 0 else math.ceil(n / k)
    full_layers = n - checkpointed
    # A checkpointed layer keeps its float32 input; backward recomputes one layer at a time.
    saved = full_layers * layer + checkpointed * 4 * h * tokens
    recompute = layer if checkpointed else 0
    # Backward holds the gradients of one layer's activations besides what is saved (~ one layer).
    backward = layer
    # Outside the layers: the last layer's output and the final LayerNorm's (float32), the loss's
    # flattened copy and its stored float32 gradient of the hidden states.
    outer = 4 * 4 * h * tokens
    total = saved + recompute + backward + outer
    backend = _attention_backend(cfg, device)
    if backend == "sdpa" and cfg.data.format in ("text", "chat"):
        total += b * s * s  # the dense [batch, 1, seq, seq] boolean mask of packed rows
        notes.append("model.attention=sdpa over packed rows builds a dense [batch, seq, seq] mask")
    return total, notes


def logits_chunk_bytes(cfg, model_config, precision: str, head_trainable: bool, head_in_fp32: bool = True) -> int:
    """The chunked loss (model/loss.py): one chunk of float32 logits (+ its bf16 twin under bf16),
    and for a trained head its weight-sized gradient accumulator and the bf16 cast of the weight."""
    from persimmon_train.model.loss import LOGITS_CHUNK_BYTES

    if cfg.task != "causal_lm":
        return 0
    v, h = model_config.vocab_size, model_config.hidden_size
    tokens = cfg.trainer.micro_batch_size * cfg.data.seq_len
    chunk = max(1, min(1024, LOGITS_CHUNK_BYTES // (4 * v), tokens))
    nbytes = chunk * v * (4 + (2 if precision == "bf16" else 0))
    if head_trainable:
        cast = 2 if precision == "bf16" and head_in_fp32 else 0  # the loss's bf16 copy of the weight
        nbytes += v * h * (2 + cast if precision == "bf16" else 4)  # + the accumulator
    return nbytes


# ---------------------------------------------------------------------------- the plan


def _ds_zero(cfg, ds_config: dict | None) -> dict:
    """zero_optimization of the DeepSpeed config the run will use (the strategy's, else the config's)."""
    s = cfg.strategy
    zero: dict = {}
    if ds_config is not None:
        zero = dict(ds_config.get("zero_optimization", {}) or {})
    elif s.config_file and os.path.isfile(s.config_file):
        import json

        try:
            with open(s.config_file, encoding="utf-8") as f:
                zero = json.load(f).get("zero_optimization", {}) or {}
        except (OSError, ValueError):
            zero = {}
    elif isinstance(s.extra, dict):
        zero = dict(s.extra.get("zero_optimization", {}) or {})
    return zero


def _ds_buckets(zero: dict) -> dict[str, int]:
    """Bucket sizes (elements): DeepSpeed's defaults where zero_optimization leaves them unset."""
    sizes = dict(DS_DEFAULT_BUCKETS)
    for key in sizes:
        value = zero.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            sizes[key] = int(value)
    return sizes


def default_precision(cfg, device: str) -> str:
    """trainer.precision as a run on `device` resolves it (auto: bf16 on GPUs; on CPU, bf16 with AMX)."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    if device == "cuda":
        return "bf16"
    from persimmon_train.parallel.single import cpu_bf16_is_fast, cpu_flags

    return "bf16" if cpu_bf16_is_fast(cpu_flags()) else "fp32"


def plan_memory(
    cfg,
    model_config,
    world_size: int = 1,
    device: str = "cpu",
    precision: str | None = None,
    available: int | None = None,
    ds_config: dict | None = None,
) -> MemoryPlan:
    """Per-rank memory of the run `cfg` on `world_size` ranks of `device` ('cpu' or 'cuda').

    `precision`: the resolved trainer.precision (default: as a run on `device` resolves it);
    `available`: the device's memory to compare with; `ds_config`: the DeepSpeed JSON the run uses
    (default: strategy.config_file / strategy.extra over DeepSpeed's bucket defaults)."""
    precision = precision or default_precision(cfg, device)
    cdt = 2 if precision == "bf16" else 4
    inv = _inventory(cfg, model_config, precision)
    strategy = cfg.strategy.name
    world = max(1, world_size)
    notes: list[str] = []
    weights = dict(inv.weights)
    trainable = inv.trainable
    grads = 4 * trainable
    optimizer = 8 * trainable
    comm = 0
    shard = 1
    step_temp = 4 * (trainable if device == "cuda" else 2 * inv.largest_trainable)  # AdamW foreach / per tensor
    activations, act_notes = activation_bytes(cfg, model_config, precision, device)
    notes += act_notes
    if strategy == "fsdp" and world > 1:
        shard = max(1, world // max(1, cfg.strategy.replicate_degree))
        weights = {k: math.ceil(v / shard) for k, v in weights.items()}
        grads, optimizer = math.ceil(grads / shard), math.ceil(optimizer / shard)
        step_temp = math.ceil(step_temp / shard) if device == "cuda" else step_temp
        # The root (embedding, head, final norm) stays gathered forward to backward; two layers at a
        # time (the current one and the prefetched next); both in the compute dtype. Before its
        # reduce-scatter a group holds its unsharded gradients (compute dtype) and their copy in the
        # float32 reduce-scatter input: the largest trainable group (the root, for full fine-tuning).
        reduce = (cdt + 4) * max(inv.layer_trainable, inv.root_trainable)
        comm = cdt * (inv.root_params + 2 * inv.layer_params) + reduce
        if cfg.strategy.cpu_offload and device == "cuda":
            notes.append("strategy.cpu_offload: shards, gradients and optimizer state are in host memory")
            weights, grads, optimizer, step_temp = {}, 0, 0, 0
    elif strategy == "deepspeed":
        zero = _ds_zero(cfg, ds_config)
        stage = zero.get("stage") if zero.get("stage") in (1, 2, 3) else (cfg.strategy.stage or 3)
        shard = world
        buckets = _ds_buckets(zero)
        # DeepSpeed's module holds the trainable parameters in the compute dtype (bf16 runs: a bf16
        # copy), and its optimizer a float32 master partition cloned from them (fp32 runs too).
        module = dict(weights)
        masters = module.pop("float32 trainable", 0)
        module["bf16 trainable (module)" if precision == "bf16" else "float32 trainable (module)"] = masters * cdt // 4
        if stage >= 3:
            module = {k: math.ceil(v / world) for k, v in module.items()}
        module["float32 masters (partition)"] = math.ceil(masters / world)
        weights = module
        optimizer = math.ceil(optimizer / world)
        if stage >= 2:
            grads = math.ceil(grads / world)
        elif precision == "bf16":
            grads = cdt * trainable + math.ceil(grads / world)  # bf16 grads + float32 partition
        params = inv.trainable if stage < 3 else inv.total
        comm = cdt * min(buckets["reduce_bucket_size"], trainable)
        if stage < 3:
            comm += cdt * min(buckets["allgather_bucket_size"], trainable)
        else:
            comm += cdt * (min(buckets["stage3_prefetch_bucket_size"], params) + inv.root_params + inv.layer_params)
        step_temp = math.ceil(step_temp / world) if device == "cuda" else step_temp
        if cfg.strategy.offload_optimizer != "none" or cfg.strategy.offload_param != "none":
            notes.append("DeepSpeed offload: the offloaded state is counted here as if it stayed on the device")
    elif strategy == "fsdp":
        comm = 0  # one rank: fully_shard over a mesh of one holds the model as single does
    if precision == "bf16" and strategy == "single" and cfg.peft.method == "none":
        # Autocast's bf16 copies of the float32 decoder matrices live from forward to backward (the
        # embedding is looked up, not cast; the head's cast is the loss's, counted with the chunk).
        activations += 2 * (inv.trainable - inv.root_trainable)
    # FSDP (more than one rank) and DeepSpeed bf16 hand the head its weight in bf16 already.
    head_in_fp32 = not (strategy == "deepspeed" or (strategy == "fsdp" and world > 1))
    logits = logits_chunk_bytes(cfg, model_config, precision, inv.head_trainable, head_in_fp32)
    runtime = RUNTIME_CUDA_BYTES if device == "cuda" else RUNTIME_CPU_BYTES
    return MemoryPlan(
        weights=weights,
        gradients=grads,
        optimizer=optimizer,
        activations=activations,
        logits_chunk=logits,
        communication=comm,
        runtime=runtime,
        step_temporaries=step_temp,
        device=device,
        world_size=world,
        shard_group=shard,
        precision=precision,
        available=available,
        trainable_params=inv.trainable,
        total_params=inv.total,
        notes=notes,
    )


# ---------------------------------------------------------------------------- the device, the run


def device_memory(device: str, index: int = 0) -> int | None:
    """Bytes a rank can use: a GPU's total memory; on CPU /proc/meminfo's MemAvailable (None: unknown)."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_model_config(cfg, tokenizer_vocab: int | None = None):
    """The model's config as the run will build it: model.path/config.json (architecture only, no
    weights), else the config's numbers; a null vocab_size is the tokenizer's (read, not built)."""
    from persimmon_train.model import PersimmonConfig

    m = cfg.model
    if m.path:
        return PersimmonConfig.from_json_file(m.path)
    vocab = m.vocab_size or tokenizer_vocab
    if vocab is None:
        from persimmon_train.training.builders import build_tokenizer

        vocab = build_tokenizer(cfg).vocab_size
    return m.architecture(vocab_size=vocab)


def check_run(cfg, strategy) -> MemoryPlan:
    """Log the run's estimate (rank 0) and refuse, before the model or data is built, a run whose
    estimate exceeds the device's memory, unless trainer.check_memory=false.

    On CPU the ranks of one host share its memory: the estimate times the local ranks is compared
    with MemAvailable.
    """
    from persimmon_train.errors import ConfigError

    device = strategy.device.type if strategy.device.type in ("cuda", "cpu") else "cpu"
    available = device_memory(device, strategy.device.index or 0 if device == "cuda" else 0)
    model_config = run_model_config(cfg)
    ds_config = getattr(strategy, "ds_config", None)
    plan = plan_memory(cfg, model_config, strategy.world_size, device, strategy.precision, available, ds_config)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1
    need = plan.total * max(1, local)
    if strategy.is_main:
        log.info("%s", plan.summary())
    if available is not None and need > available and getattr(cfg.trainer, "check_memory", True):
        ranks = f" x {local} ranks on this host" if local > 1 else ""
        where = "MemAvailable" if device == "cpu" else "GPU memory"
        raise ConfigError(
            f"trainer.check_memory: the run needs about {_gb(plan.total)} per rank{ranks} but {where} is "
            f"{_gb(available)}; levers: {levers(cfg)}; `persimmon-train estimate` shows the breakdown; "
            f"trainer.check_memory=false runs anyway"
        )
    return plan
