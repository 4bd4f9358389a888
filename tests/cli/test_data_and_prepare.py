"""A user's data replaces the demo's; `persimmon-train prepare` fills the cache the run then reads."""

from __future__ import annotations

import json
import re

import pytest

from persimmon_train import cli
from persimmon_train.data import demo_assets
from tests.helpers import FAST, persimmon_train, recipe_env, run_recipe_here


def _text_rows(path, n=60):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i} about the garden and the river number {i % 7}"}) + "\n")
    return str(path)


def test_own_train_files_drop_the_demo_eval_files():
    demo = demo_assets()
    default = cli.load_config("finetune", [])
    assert default.data.eval_files == [str(f) for f in demo.eval_files]
    mine = cli.load_config("finetune", ["data.format=text", "data.train_files=[mine.jsonl]", "data.eval_fraction=0.01"])
    assert mine.data.train_files == ["mine.jsonl"] and mine.data.eval_files == []
    both = cli.load_config("finetune", ["data.train_files=[t.jsonl]", "data.eval_files=[e.jsonl]"])
    assert both.data.eval_files == ["e.jsonl"]


@pytest.mark.parametrize("value", ["null", "[]"])
def test_eval_files_null_or_empty_mean_none(value):
    cfg = cli.load_config("finetune", [f"data.eval_files={value}"])
    assert cfg.data.eval_files == [] and cfg.data.train_files  # the demo's train files stay
    assert cli.load_config("finetune", [f"data.train_files={value}"]).data.train_files == []


@pytest.mark.slow
def test_issue_command_trains_on_the_users_text_with_an_eval_fraction(tmp_path):
    """The issue's command stopped on "demo/eval.jsonl row 1, field 'text': is missing". It runs as
    typed (`persimmon-train prepare`, a child: `python -m persimmon_train.recipes`)."""
    env = recipe_env(tmp_path)
    mine = _text_rows(tmp_path / "mine.jsonl")
    proc = persimmon_train(
        "prepare",
        "data.format=text",
        f"data.train_files=[{mine}]",
        "data.eval_fraction=0.1",
        "data.seq_len=64",
        env=env,
    )
    assert "demo" not in proc.stdout
    assert re.search(r"eval: \d+ documents", proc.stdout), proc.stdout  # held out of mine.jsonl
    none = run_recipe_here("prepare", "data.eval_files=null", "data.seq_len=64", env=env)
    assert "train:" in none.stdout and "eval:" not in none.stdout


def test_prepare_fills_the_cache_that_the_run_reads(tmp_path):
    """Both commands in this process (the console command's main): the cache is what is checked."""
    env = recipe_env(tmp_path)
    common = [
        *FAST,
        "trainer.max_steps=1",
        "trainer.eval_every_n_steps=0",
        "trainer.eval_at_start=false",
        "checkpoint.every_n_steps=0",
        "export.enabled=false",
    ]
    proc = run_recipe_here("prepare", *common, env=env)
    match = re.search(r"prepared data \(chat, seq_len 64\) in (\S+)", proc.stdout)
    assert match, proc.stdout
    folder = match.group(1)
    meta = json.loads(open(f"{folder}/meta.json").read())
    train = meta["stats"]["train"]
    assert f"train: {train['documents']} documents -> {train['rows']} rows of 64 tokens" in proc.stdout
    assert f"packing efficiency {100 * train['efficiency']:.2f}%" in proc.stdout

    out = tmp_path / "run"
    run = run_recipe_here("finetune", *common, f"output_dir={out}", env=env)
    assert f"using cached preparation {folder}" in run.stderr, run.stderr[-3000:]
    assert "tokenizing" not in run.stderr
