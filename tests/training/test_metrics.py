"""Eval metrics against hand computations, and the trainer's eval gathered over 2 ranks.

The 2-rank test runs the real `Trainer.evaluate` in two gloo processes, each on half of the eval
rows, with the real `DistributedStrategy` collectives: every rank must report the metrics of ALL
rows (as one process evaluating everything does). Without the gather, rank 0 would report the
metrics of its own half, which differ (checked).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from persimmon_train.model import PersimmonConfig, PersimmonForSequenceClassification
from persimmon_train.parallel import SingleDeviceStrategy
from persimmon_train.parallel.distributed import DistributedStrategy
from persimmon_train.training.config import RunConfig
from persimmon_train.training.metrics import (
    attention_work,
    classification_metrics,
    mean_squared_error,
    multi_label_macro_f1,
    training_flops,
)
from persimmon_train.training.trackers import NullTracker
from persimmon_train.training.trainer import Trainer
from tests.helpers import VOCAB, tiny_config

# ------------------------------------------------------------------ hand computations


def test_training_flops_count_attention_per_document_by_hand():
    """MFU's FLOPs: weights 6N (full) / 4N (LoRA) per token, attention 6 * hidden * layers * sum(L^2)
    over the documents the batch's position_ids (or attention_mask) mark, never across them."""
    config = PersimmonConfig(
        vocab_size=100, hidden_size=16, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    n = 2 * (4 * 16 * 16 + 2 * 16 * 64) + 100 * 16  # qkv + dense + MLP per layer, LM head: 7744
    packed = {
        "input_ids": torch.zeros(1, 10, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]]),
    }
    assert attention_work(packed) == 3 * 3 + 2 * 2 + 5 * 5  # documents of 3, 2 and 5 tokens: 38, not 10 * 10
    padded = {
        "input_ids": torch.zeros(2, 4, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
    }
    assert attention_work(padded) == 3 * 3 + 2 * 2  # padding does not count
    assert attention_work({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == 2 * 5 * 5
    attention = 6 * 16 * 2 * 38
    assert training_flops(config, 10, 38, full_finetune=True) == 6 * n * 10 + attention == 471936
    assert training_flops(config, 10, 38, full_finetune=False) == 4 * n * 10 + attention == 317056
    classifier = config.replace(num_labels=3)
    assert (
        training_flops(classifier, 10, 38, True, task="sequence_classification") == 6 * (n - 1600 + 48) * 10 + attention
    )


GOLD = [[1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]


def test_multi_label_macro_f1_is_the_mean_positive_class_f1():
    pred = [[1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 1, 0]]
    # label 0: tp=2 fp=1 fn=0 -> p=2/3 r=1 f=0.8; label 1: tp=0 -> 0; label 2: tp=1 fp=0 fn=1 -> p=1 r=.5 f=2/3
    assert multi_label_macro_f1(pred, GOLD) == pytest.approx((0.8 + 0.0 + 2 / 3) / 3)
    metrics = classification_metrics(pred, GOLD)
    assert metrics == {"eval_accuracy": 0.0, "eval_macro_f1": pytest.approx((0.8 + 2 / 3) / 3)}
    assert classification_metrics(GOLD, GOLD) == {"eval_accuracy": 1.0, "eval_macro_f1": 1.0}


def test_never_predicting_a_positive_scores_zero():
    # Averaging the F1 of the 0 class in as well gave this model 0.714 on the example.
    nothing = [[0, 0, 0]] * len(GOLD)
    metrics = classification_metrics(nothing, GOLD)
    assert metrics["eval_macro_f1"] == 0.0
    assert metrics["eval_accuracy"] == 0.25  # the all-zero row is an exact match


def test_regression_mse_and_single_label_metrics():
    assert mean_squared_error([1.0, 2.0, -1.0], [0.5, 2.0, 1.0]) == pytest.approx((0.25 + 0.0 + 4.0) / 3)
    assert classification_metrics([1.0, 2.0, -1.0], [0.5, 2.0, 1.0]) == {"eval_mse": pytest.approx(4.25 / 3)}
    # class 0: p=1 r=.5 f=2/3; class 1: p=.5 r=1 f=2/3; class 2: f=1
    assert classification_metrics([0, 1, 1, 2], [0, 1, 0, 2]) == {
        "eval_accuracy": 0.75,
        "eval_macro_f1": pytest.approx((2 / 3 + 2 / 3 + 1) / 3),
    }


# ------------------------------------------------------------------ the trainer's eval on 2 ranks

PROBLEMS = {"regression": 1, "single_label_classification": 3, "multi_label_classification": 3}
ROWS, SEQ, MICRO = 16, 12, 4


def _eval_rows(problem: str) -> list[dict]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, VOCAB, (ROWS, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, SEQ - 4 :] = 0  # some right padding: pooling at the last real token
    ids = ids * mask
    if problem == "regression":
        labels = torch.randn(ROWS, generator=g)
    elif problem == "multi_label_classification":
        labels = (torch.rand(ROWS, 3, generator=g) > 0.5).float()
    else:
        labels = torch.randint(0, 3, (ROWS,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(ROWS)]


def _batches(rows: list[dict]) -> list[dict]:
    return [{k: torch.stack([r[k] for r in rows[i : i + MICRO]]) for k in rows[0]} for i in range(0, len(rows), MICRO)]


class _Sink:
    def log(self, metrics, step):
        pass


def _evaluate(strategy, problem: str, rows: list[dict]) -> dict:
    torch.manual_seed(0)  # the same random model on every rank and in the reference
    model = PersimmonForSequenceClassification.from_config(
        tiny_config(num_labels=PROBLEMS[problem], problem_type=problem)
    )
    model, _ = strategy.wrap(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    cfg = RunConfig()
    cfg.task = "sequence_classification"
    cfg.trainer.precision = "fp32"
    cfg.trainer.eval_max_batches = None
    trainer = Trainer(
        cfg,
        strategy=strategy,
        model=model,
        optimizer=None,
        scheduler=None,
        train_loader=None,
        eval_loader=_batches(rows),
        tracker=NullTracker(),
        metrics_file=_Sink(),
        output_dir="",
        id2label=None,
    )
    return trainer.evaluate()


class _GlooStrategy(DistributedStrategy, SingleDeviceStrategy):
    """`single`'s placement with the real DistributedStrategy collectives over a gloo group."""

    def __init__(self):
        SingleDeviceStrategy.__init__(self, precision="fp32", device="cpu")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        strategy = _GlooStrategy()
        results = {}
        for problem in PROBLEMS:
            rows = _eval_rows(problem)
            half = rows[: ROWS // 2] if rank == 0 else rows[ROWS // 2 :]
            results[problem] = _evaluate(strategy, problem, half)
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_eval_metrics_are_gathered_over_ranks(tmp_path):
    # fork: the children skip re-importing torch (seconds each); they only run CPU gloo work.
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = SingleDeviceStrategy(precision="fp32", device="cpu")
    for problem in PROBLEMS:
        rows = _eval_rows(problem)
        everything = _evaluate(single, problem, rows)
        first_half = _evaluate(single, problem, rows[: ROWS // 2])
        task_keys = [k for k in everything if k != "eval_loss"]
        # Guard: the halves alone give other numbers, so an ungathered eval cannot pass.
        assert any(not math.isclose(first_half[k], everything[k]) for k in task_keys), (problem, first_half)
        for rank in ranks:
            assert set(rank[problem]) == set(everything), problem
            for key, value in everything.items():
                assert rank[problem][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (problem, key)
