"""Three choices a real 8B job depends on, decided before any compute:

- `trainer.precision=auto` picks bf16 on a CPU only where bf16 matmuls are faster (AMX), not on
  AVX512-BF16 alone (measured there: bf16 161 vs fp32 307 GFLOP/s);
- `model.hidden_dropout` / `model.attention_dropout` override the released config.json's 0.6
  (a pre-training value fine-tuning must not inherit silently), in the full and the meta build;
- `strategy.cpu_offload=true` under FSDP on a CPU-only rank is refused in one line.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from torch import nn

from persimmon_train.errors import ConfigError
from persimmon_train.parallel import single
from persimmon_train.parallel.fsdp import FSDPStrategy
from persimmon_train.training import builders
from persimmon_train.training.config import RunConfig
from tests.helpers import tiny_model

SAPPHIRE_RAPIDS = {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}
ZEN4 = {"avx512f", "avx512_bf16"}  # AVX512-BF16, no AMX


@pytest.mark.parametrize(
    "flags,expected", [(SAPPHIRE_RAPIDS, "bf16"), (ZEN4, "fp32"), ({"avx2", "fma"}, "fp32"), (set(), "fp32")]
)
def test_auto_precision_on_cpu_follows_amx(monkeypatch, flags, expected):
    monkeypatch.setattr(single, "cpu_flags", lambda: flags)
    assert single.resolve_precision("auto", torch.device("cpu")) == expected
    # An explicit choice is never second-guessed.
    assert single.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert single.resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_cpu_flags_are_read_from_cpuinfo():
    flags = single.cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo on this system")
    assert {"fpu"} <= flags or {"sse2"} <= flags or flags == set()  # x86 lists these; others may have none
    assert single.cpu_bf16_is_fast(flags) == ("amx_bf16" in flags)


@pytest.fixture
def released_like(tmp_path):
    """A model folder whose config.json carries the released pre-training dropout."""
    folder = tmp_path / "released"
    tiny_model(hidden_dropout=0.6, attention_dropout=0.3).save_pretrained(folder)
    return folder


def _build(folder, meta: bool, **model_keys):
    cfg = RunConfig()
    cfg.model.path = str(folder)
    cfg.data.seq_len = 32
    for key, value in model_keys.items():
        setattr(cfg.model, key, value)
    tokenizer = types.SimpleNamespace(vocab_size=64, pad_id=0, bos_id=1, eos_id=2)
    return builders.build_model(cfg, tokenizer, meta=meta)


@pytest.mark.parametrize("meta", [False, True])
def test_dropout_overrides_beat_config_json(released_like, caplog, meta):
    with caplog.at_level(logging.INFO, logger="persimmon_train"):
        model = _build(released_like, meta)  # RunConfig's defaults: model.hidden_dropout=0.0, attention 0.0
    assert (model.config.hidden_dropout, model.config.attention_dropout) == (0.0, 0.0)
    # What the forward pass uses: the modules built from the config, not just the config's fields.
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.0}
    assert "dropout: hidden=0.0 attention=0.0" in caplog.text  # the choice is logged

    model = _build(released_like, meta, hidden_dropout=0.1, attention_dropout=0.05)
    assert (model.config.hidden_dropout, model.config.attention_dropout) == (0.1, 0.05)
    assert {m.p for m in model.modules() if isinstance(m, nn.Dropout)} == {0.1}

    # null: the user asked to keep the file's values.
    model = _build(released_like, meta, hidden_dropout=None, attention_dropout=None)
    assert (model.config.hidden_dropout, model.config.attention_dropout) == (0.6, 0.3)


def test_fsdp_cpu_offload_on_cpu_is_refused_before_anything_starts(monkeypatch):
    import torch.distributed as dist

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    was_initialized = dist.is_initialized()
    with pytest.raises(ConfigError, match=r"^strategy.cpu_offload: true needs an accelerator .*cpu_offload=false"):
        FSDPStrategy(precision="fp32", device="cpu", cpu_offload=True)
    assert dist.is_initialized() == was_initialized  # refused before joining a process group
