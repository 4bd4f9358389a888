"""`persimmon-train finetune -m optim.lr=a,b`: one output folder per job, each with its own metrics,
and sweep_summary.csv with one row per job (its overrides, final eval loss)."""

from __future__ import annotations

import csv

import pytest
import yaml

from persimmon_train.recipes.sweep import expand
from tests.helpers import FAST, assert_one_line_error, read_metrics, recipe_env, run_in_process, run_recipe_here

SHORT = [
    *FAST,
    "trainer.max_steps=2",
    "trainer.eval_every_n_steps=2",
    "trainer.eval_at_start=false",
    "trainer.eval_max_batches=2",
    "checkpoint.every_n_steps=0",
    "export.enabled=false",
    "optim.warmup_steps=0",
    "optim.schedule=constant",
]


def test_expand_is_hydras_cartesian_product():
    jobs, swept = expand(["optim.lr=1e-4,3e-4", "peft=lora,none", "trainer.max_steps=2"])
    assert swept == ["optim.lr", "peft"]
    assert jobs == [
        [f"optim.lr={lr}", f"peft={peft}", "trainer.max_steps=2"]
        for lr in ("0.0001", "0.0003")
        for peft in ("lora", "none")
    ]


@pytest.mark.slow  # two real runs (in this process: -m runs its jobs one after another in one process)
def test_multirun_runs_each_job_into_its_own_folder_and_writes_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_recipe_here(
        "finetune", "-m", "optim.lr=1e-3,4e-3", *SHORT, f"output_dir={sweep}", env=recipe_env(tmp_path)
    )
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv", encoding="utf-8")))
    assert [r["overrides"] for r in rows] == ["optim.lr=0.001", "optim.lr=0.004"]
    for n, (row, lr) in enumerate(zip(rows, (1e-3, 4e-3))):
        folder = sweep / str(n)
        assert row["output_dir"] == str(folder) and row["status"] == "ok" and row["steps"] == "2"
        metrics = read_metrics(folder)
        lrs = [r["lr"] for r in metrics if "lr" in r]
        assert len(lrs) == 2 and lrs == pytest.approx([lr, lr])  # this job's own setting
        assert float(row["final_eval_loss"]) == pytest.approx([r["eval_loss"] for r in metrics if "eval_loss" in r][-1])
        assert yaml.safe_load(open(folder / "config.yaml"))["optim"]["lr"] == pytest.approx(lr)
    assert rows[0]["final_eval_loss"] != rows[1]["final_eval_loss"]
    assert "summary:" in proc.stdout


@pytest.mark.parametrize(
    "sweep_arg, message",
    [
        ("data.seq_len=64,4096", "error: data.seq_len: 4096 is above"),  # the config schema's checks
        ("data.eval_files=[],[/nowhere/eval.jsonl]", "error: data file not found: /nowhere/eval.jsonl"),  # preflight's
    ],
)
def test_multirun_checks_every_job_before_the_first_trains(sweep_arg, message, tmp_path, monkeypatch):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    sweep = tmp_path / "sweep"
    ran = run_in_process("finetune", "-m", *SHORT, sweep_arg, f"output_dir={sweep}")
    assert assert_one_line_error(ran).startswith(message)
    assert not sweep.exists()  # job 0 (valid) never started


def test_multirun_needs_a_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSIMMON_TRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_in_process("finetune", "-m", "trainer.max_steps=2"), "no sweep")


def test_summary_reports_each_jobs_final_eval_not_its_first(tmp_path, capsys):
    """In-process, with a stand-in for training that logs an eval at the start, mid-run and at the
    end (then a train line): the summary row is the last eval, with its task metrics."""
    import json
    import os

    from persimmon_train.cli import parse_invocation
    from persimmon_train.recipes.sweep import run_sweep

    def fake_train(cfg):
        lr = cfg.optim.lr
        rows = [
            {"step": 0, "eval_loss": 9.0, "eval_accuracy": 0.1},
            {"step": 1, "loss": 5.0, "lr": lr},
            {"step": 2, "eval_loss": 4.0, "eval_accuracy": 0.5},
            {"step": 4, "eval_loss": 1000 * lr, "eval_accuracy": 0.9},
            {"step": 5, "loss": 0.5, "lr": lr},
        ]
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    sweep = tmp_path / "sweep"
    inv = parse_invocation(["optim.lr=1e-3,4e-3", *SHORT, f"output_dir={sweep}"])
    run_sweep("finetune", fake_train, inv)
    rows = list(csv.DictReader(open(sweep / "sweep_summary.csv", encoding="utf-8")))
    assert [float(r["final_eval_loss"]) for r in rows] == pytest.approx([1.0, 4.0])
    assert [float(r["eval_accuracy"]) for r in rows] == [0.9, 0.9]
    assert [r["steps"] for r in rows] == ["5", "5"]


def test_a_sweep_over_folders_holding_runs_is_refused_before_job_0(tmp_path):
    """A rerun of a sweep: job 1's folder holds a run, so nothing trains (not even job 0)."""
    from persimmon_train.cli import Invocation
    from persimmon_train.errors import ConfigError
    from persimmon_train.recipes.sweep import run_sweep

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    sweep = tmp_path / "sweep"
    (sweep / "1").mkdir(parents=True)
    (sweep / "1" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    overrides = ["optim.lr=1e-3,4e-3", f"data.train_files=[{train}]", "data.eval_files=[]", f"output_dir={sweep}"]
    ran = []
    with pytest.raises(ConfigError, match=f"output_dir: {sweep / '1'} already holds a run"):
        run_sweep("finetune", ran.append, Invocation(overrides=overrides))
    assert ran == [] and sorted(p.name for p in sweep.iterdir()) == ["1"]
