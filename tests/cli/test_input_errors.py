"""Inputs a run refuses rather than ending in a traceback or ignoring them: each is one line
naming the key, exit code 2, before any compute, with nothing written to output_dir.

In-process: `cli.run_recipe` is the recipes' entry (the same code `python recipes/finetune.py`
runs), called with an argv list; only the torchrun test launches processes.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from persimmon_train import cli
from persimmon_train.errors import ConfigError
from persimmon_train.recipes.train import train
from tests.helpers import FAST

FINETUNE = functools.partial(train, job="finetune")  # what `persimmon-train finetune` runs


def _run(argv, capsys, main=None):
    """run_recipe('finetune', ...) in-process: (exit code, stderr lines, whether main ran)."""
    called = []

    def refuse(cfg):
        called.append(cfg)

    with pytest.raises(SystemExit) as exit_info:
        cli.run_recipe("finetune", main or refuse, argv)
    err = capsys.readouterr().err
    return exit_info.value.code, err.strip().splitlines(), bool(called)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["trainer.num_threads=-1"], "trainer.num_threads"),
        (["trainer.num_threads=0"], "trainer.num_threads"),
        (["optim.grad_clip=-1"], "optim.grad_clip"),
        (["strategy.device=tpu"], "strategy.device"),
        (["strategy.device=cuda:x"], "strategy.device"),
        (["peft=none", "peft.r=8"], "peft.r"),
        (["peft.method=none", "peft.alpha=8"], "peft.alpha"),
        (["peft=none", "+peft.use_rslora=true"], "peft.use_rslora"),
        (["hydra.run.dir=/tmp/elsewhere"], "hydra.run.dir"),
        (["hydra.sweep.dir=/tmp/elsewhere"], "hydra.sweep.dir"),
        (["hydra.job.chdir=true"], "hydra.job.chdir"),
        (["hydra.verbose=true"], "hydra.verbose"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_the_recipe(overrides, key, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    out = tmp_path / "out"
    code, lines, ran = _run([*overrides, f"output_dir={out}"], capsys)
    assert code == cli.EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], lines
    assert not ran and not out.exists()
    if key.startswith("hydra.") and key.endswith(".dir"):
        assert "output_dir=" in lines[0]


@pytest.mark.parametrize("overrides", [[], ["optim.grad_clip=0"], ["optim.grad_clip=null"], ["trainer.num_threads=1"]])
def test_good_inputs_still_load(overrides):
    cfg = cli.load_config("finetune", overrides)
    assert cfg.trainer.max_steps >= 1


def test_lora_keys_are_fine_with_lora_and_in_configs():
    """Only a LoRA key typed on the command line with LoRA off is refused: peft=lora peft.r=8 runs,
    and so does peft=none over a config whose peft group carries LoRA defaults."""
    assert cli.load_config("finetune", ["peft=lora", "peft.r=8"]).peft.r == 8
    assert cli.load_config("finetune", ["peft=none"]).peft.method == "none"


def _train_argv(out, *extra):
    return [*FAST, "trainer.max_steps=1", "tracker=none", f"output_dir={out}", *extra]


def _no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("device", ["cuda:0", "cuda"])
def test_cuda_device_without_a_gpu(device, capsys, tmp_path, monkeypatch, no_compute):
    _no_gpu(monkeypatch)
    out = tmp_path / "out"
    code, lines, _ = _run(_train_argv(out, f"strategy.device={device}"), capsys, main=FINETUNE)
    assert code == cli.EXIT_USER_ERROR
    assert len(lines) == 1 and lines[0].startswith("error: strategy.device:") and "no CUDA GPU" in lines[0], lines
    assert not out.exists()


def test_cuda_device_index_beyond_the_gpus():
    from persimmon_train.parallel.base import available_device

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU path")
    with pytest.raises(ConfigError, match=r"strategy\.device: 'cuda:0' but this machine has no CUDA GPU"):
        available_device("cuda:0")
    assert available_device("cpu") == torch.device("cpu")


def test_cuda_device_index_beyond_the_gpu_count(monkeypatch):
    from persimmon_train.parallel.base import available_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert available_device("cuda", 1) == torch.device("cuda", 1)
    assert available_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"strategy\.device: cuda:2 but this machine has 2 CUDA GPU"):
        available_device("cuda:2")


@pytest.fixture
def no_compute(monkeypatch):
    """The model is never built: the mistakes must stop the run before it."""
    import persimmon_train.training.builders as builders

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built before the input error was reported")

    monkeypatch.setattr(builders, "build_model", refuse)


def test_cache_dir_that_cannot_be_created(capsys, tmp_path, monkeypatch, no_compute):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    code, lines, _ = _run(_train_argv(out, f"data.cache_dir={blocker}/cache"), capsys, main=FINETUNE)
    assert code == cli.EXIT_USER_ERROR
    assert not any("Traceback" in line for line in lines), lines  # the rest is the run's INFO log
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: data.cache_dir:") and str(blocker) in errors[0], lines
    assert not out.exists()


# -------------------------------------------------------------------- one line per launch


def test_other_ranks_stay_silent_on_config_errors_and_tell_torchrun(capsys, tmp_path, monkeypatch):
    """Rank 1 of a launch: the config error every rank hits is printed by rank 0 only; torchrun's
    error file gets the line (its report's "Root Cause" shows it instead of a traceback)."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    code, lines, _ = _run(["trainer.num_threads=-1"], capsys)
    assert code == cli.EXIT_USER_ERROR and lines == []
    record = json.loads(error_file.read_text())["message"]
    assert record["message"].startswith("error: trainer.num_threads:")
    assert record["extraInfo"]["py_callstack"] == record["message"]
    monkeypatch.setenv("RANK", "0")
    code, lines, _ = _run(["trainer.num_threads=-1"], capsys)
    assert len(lines) == 1 and lines[0].startswith("error: trainer.num_threads:")


def test_rank_specific_error_without_torchrun_is_printed(capsys, monkeypatch):
    """An error inside the recipe (it may be this rank's alone) with no torchrun to report it: printed."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)

    def fails(cfg):
        raise ConfigError("data.cache_dir: cannot create '/x' on this node")

    code, lines, _ = _run([], capsys, main=fails)
    assert code == cli.EXIT_USER_ERROR and lines == ["error: data.cache_dir: cannot create '/x' on this node"]
