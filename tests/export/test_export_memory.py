"""Exporting a model keeps peak host memory near one tensor, not one shard or the model.

A ~150 MB (fp32) model is exported by the real recipe in a subprocess, which records its own peak
RSS growth over the export (VmHWM reset after imports): a full fine-tuning checkpoint (one 150 MB
model.safetensors, streamed tensor by tensor) into 20 MB shards, and a LoRA checkpoint over a
sharded model.path base (merged tensor by tensor, unchanged tensors copied in row blocks) into the
default 5 GB shards, where a writer that held a shard before writing it would hold the whole model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO, save_tiny_base, tiny_config

pytestmark = pytest.mark.slow  # the export's peak memory is measured in a child process

SHARD_MB = 20
DRIVER = r"""
import json, os, runpy, sys
import torch, safetensors, omegaconf  # noqa: F401  (imports are not the export's memory)
import persimmon_train.export.exporter, persimmon_train.training.builders, persimmon_train.data  # noqa: F401
from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
with torch.device("meta"):  # building the model class the first time imports ~70 MB of modules (sympy, ...)
    PersimmonForCausalLM(PersimmonConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1))

sys.path.insert(0, sys.argv[1])
from bench.host_memory import reset_peak, status_kib


recipe = runpy.run_path(os.path.join(sys.argv[1], "recipes", "export.py"), run_name="export_recipe")
assert reset_peak(), "/proc/self/clear_refs refused: VmHWM would hold the imports' peak"
before = status_kib("VmRSS") * 1024
recipe["main"](sys.argv[3:])
print("MEMORY " + json.dumps({"before": before, "peak": status_kib("VmHWM") * 1024}))
"""


def _big_base(folder, tokenizer_dir) -> tuple[dict, int]:
    from persimmon_train.data import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    config = tiny_config(
        tokenizer, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8
    )
    model = save_tiny_base(folder, tokenizer, config, seed=0, max_shard_size=f"{SHARD_MB}MB")
    return model.state_dict(), sum(p.numel() * 4 for p in model.parameters())


def _write_checkpoint(root, base, peft_method: str, weights: dict) -> str:
    """What a single-strategy run writes at step 1: trainable weights + manifest (storage's own writer)."""
    from safetensors.torch import save_file

    from persimmon_train.data import Tokenizer
    from persimmon_train.model import PersimmonConfig
    from persimmon_train.storage.checkpoints import LocalComm, save_checkpoint

    peft = (
        None
        if peft_method == "none"
        else {
            "method": "lora",
            "r": 8,
            "alpha": 16.0,
            "dropout": 0.0,
            "use_rslora": False,
            "modules_to_save": [],
            "target_modules": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
        }
    )
    metadata = {
        "task": "causal_lm",
        "strategy": {"name": "single", "world_size": 1},
        "peft": peft,
        "model": {
            "architecture": "PersimmonForCausalLM",
            "config": PersimmonConfig.from_json_file(base).to_dict(),
            "base": {"path": str(base), "seed": 0},
        },
    }

    def write_files(folder):
        save_file(weights, os.path.join(folder, "model.safetensors"))
        Tokenizer(base).save_pretrained(os.path.join(folder, "tokenizer"))

    return save_checkpoint(str(root), 1, comm=LocalComm(), write_files=write_files, metadata=metadata)


# full: 20 MB shards (8 files); lora: the default 5 GB shards, so the whole model is one file and
# only a streaming writer (one tensor at a time, not one shard) stays far below the model's size.
@pytest.mark.parametrize(("kind", "shard_mb"), [("full", SHARD_MB), ("lora", None)])
def test_export_peak_memory_stays_near_one_tensor(kind, shard_mb, tmp_path, base_dir, export_env):
    base = tmp_path / "base"
    state, model_bytes = _big_base(base, base_dir)
    if kind == "full":
        # What the single strategy writes for full fine-tuning: every weight in ONE file.
        weights = {k: v + 0.01 for k, v in state.items()}
    else:
        g = torch.Generator().manual_seed(0)
        weights = {}
        for i in range(12):
            for module, (n_in, n_out) in {
                "self_attn.query_key_value": (512, 1536),
                "self_attn.dense": (512, 512),
                "mlp.dense_h_to_4h": (512, 2048),
                "mlp.dense_4h_to_h": (2048, 512),
            }.items():
                prefix = f"base_model.model.model.layers.{i}.{module}"
                weights[f"{prefix}.lora_A.default.weight"] = torch.randn(8, n_in, generator=g)
                weights[f"{prefix}.lora_B.default.weight"] = torch.randn(n_out, 8, generator=g)
    adapter = weights
    state_names = list(state)
    largest = max(t.numel() * 4 for t in state.values())
    step = _write_checkpoint(tmp_path / "run", base, "none" if kind == "full" else "lora", weights)
    del weights
    del state

    out = tmp_path / "export"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            DRIVER,
            str(REPO),
            "export.py",
            f"checkpoint={step}",
            f"output_dir={out}",
            "dtype=fp32",
            *([f"max_shard_size={shard_mb}MB"] if shard_mb else []),
        ],
        cwd=REPO,
        env=export_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    memory = json.loads(proc.stdout.split("MEMORY ", 1)[1])
    growth = memory["peak"] - memory["before"]
    print(
        f"\n{kind}: model {model_bytes / 1e6:.0f} MB fp32, shards {shard_mb or 5000} MB, "
        f"peak RSS growth {growth / 1e6:.1f} MB ({growth / model_bytes:.2f}x the model)"
    )
    if shard_mb:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 7
        assert index["metadata"]["total_size"] == model_bytes
    else:
        assert not (out / "model.safetensors.index.json").exists()
        index = {"weight_map": {name: "model.safetensors" for name in state_names}}
    print(f"largest tensor {largest / 1e6:.1f} MB")
    assert growth < 0.25 * model_bytes, (growth, model_bytes, largest)

    # And the streamed result is right: spot-check a merged / fine-tuned weight.
    from safetensors import safe_open

    name = "model.layers.11.mlp.dense_4h_to_h.weight"
    with safe_open(str(out / index["weight_map"][name]), "pt") as f:
        exported = f.get_tensor(name)
    with safe_open(
        str(base / json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][name]), "pt"
    ) as f:
        original = f.get_tensor(name)
    if kind == "full":
        expected = original + 0.01
    else:
        prefix = "base_model.model.model.layers.11.mlp.dense_4h_to_h"
        delta = adapter[f"{prefix}.lora_B.default.weight"] @ adapter[f"{prefix}.lora_A.default.weight"]
        expected = original + (16 / 8) * delta
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)
