"""Convert ADEPT's original Megatron-style Persimmon release into a Hugging Face model folder.

ADEPT released Persimmon-8B as ``<release>/iter_<N>/mp_rank_00/model_optim_rng.pt`` plus the
sentencepiece model ``adept_vocab.model``. The ``.pt`` file is a pickle of::

    {"args": argparse.Namespace(...),            # the Megatron command line: the architecture
     "iteration": N, "checkpoint_version": 3.0,  # (and sometimes "rng_state", "optimizer", ...)
     "model": {"language_model": {
                   "embedding": {"word_embeddings": {"weight": [vocab, hidden]}},
                   "encoder": {"layers.0.input_layernorm.weight": ...,
                               "layers.0.self_attention.query_key_value.weight": ...,
                               ...,
                               "final_layernorm.weight": ...}},
               "word_embeddings_for_head": {"weight": [vocab, hidden]}}}

(nesting from adept-inference's ``GPTModel`` / ``TransformerLanguageModel`` / ``Embedding``
``state_dict_for_save_checkpoint``). The fused ``query_key_value`` rows are already laid out per
head as ``[heads, 3, head_dim]`` -- the layout the Hugging Face model views them in -- so the
conversion is a pure rename, the same one transformers' ``convert_persimmon_weights_to_hf.py``
performs. Two things differ from that script on purpose:

* the config comes from the checkpoint's own ``args`` (``rotary_emb_base`` -> ``rope_theta``,
  ``rotary_pct`` -> ``partial_rotary_factor``, ...), where the script writes ``PersimmonConfig()``
  class defaults (in transformers 5.x that default rope_theta is 10000, not the 25000 used in
  training);
* bos/eos are the tokenizer's ``|ENDOFTEXT|`` piece (what the released HF config uses), not 1/2.

Security and memory: the pickle is read with ``torch.load(weights_only=True)`` and an allow-list
of exactly the classes such a checkpoint holds (``argparse.Namespace``, Megatron's enums through
inert stand-ins, numpy's RNG-state pieces); anything else is refused with its name. Tensors are
memory-mapped (``mmap=True``) and renamed / cast lazily, one at a time while each shard is
written, so the converter never holds a second full copy of the weights.
"""

from __future__ import annotations

import argparse
import enum
import logging
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from persimmon_train.data.tokenizer import ENDOFTEXT, Tokenizer
from persimmon_train.errors import ConfigError, DataError, WeightsError, first_line

logger = logging.getLogger(__name__)

CHECKPOINT_FILE_NAMES = ("model_optim_rng.pt", "model_rng.pt")  # the latter: distributed optimizer
TRACKER_FILE_NAME = "latest_checkpointed_iteration.txt"
_LIST_LIMIT = 10

# Megatron names (under checkpoint["model"], flattened with ".") -> Hugging Face names.
_EMBEDDING = "language_model.embedding.word_embeddings.weight"
_HEAD = "word_embeddings_for_head.weight"
_ENCODER = "language_model.encoder."
_LAYER_TENSORS = (  # per layer, Megatron suffix -> HF suffix; biases everywhere, as in the release
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("input_layernorm.bias", "input_layernorm.bias"),
    ("self_attention.query_key_value.weight", "self_attn.query_key_value.weight"),
    ("self_attention.query_key_value.bias", "self_attn.query_key_value.bias"),
    ("self_attention.dense.weight", "self_attn.dense.weight"),
    ("self_attention.dense.bias", "self_attn.dense.bias"),
    ("post_attention_layernorm.weight", "post_attention_layernorm.weight"),
    ("post_attention_layernorm.bias", "post_attention_layernorm.bias"),
    ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.weight"),
    ("mlp.dense_h_to_4h.bias", "mlp.dense_h_to_4h.bias"),
    ("mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.weight"),
    ("mlp.dense_4h_to_h.bias", "mlp.dense_4h_to_h.bias"),
)
_QK_LAYERNORM_TENSORS = tuple(
    (f"self_attention.{which}_layernorm.{p}", f"self_attn.{which}_layernorm.{p}")
    for which in ("q", "k")
    for p in ("weight", "bias")
)
# A persistent buffer of Megatron's RotaryEmbedding; recomputed from rope_theta, so dropped
# (transformers' converter drops it too: KEYS_TO_REMOVE = "rotary_emb.inv_freq").
_INV_FREQ = re.compile(r"language_model\.encoder\.layers\.(\d+)\.self_attention\.rotary_emb\.inv_freq")


# --------------------------------------------------------------------------- safe unpickling
#
# The release pickles Megatron classes by reference (adept-inference's get_model() sets
# ``args.model_type = ModelType.encoder_or_decoder``), which is why transformers' converter puts
# the adept-inference checkout on sys.path and unpickles with full trust. We instead map those
# names to inert enums of our own: same members, no code.


class _MegatronModelType(enum.Enum):
    encoder_or_decoder = 1
    encoder_and_decoder = 2


class _MegatronLayerType(enum.Enum):
    encoder = 1
    decoder = 2


class _MegatronAttnType(enum.Enum):
    self_attn = 1
    cross_attn = 2


class _MegatronAttnMaskType(enum.Enum):
    padding = 1
    causal = 2


def _safe_globals() -> list:
    """The classes a Megatron checkpoint may reference, and nothing else."""
    import numpy as np

    allowed: list = [argparse.Namespace]
    for stand_in, name in (
        (_MegatronModelType, "ModelType"),
        (_MegatronLayerType, "LayerType"),
        (_MegatronAttnType, "AttnType"),
        (_MegatronAttnMaskType, "AttnMaskType"),
    ):
        allowed.append((stand_in, f"megatron.model.enums.{name}"))
    # rng_state["np_rng_state"] = np.random.get_state(): a uint32 array rebuilt by numpy's
    # _reconstruct (spelled numpy.core in numpy 1.x pickles, numpy._core in 2.x).
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    allowed += [
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
    ]
    allowed += [type(np.dtype(code)) for code in ("u4", "i8", "f8")]  # numpy>=1.25 dtype classes
    return allowed


def load_megatron_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` a Megatron ``.pt`` file safely: weights_only, allow-listed classes, mmap."""
    path = os.fspath(path)
    load = dict(map_location="cpu", weights_only=True)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            try:
                return torch.load(path, mmap=True, **load)
            except RuntimeError as error:
                if "mmap" not in str(error):
                    raise
                # Files from torch < 1.6 (legacy, non-zip format) cannot be memory-mapped.
                logger.warning("%s is not a zip-format torch file; loading it without mmap", path)
                return torch.load(path, **load)
    except pickle.UnpicklingError as error:
        # The safe unpickler reports refused classes ("GLOBAL x.y") and garbage bytes
        # ("Unsupported operand") with the same exception; only the first is a refusal.
        if "GLOBAL" in str(error):
            raise WeightsError(_refusal_message(path, error)) from None
        detail = re.search(r"Unsupported operand \S+|invalid load key[^\n]*", str(error))
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({detail.group(0) if detail else first_line(error)})"
        ) from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise WeightsError(
            f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {first_line(error)})"
        ) from None


def _refusal_message(path: str, error: Exception) -> str:
    unsafe: list[str] = []
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy-format or broken file: fall back to torch's own message
        pass
    if not unsafe:  # legacy (non-zip) files: torch's message names the first refused global
        unsafe = re.findall(r"GLOBAL ([\w.]+)", str(error))[:1]
    what = f"it references {', '.join(unsafe[:_LIST_LIMIT])}" if unsafe else first_line(error)
    return (
        f"{path} was refused by the safe loader (torch.load weights_only=True): {what}. A "
        "Megatron checkpoint of Persimmon holds tensors, argparse.Namespace, Megatron enums "
        "and numpy RNG state only; this file needs more, and it will not be unpickled with "
        "full trust (that can run arbitrary code)"
    )


# --------------------------------------------------------------------------- locating the file


def find_checkpoint_file(path: str | os.PathLike) -> str:
    """The ``.pt`` to convert, from the file itself or an ``mp_rank_00``, ``iter_N`` or release folder."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"checkpoint {path} does not exist")
    folder = os.path.normpath(os.path.abspath(path))
    if os.path.isfile(path):
        _refuse_model_parallel_beside(os.path.dirname(folder))
        return path
    for name in CHECKPOINT_FILE_NAMES:  # an mp_rank_00 folder
        if os.path.isfile(os.path.join(path, name)):
            _refuse_model_parallel_beside(folder)
            return os.path.join(path, name)
    if _rank_folders(path):  # an iter_N folder
        return _from_iteration_folder(path)
    iterations = sorted(
        d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)) and re.fullmatch(r"iter_\d+|release", d)
    )
    if not iterations:
        raise WeightsError(
            f"no Megatron checkpoint in {path}: expected {CHECKPOINT_FILE_NAMES[0]}, an mp_rank_00/ "
            "folder, or iter_<N>/ folders (the layout of ADEPT's release)"
        )
    tracker = os.path.join(path, TRACKER_FILE_NAME)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as handle:
            latest = handle.read().strip()
        chosen = "release" if latest == "release" else (f"iter_{int(latest):07d}" if latest.isdigit() else None)
        if chosen is None or chosen not in iterations:
            raise WeightsError(f"{tracker} names iteration {latest!r}, but {path} has only {', '.join(iterations)}")
    elif len(iterations) == 1:
        chosen = iterations[0]
    else:
        raise WeightsError(
            f"{path} holds several checkpoints ({', '.join(iterations)}) and no "
            f"{TRACKER_FILE_NAME}: pass the iter_<N> folder to convert"
        )
    return _from_iteration_folder(os.path.join(path, chosen))


def _rank_folders(folder: str) -> list[str]:
    return sorted(d for d in os.listdir(folder) if d.startswith("mp_rank_") and os.path.isdir(os.path.join(folder, d)))


def _refuse_model_parallel_beside(rank_folder: str) -> None:
    if os.path.basename(rank_folder).startswith("mp_rank_"):
        _refuse_model_parallel(os.path.dirname(rank_folder))


def _refuse_model_parallel(iteration_folder: str) -> None:
    ranks = _rank_folders(iteration_folder)
    others = [r for r in ranks if r != "mp_rank_00"]
    if others:
        kind = "pipeline-parallel" if any(re.fullmatch(r"mp_rank_\d\d_\d{3}", r) for r in ranks) else "tensor-parallel"
        raise WeightsError(
            f"{iteration_folder} holds {kind} shards ({', '.join(ranks[:_LIST_LIMIT])}); only "
            "single-shard checkpoints (mp_rank_00 alone, as ADEPT released) can be converted: "
            "merge the shards with Megatron's checkpoint tools first"
        )


def _from_iteration_folder(folder: str) -> str:
    _refuse_model_parallel(folder)
    for name in CHECKPOINT_FILE_NAMES:
        candidate = os.path.join(folder, "mp_rank_00", name)
        if os.path.isfile(candidate):
            return candidate
    raise WeightsError(f"no {CHECKPOINT_FILE_NAMES[0]} in {os.path.join(folder, 'mp_rank_00')}")


# --------------------------------------------------------------------------- structure


def flatten_model(model: Mapping, source: str) -> dict[str, torch.Tensor]:
    """Join nested dict keys with "." (as transformers' converter does with flatdict)."""
    flat: dict[str, torch.Tensor] = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, torch.Tensor):
                flat[name] = value
            elif isinstance(value, Mapping):
                walk(value, name + ".")
            elif value is not None:  # Megatron's _extra_state-style entries would land here
                raise WeightsError(
                    f"{source}: model entry {name} is a {type(value).__name__}, not a tensor or a dict of tensors"
                )

    walk(model, "")
    return flat


def checkpoint_parts(checkpoint: Any, source: str) -> tuple[Any, Mapping]:
    """(args, model dict) of a loaded Megatron checkpoint, or a WeightsError saying what is missing."""
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(
            f"{source} is not a Megatron checkpoint: it holds a "
            f"{type(checkpoint).__name__}, not a dict with 'model' and 'args'"
        )
    keys = ", ".join(sorted(map(str, checkpoint))[:_LIST_LIMIT]) or "nothing"
    if "model" not in checkpoint:
        hint = (
            " ('model0', 'model1', ... are virtual-pipeline chunks, which are not supported)"
            if "model0" in checkpoint
            else ""
        )
        raise WeightsError(f"{source} is not a Megatron checkpoint: no 'model' entry (it has {keys}){hint}")
    if "args" not in checkpoint:
        raise WeightsError(
            f"{source} has no 'args' entry (it has {keys}): the architecture "
            "(hidden_size, num_layers, rotary_emb_base, ...) is read from it"
        )
    args = checkpoint["args"]
    if isinstance(args, Mapping):
        args = argparse.Namespace(**args)
    if not isinstance(args, argparse.Namespace):
        raise WeightsError(f"{source}: 'args' is a {type(args).__name__}, expected argparse.Namespace")
    if not isinstance(checkpoint["model"], Mapping):
        raise WeightsError(f"{source}: 'model' is a {type(checkpoint['model']).__name__}, expected a dict of tensors")
    return args, checkpoint["model"]


# --------------------------------------------------------------------------- config from args


def config_from_args(
    args: argparse.Namespace,
    vocab_size: int,
    bos_token_id: int | None,
    eos_token_id: int | None,
    source: str = "checkpoint",
):
    """A PersimmonConfig from Megatron ``args`` (names as in adept-inference's arguments.py)."""
    from persimmon_train.model import PersimmonConfig

    def arg(*names, default=None, required=True):
        for name in names:
            value = getattr(args, name, None)
            if value is not None:
                return value
        if required and default is None:
            raise WeightsError(f"{source}: args has no {' / '.join(names)}, needed for the config")
        return default

    def must(condition: bool, message: str) -> None:
        if not condition:
            raise WeightsError(
                f"{source}: {message}; the Hugging Face Persimmon architecture cannot represent this checkpoint"
            )

    hidden, heads = int(arg("hidden_size")), int(arg("num_attention_heads"))
    pos_emb = arg("pos_emb", default="rotary")
    must(pos_emb == "rotary", f"args.pos_emb is {pos_emb!r}, not 'rotary'")
    kv_channels = arg("kv_channels", required=False)
    must(
        kv_channels is None or heads * int(kv_channels) == hidden,
        f"args.kv_channels ({kv_channels}) x num_attention_heads ({heads}) != hidden_size ({hidden})",
    )
    must(
        not arg("apply_residual_connection_post_layernorm", required=False),
        "args.apply_residual_connection_post_layernorm is set",
    )
    must(not arg("num_experts", required=False), "args.num_experts is set (mixture of experts)")
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        size = arg(name, default=1)
        if int(size) != 1:
            raise WeightsError(
                f"{source}: args.{name} is {size}: this file is one shard of a "
                "model-parallel checkpoint; merge the shards first"
            )

    if arg("sq_relu", required=False):
        act = "relu2"
    else:
        must(
            not arg("openai_gelu", required=False) and not arg("onnx_safe", required=False),
            "args.openai_gelu / onnx_safe select a tanh GeLU",
        )
        act = "gelu"

    qk = arg("qk_layernorm", default="none")
    if isinstance(qk, bool):
        qk_layernorm = qk
    else:
        # weights_per_tensor_parallel_rank_and_layer equals weights_per_layer with one shard.
        must(
            qk in ("none", "weights_per_layer", "weights_per_tensor_parallel_rank_and_layer"),
            f"args.qk_layernorm is {qk!r} (one LayerNorm per head)",
        )
        qk_layernorm = qk != "none"

    padded = arg("padded_vocab_size", required=False)
    if padded is not None and int(padded) != vocab_size:
        raise WeightsError(f"{source}: args.padded_vocab_size is {padded} but {_EMBEDDING} has {vocab_size} rows")
    try:
        return PersimmonConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(arg("ffn_hidden_size", default=4 * hidden)),
            num_hidden_layers=int(arg("num_layers", "encoder_num_layers")),
            num_attention_heads=heads,
            hidden_act=act,
            # Megatron asserts max_position_embeddings >= seq_length; rotary ignores both.
            max_position_embeddings=int(arg("max_position_embeddings", "seq_length")),
            rope_theta=float(arg("rotary_emb_base")),
            partial_rotary_factor=float(arg("rotary_pct")),
            qk_layernorm=qk_layernorm,
            # adept-inference spells it layernorm_epsilon; llama.cpp's converter reads
            # layer_norm_epsilon from the released args. 1e-5 is Megatron's default.
            layer_norm_eps=float(arg("layernorm_epsilon", "layer_norm_epsilon", default=1e-5)),
            hidden_dropout=float(arg("hidden_dropout", default=0.0)),
            attention_dropout=float(arg("attention_dropout", default=0.0)),
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=None,
        )
    except ConfigError as error:
        raise WeightsError(f"{source}: the architecture in args is not valid ({error})") from None


def special_token_ids(tokenizer_path: str) -> tuple[int | None, int | None, int]:
    """(bos, eos, piece count) as the training tokenizer reads them (persimmon_train.data.Tokenizer):
    the ``|ENDOFTEXT|`` piece for both, as in the released config; a warning when it is absent."""
    try:
        tokenizer = Tokenizer(tokenizer_path)
    except DataError as error:
        raise WeightsError(str(error)) from None
    if tokenizer.id_to_piece(tokenizer.eos_id) != ENDOFTEXT:
        warnings.warn(
            f"tokenizer {tokenizer_path} has no {ENDOFTEXT!r} piece (ADEPT's adept_vocab.model "
            f"has it); using its own bos/eos ids {tokenizer.bos_id}/{tokenizer.eos_id}",
            stacklevel=3,
        )
    return tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size


def megatron_to_hf_names(config, tied: bool = False) -> dict[str, str]:
    """Every Megatron tensor name a checkpoint of ``config`` must have -> its Hugging Face name."""
    names = {_EMBEDDING: "model.embed_tokens.weight"}
    per_layer = _LAYER_TENSORS + (_QK_LAYERNORM_TENSORS if config.qk_layernorm else ())
    for i in range(config.num_hidden_layers):
        for megatron, hf in per_layer:
            names[f"{_ENCODER}layers.{i}.{megatron}"] = f"model.layers.{i}.{hf}"
    names[f"{_ENCODER}final_layernorm.weight"] = "model.final_layernorm.weight"
    names[f"{_ENCODER}final_layernorm.bias"] = "model.final_layernorm.bias"
    if not tied:
        names[_HEAD] = "lm_head.weight"
    return names


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape: the causal LM of ``config`` built on the meta device (no memory)."""
    from persimmon_train.model import PersimmonForCausalLM

    with torch.device("meta"):
        model = PersimmonForCausalLM(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


class ConvertedTensors(Mapping):
    """The Hugging Face state dict, renamed and cast on access (nothing is copied up front).

    ``save_safetensors`` touches each tensor while writing its shard; a cast copy lives only as
    long as that shard. When the checkpoint is already in the target dtype, no copy is made at all
    and the bytes go from the memory-mapped file straight to the output file.
    """

    def __init__(self, flat: Mapping[str, torch.Tensor], hf_to_megatron: Mapping[str, str], dtype: torch.dtype):
        self._flat, self._names, self._dtype = flat, dict(hf_to_megatron), dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._flat[self._names[name]]
        return tensor.to(self._dtype) if tensor.is_floating_point() else tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _check_tensors(flat: Mapping[str, torch.Tensor], names: Mapping[str, str], config, source: str) -> None:
    missing = [name for name in names if name not in flat]
    if missing:
        raise WeightsError(
            f"{source}: {len(missing)} tensors the architecture in args needs are "
            f"missing from 'model': {_preview(missing)}"
        )
    unexpected = [name for name in flat if name not in names and not _INV_FREQ.fullmatch(name)]
    if unexpected:
        raise WeightsError(
            f"{source}: {len(unexpected)} tensors in 'model' have no place in a Persimmon model: {_preview(unexpected)}"
        )
    shapes = expected_shapes(config)
    wrong = [
        f"{megatron} is {tuple(flat[megatron].shape)}, expected {shapes[hf]}"
        for megatron, hf in names.items()
        if tuple(flat[megatron].shape) != shapes[hf]
    ]
    if wrong:
        raise WeightsError(f"{source}: tensor shapes do not match args: {_preview(wrong)}")
    wrong = [name for name in names if not flat[name].is_floating_point()]
    if wrong:
        raise WeightsError(f"{source}: weights must be floating point: {_preview(wrong)}")


def _check_rotary_base(flat: Mapping[str, torch.Tensor], config, source: str) -> None:
    """The stored inv_freq buffers were computed from the training base: they must agree with args.

    Megatron's Float16Module casts buffers too, so they may be bf16 (relative error <= 2**-8);
    a wrong base (10000 vs 25000) is off by percents already in the second frequency.
    """
    rotary_dim = config.rotary_dim
    expected = 1.0 / (config.rope_theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    for name, tensor in flat.items():
        if _INV_FREQ.fullmatch(name) and (
            tensor.shape != expected.shape or not torch.allclose(tensor.float(), expected, rtol=1e-2, atol=0)
        ):
            warnings.warn(
                f"{source}: {name} does not match rotary_emb_base={config.rope_theta} and "
                f"rotary_pct={config.partial_rotary_factor} from args; the config uses args",
                stacklevel=3,
            )
            return


def _preview(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f" ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else "")


# --------------------------------------------------------------------------- conversion


@dataclass
class ConversionResult:
    output_dir: str
    checkpoint_file: str
    config: Any  # PersimmonConfig
    weight_files: list[str]
    num_parameters: int
    iteration: int | None


def convert_adept_checkpoint(
    checkpoint_path: str | os.PathLike,
    tokenizer_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
) -> ConversionResult:
    """Write an HF model folder (config.json, safetensors, tokenizer, generation_config.json).

    ``checkpoint_path``: ``model_optim_rng.pt`` or its ``mp_rank_00`` / ``iter_N`` / release folder.
    ``tokenizer_path``: ADEPT's ``adept_vocab.model`` (copied as ``tokenizer.model``).
    """
    from persimmon_train.data import Tokenizer
    from persimmon_train.storage import check_output_folder, write_hf_folder

    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ConfigError(f"dtype {dtype} is not supported: use torch.bfloat16 or torch.float32")
    tokenizer_path = os.fspath(tokenizer_path)
    if os.path.isdir(tokenizer_path):
        candidates = [os.path.join(tokenizer_path, n) for n in ("adept_vocab.model", "tokenizer.model")]
        tokenizer_path = next((c for c in candidates if os.path.isfile(c)), candidates[0])
    if not os.path.isfile(tokenizer_path):
        raise WeightsError(f"tokenizer {tokenizer_path} does not exist (pass adept_vocab.model)")
    output_dir = os.fspath(output_dir)
    source = find_checkpoint_file(checkpoint_path)
    check_output_folder(output_dir, "output_dir", overwrite)  # before the (long) checkpoint load
    bos, eos, pieces = special_token_ids(tokenizer_path)

    logger.info("loading %s (memory-mapped)", source)
    checkpoint = load_megatron_checkpoint(source)
    args, model = checkpoint_parts(checkpoint, source)
    iteration = checkpoint.get("iteration") if isinstance(checkpoint.get("iteration"), int) else None
    flat = flatten_model(model, source)
    del checkpoint, model  # optimizer / rng state are not needed; the tensors live on in `flat`

    if _EMBEDDING not in flat:
        raise WeightsError(f"{source}: 'model' has no {_EMBEDDING} (found {_preview(sorted(flat))})")
    vocab_size = flat[_EMBEDDING].shape[0]
    if pieces > vocab_size:
        raise WeightsError(
            f"tokenizer {tokenizer_path} has {pieces} pieces but {_EMBEDDING} has "
            f"only {vocab_size} rows: they do not belong together"
        )
    config = config_from_args(args, vocab_size, bos, eos, source)
    # Megatron saves no separate head when the embeddings are tied (untie_embeddings unset).
    tied = _HEAD not in flat and not getattr(args, "untie_embeddings", None)
    names = megatron_to_hf_names(config, tied=tied)
    _check_tensors(flat, names, config, source)
    _check_rotary_base(flat, config, source)

    # HF order (embeddings, layers, final norm, head): shards fill as transformers' own do.
    hf_to_megatron = {hf: megatron for megatron, hf in names.items()}
    if tied:
        hf_to_megatron["lm_head.weight"] = _EMBEDDING
    state = ConvertedTensors(flat, hf_to_megatron, dtype)

    num_parameters = sum(flat[m].numel() for m in hf_to_megatron.values())
    weight_files = write_hf_folder(
        output_dir,
        ((name, state[name]) for name in state),
        architecture="PersimmonForCausalLM",
        config=config,
        tokenizer=Tokenizer(tokenizer_path),
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        progress_total=len(state),
    )
    del state, flat
    logger.info("wrote %s (%d parameters, %s)", output_dir, num_parameters, dtype)
    return ConversionResult(output_dir, source, config, weight_files, num_parameters, iteration)


__all__ = [
    "CHECKPOINT_FILE_NAMES",
    "ConversionResult",
    "ConvertedTensors",
    "checkpoint_parts",
    "config_from_args",
    "convert_adept_checkpoint",
    "find_checkpoint_file",
    "flatten_model",
    "load_megatron_checkpoint",
    "megatron_to_hf_names",
    "special_token_ids",
]
