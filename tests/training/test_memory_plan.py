"""The memory planner (training/memory_plan.py): its arithmetic against hand computations from the
config's numbers, its count of parameters against a real (meta-device) model with peft's LoRA, the
refusal of a run that cannot fit (before the data or the model is built), and
`persimmon-train estimate` on the released 8B config without any weights."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest
import torch

from persimmon_train import cli
from persimmon_train.errors import ConfigError
from persimmon_train.model import PersimmonConfig, PersimmonForCausalLM
from persimmon_train.training import memory_plan
from persimmon_train.training.config import RunConfig

# Persimmon-8B's released numbers, written out here (not read from the code under test).
V, H, FF, N, HEADS = 262144, 4096, 16384, 36, 64
D = H // HEADS


def run_config(**changes) -> RunConfig:
    cfg = RunConfig()
    for key, value in changes.items():
        node = cfg
        *path, last = key.split(".")
        for part in path:
            node = getattr(node, part)
        setattr(node, last, value)
    return cfg


def released() -> PersimmonConfig:
    return PersimmonConfig(
        vocab_size=V, hidden_size=H, intermediate_size=FF, num_hidden_layers=N, num_attention_heads=HEADS
    )


def test_8b_lora_bf16_weights_are_bf16_matrices_float32_vectors_and_float32_adapters():
    cfg = run_config(**{"peft.method": "lora", "peft.r": 16})
    plan = memory_plan.plan_memory(cfg, released(), 1, "cuda", "bf16")
    matrices = N * (3 * H * H + H * H + FF * H + H * FF) + 2 * V * H  # decoder linears, embedding, head
    vectors = N * (4 * H + 3 * H + H + FF + H + 4 * D) + 2 * H  # norms, biases, q/k norms; final norm
    adapters = N * 16 * ((H + 3 * H) + (H + H) + (H + FF) + (FF + H))
    assert plan.weights == {
        "bf16 frozen": 2 * matrices,
        "float32 frozen (1-D)": 4 * vectors,
        "float32 trainable": 4 * adapters,
    }
    assert plan.gradients == 4 * adapters
    assert plan.optimizer == 8 * adapters
    assert plan.trainable_params == adapters
    assert abs(2 * matrices - 18.79e9) < 0.01e9  # the 18.8 GB of docs/DESIGN.md


def test_fp32_runs_hold_frozen_matrices_in_float32():
    cfg = run_config(**{"peft.method": "lora"})
    plan = memory_plan.plan_memory(cfg, released(), 1, "cpu", "fp32")
    assert plan.weights["float32 frozen"] == 4 * (N * (3 * H * H + H * H + 2 * FF * H) + 2 * V * H)
    assert "bf16 frozen" not in plan.weights


def test_parameter_counts_match_the_model_with_peft_lora():
    """The planner's inventory against a real model: every parameter, trainable or not."""
    from persimmon_train.adapters import apply_lora

    config = PersimmonConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=320, num_hidden_layers=3, num_attention_heads=4
    )
    cfg = run_config(
        **{"peft.method": "lora", "peft.r": 4, "peft.target_modules": ["query_key_value", "dense_4h_to_h"]}
    )
    with torch.device("meta"):
        model = apply_lora(PersimmonForCausalLM(config), cfg.peft, "causal_lm")
    plan = memory_plan.plan_memory(cfg, config, 1, "cpu", "fp32")
    assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.total_params == sum(p.numel() for p in model.parameters())
    full = memory_plan.plan_memory(run_config(), config, 1, "cpu", "fp32")
    assert full.trainable_params == full.total_params == config.num_parameters()


def test_fsdp_divides_by_the_shard_group_and_zero_by_its_stage():
    config = released()
    params = config.num_parameters()
    fsdp = memory_plan.plan_memory(run_config(**{"strategy.name": "fsdp"}), config, 8, "cuda", "fp32")
    assert fsdp.shard_group == 8
    assert fsdp.weights == {"float32 trainable": -(-4 * params // 8)}
    assert fsdp.optimizer == -(-8 * params // 8) and fsdp.gradients == -(-4 * params // 8)
    hsdp = run_config(**{"strategy.name": "fsdp", "strategy.replicate_degree": 2})
    assert memory_plan.plan_memory(hsdp, config, 8, "cuda", "fp32").optimizer == -(-8 * params // 4)
    # Two layers all-gathered (current + prefetch) and the root, float32; the root's unsharded
    # gradients and their float32 reduce-scatter input.
    layer = (config.num_parameters() - 2 * V * H - 2 * H) // N
    assert fsdp.communication == 4 * (2 * V * H + 2 * H + 2 * layer) + (4 + 4) * (2 * V * H + 2 * H)

    def zero(stage):
        cfg = run_config(**{"strategy.name": "deepspeed", "strategy.stage": stage})
        return memory_plan.plan_memory(cfg, config, 4, "cuda", "fp32")

    one, two, three = zero(1), zero(2), zero(3)
    assert one.optimizer == two.optimizer == three.optimizer == 8 * params // 4
    assert one.gradients == 4 * params and two.gradients == three.gradients == 4 * params // 4
    # The module's parameters (whole below stage 3) and the optimizer's float32 master partition.
    assert (
        one.weights == two.weights == {"float32 trainable (module)": 4 * params, "float32 masters (partition)": params}
    )
    assert three.weights == {"float32 trainable (module)": params, "float32 masters (partition)": params}
    # The buckets come from the DeepSpeed config the run uses (a user's JSON: its stage too).
    ds_config = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000, "allgather_bucket_size": 2000}}
    cfg = run_config(**{"strategy.name": "deepspeed", "strategy.stage": 1})
    small = memory_plan.plan_memory(cfg, config, 4, "cuda", "fp32", ds_config=ds_config)
    assert small.communication == 4 * (1000 + 2000) and small.gradients == two.gradients


def test_activations_follow_activation_checkpointing_by_hand():
    h, i, n, a, b, s = 256, 1024, 6, 4, 2, 128
    config = PersimmonConfig(
        vocab_size=512, hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=a
    )
    tokens = b * s
    layer = (44 * h + 8 * i + 4 * a) * tokens  # float32, full fine-tuning (no LoRA copies)
    outer = 16 * h * tokens
    base = {"data.seq_len": s, "trainer.micro_batch_size": b, "model.attention": "segments"}
    off = memory_plan.plan_memory(run_config(**base), config, 1, "cpu", "fp32")
    assert off.activations == n * layer + layer + outer  # every layer saved + one layer of backward
    on = memory_plan.plan_memory(
        run_config(**base, **{"trainer.activation_checkpointing": 1}), config, 1, "cpu", "fp32"
    )
    assert on.activations == n * 4 * h * tokens + 2 * layer + outer  # inputs + recompute + backward
    every3 = run_config(**base, **{"trainer.activation_checkpointing": 3})
    assert memory_plan.plan_memory(every3, config, 1, "cpu", "fp32").activations == (
        4 * layer + 2 * 4 * h * tokens + 2 * layer + outer
    )


def test_the_logits_chunk_is_the_loss_files_chunk():
    cfg = run_config(**{"peft.method": "lora", "data.seq_len": 4096})
    fp32 = memory_plan.plan_memory(cfg, released(), 1, "cuda", "fp32")
    assert fp32.logits_chunk == 256 * V * 4  # LOGITS_CHUNK_BYTES (256 MiB) caps it at 256 tokens
    bf16 = memory_plan.plan_memory(cfg, released(), 1, "cuda", "bf16")
    assert bf16.logits_chunk == 256 * V * (4 + 2)


def test_the_demo_run_is_estimated_small_but_not_absurd():
    cfg = cli.load_config("finetune", [])
    plan = memory_plan.plan_memory(cfg, memory_plan.run_model_config(cfg), 1, "cpu", "fp32")
    assert 0.5e9 < plan.total < 1.0e9  # measured: 0.69 GB peak RSS (docs/benchmarks.md)


def fake_strategy(world: int = 1):
    return SimpleNamespace(device=torch.device("cpu"), world_size=world, precision="fp32", is_main=True)


def test_a_run_that_cannot_fit_is_refused_naming_the_key(monkeypatch, caplog):
    cfg = cli.load_config("finetune", [])
    monkeypatch.setattr(memory_plan, "device_memory", lambda device, index=0: 100 * 2**20)
    with pytest.raises(ConfigError, match=r"trainer\.check_memory.*GB per rank.*100 MB|trainer\.check_memory") as err:
        memory_plan.check_run(cfg, fake_strategy())
    message = str(err.value)
    assert "0.10 GB" in message and "quantize_base=nf4" in message and "activation_checkpointing=1" in message
    assert "peft=lora," not in message  # the demo is a LoRA run already: only levers it has not pulled
    cfg.trainer.check_memory = False
    assert memory_plan.check_run(cfg, fake_strategy()).total > 100 * 2**20
    # With room to spare it passes and returns the plan it logged.
    cfg.trainer.check_memory = True
    monkeypatch.setattr(memory_plan, "device_memory", lambda device, index=0: 64 * 2**30)
    with caplog.at_level("INFO", logger="persimmon_train"):
        assert memory_plan.check_run(cfg, fake_strategy()).fits
    assert re.search(r"memory estimate per rank: 0\.\d\d GB of 68\.72 GB available", caplog.text)  # the run's log


def test_the_refusal_comes_before_data_and_model_and_leaves_no_output(monkeypatch, tmp_path):
    from persimmon_train.training import builders, run

    def built(*_, **__):
        raise AssertionError("the memory check must refuse before data or the model is built")

    monkeypatch.setattr(memory_plan, "device_memory", lambda device, index=0: 100 * 2**20)
    monkeypatch.setattr(builders, "build_data_bundle", built)
    monkeypatch.setattr(builders, "build_model", built)
    out = tmp_path / "run"
    cfg = cli.load_config("finetune", [f"output_dir={out}"])
    with pytest.raises(ConfigError, match=r"trainer\.check_memory"):
        run.train(cfg, "finetune")
    assert not out.exists()


def test_estimate_prints_the_8b_breakdown_from_config_json_alone(tmp_path, capsys, monkeypatch):
    from persimmon_train.recipes import estimate

    folder = tmp_path / "persimmon-8b"
    released().save_pretrained(folder)  # config.json only: no weights to read
    assert os.listdir(folder) == ["config.json"] or "model.safetensors" not in os.listdir(folder)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == V
    argv = [f"model.path={folder}", "peft=lora", "trainer.precision=bf16", "trainer.micro_batch_size=1"]
    estimate.run(
        [*argv, "trainer.activation_checkpointing=1", "data.seq_len=2048", "--device", "cuda", "--memory-gb", "80"]
    )
    out = capsys.readouterr().out
    assert "weights, bf16 frozen" in out and "18.79 GB" in out  # 2 bytes x 9.4B frozen matrix parameters
    assert "optimizer state" in out and "logits chunk" in out and "-> fits" in out
    # The released size by name, no model.path: the same numbers; 24 GB at 16K without checkpointing does not fit.
    with pytest.raises(SystemExit) as exited:
        estimate.run(["model=persimmon_8b", "peft=lora", "trainer.precision=bf16", "data.seq_len=16384",
                      "--device", "cuda", "--memory-gb", "24"])  # fmt: skip
    assert exited.value.code == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_the_command_refuses_a_model_no_machine_holds_in_one_line(tmp_path, monkeypatch):
    """A 200B-parameter random init: exit 2, one line naming the total and the key, nothing built or written."""
    from persimmon_train.training import builders
    from tests.helpers import assert_one_line_error, run_in_process

    def refuse(*args, **kwargs):  # in-process: building 200B parameters would take this test runner down
        raise AssertionError("the model was built before the refusal")

    monkeypatch.setattr(builders, "build_model", refuse)
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    huge = [
        "model.hidden_size=16384",
        "model.intermediate_size=65536",
        "model.num_hidden_layers=64",
        "model.num_attention_heads=128",
    ]
    ran = run_in_process("finetune", *huge, f"output_dir={out}")
    assert_one_line_error(ran, "trainer.check_memory", "per rank but MemAvailable is")
    assert not out.exists()
