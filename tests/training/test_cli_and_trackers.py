"""The entry-point wrapper (in-process) and tracker robustness."""

from __future__ import annotations

import json
import os

import pytest

from persimmon_train import cli
from persimmon_train.errors import ConfigError
from persimmon_train.training import trackers


def test_strip_local_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert cli.strip_local_rank(["a=1", "--local_rank=3", "b=2"]) == ["a=1", "b=2"]
    assert os.environ["LOCAL_RANK"] == "3"
    assert cli.strip_local_rank(["--local_rank", "1", "c=3"]) == ["c=3"]
    assert os.environ["LOCAL_RANK"] == "1"


@pytest.mark.parametrize("job", ["finetune", "classify", "tag", "evaluate"])
def test_every_job_config_composes(job):
    cfg = cli.load_config(job, ["data.train_files=[x.jsonl]"])
    assert cfg.task in ("causal_lm", "sequence_classification", "token_classification")
    assert cfg.data.train_files == ["x.jsonl"]


@pytest.mark.parametrize("experiment, job", [("lora_chat_16k", "finetune"), ("full_chat_16k", "finetune"),
                                             ("classify", "classify"), ("tag", "tag")])
def test_experiments_compose(experiment, job):
    cfg = cli.load_config(job, [f"experiment={experiment}", "model.path=/weights/persimmon-8b",
                                "data.train_files=[x.jsonl]"])
    assert cfg.model.hidden_size == 4096 and cfg.trainer.activation_checkpointing == 1


def test_run_recipe_prints_one_line_and_exits_2(capsys):
    def main(cfg):
        raise ConfigError("data.format: nope")

    with pytest.raises(SystemExit) as exit_info:
        cli.run_recipe("finetune", main, argv=["trainer.max_steps=1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: data.format: nope"


def test_defaults_embedded_run():
    cfg = cli.load_config("finetune", [])
    assert (cfg.model.name, cfg.peft.method, cfg.data.format, cfg.strategy.name) == ("tiny", "lora", "chat", "single")
    assert cfg.data.train_files and os.path.isfile(cfg.data.train_files[0])


def test_wandb_failure_never_stops_training(monkeypatch, tmp_path, caplog):
    import wandb

    from persimmon_train.training.config import TrackerConfig

    def broken_init(**kwargs):
        raise RuntimeError("network down")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = trackers.build_tracker(TrackerConfig(backend="wandb", mode="offline"), config={},
                                     output_dir=str(tmp_path), run_name="x", run_id=None, is_main=True)
    tracker.log({"loss": 1.0}, step=1)  # no exception
    tracker.finish()
    assert "network down" in caplog.text


def test_metrics_jsonl_is_trimmed_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = trackers.JsonlMetrics(str(path))
    for step in range(1, 6):
        writer.log({"loss": float(step), "lr": 0.1}, step)
    trackers.JsonlMetrics(str(path), resume_step=3).log({"loss": 9.0, "lr": 0.1}, 4)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 9.0


def test_api_key_is_redacted(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "sekrit-key-123456")
    assert trackers.redact_secrets("key=sekrit-key-123456!") == "key=***!"
