"""The loop: global-batch loss normalisation, NaN/Inf skipping, clipping, checkpoints, eval batches."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from persimmon_train.data.loader import PackedLoader
from persimmon_train.model import PersimmonForSequenceClassification
from persimmon_train.storage import checkpoints as store
from persimmon_train.training import checkpointing
from persimmon_train.training.config import OptimConfig
from persimmon_train.training.optim import build_scheduler, lr_multiplier
from persimmon_train.training.trainer import TrainingDivergedError, count_items
from tests.helpers import VOCAB, causal_rows, make_trainer, tiny_config, tiny_model


def _train(tmp_path, micro, accum, steps=3):
    model = tiny_model()
    trainer = make_trainer(
        model, causal_rows(8 * steps), micro=micro, accum=accum, steps=steps, output_dir=tmp_path, sgd=True, lr=0.5
    )
    trainer.fit()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, trainer


def test_update_does_not_depend_on_micro_batch_split(tmp_path):
    """8 rows per step as 1x8, 2x4 or 8x1 micro-batches: the same weights (the loss is normalised by
    the target tokens of the whole step, not averaged per micro-batch)."""
    ref, _ = _train(tmp_path, micro=8, accum=1)
    for micro, accum in ((4, 2), (1, 8)):
        got, _ = _train(tmp_path, micro=micro, accum=accum)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)
    assert not torch.equal(ref["lm_head.weight"], tiny_model().state_dict()["lm_head.weight"])  # it trained


def test_rows_have_uneven_target_counts():
    """Guard for the test above: with equal counts a per-micro-batch mean would pass it too."""
    rows = causal_rows(8)
    counts = [count_items({k: v[None] for k, v in r.items()}, "causal_lm") for r in rows]
    assert len(set(counts)) > 1


def test_count_items_is_what_each_loss_averages_over():
    labels = torch.tensor([[5, 6, -100, 7]])
    assert count_items({"labels": labels}, "causal_lm") == 2  # shifted: position 0 is never a target
    assert count_items({"labels": labels}, "token_classification") == 3
    assert count_items({"labels": torch.tensor([1, -100, 0])}, "sequence_classification") == 2  # filler row
    assert count_items({"labels": torch.rand(3, 2)}, "sequence_classification") == 3  # multi-label rows


def _classification_rows(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": torch.randint(1, VOCAB, (10,), generator=g), "labels": torch.tensor(i % 3)} for i in range(n)]
    rows[1]["labels"] = torch.tensor(-100)  # an eval-filler-like row: it must not count
    return rows


def test_classification_update_does_not_depend_on_micro_batch_split(tmp_path):
    """The head's per-micro-batch mean is re-weighted to the global row count."""

    def train(micro, accum):
        torch.manual_seed(0)
        model = PersimmonForSequenceClassification.from_config(tiny_config(num_labels=3))
        trainer = make_trainer(
            model, _classification_rows(8), micro=micro, accum=accum, steps=1, output_dir=tmp_path, sgd=True, lr=0.5
        )
        trainer.task = "sequence_classification"
        trainer.fit()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    ref, got = train(8, 1), train(2, 4)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_reported_loss_is_the_whole_step_and_gradients_are_cleared(tmp_path):
    model = tiny_model()
    rows = causal_rows(8)
    trainer = make_trainer(model, rows, micro=2, accum=4, steps=1, output_dir=tmp_path, sgd=True, lr=0.0)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with torch.no_grad():
        whole = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss  # mean over the 8 rows
    it = iter(trainer.train_loader)
    result = trainer.train_step([next(it) for _ in range(4)])
    assert result["loss"] == pytest.approx(float(whole), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the next step starts from zero


def test_logged_lr_follows_the_configured_schedule(tmp_path):
    model = tiny_model()
    trainer = make_trainer(model, causal_rows(8), micro=2, accum=1, steps=6, output_dir=tmp_path, lr=0.1)
    cfg = OptimConfig(lr=0.1, warmup_steps=2, schedule="linear", min_lr_ratio=0.2)
    trainer.scheduler = build_scheduler(trainer.optimizer, cfg, max_steps=6)
    trainer.fit()
    logged = [row["lr"] for row in trainer.metrics_file.rows if "lr" in row]
    want = [0.1 * lr_multiplier(s, max_steps=6, warmup_steps=2, schedule="linear", min_lr_ratio=0.2) for s in range(6)]
    assert logged == pytest.approx(want)
    assert len(set(logged)) > 3


def test_a_good_step_resets_the_nonfinite_count(tmp_path):
    """NaN, good, NaN, NaN with max_nonfinite_steps=2: stops at step 4, not at step 3."""
    model = tiny_model()
    trainer = make_trainer(model, causal_rows(16), micro=2, accum=1, steps=10, output_dir=tmp_path, max_nonfinite=2)
    original = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] != 2:
            out.loss = out.loss * float("nan")
        return out

    model.forward = forward
    with pytest.raises(TrainingDivergedError, match="2 steps in a row"):
        trainer.fit()
    assert trainer.state.step == 4 and trainer.state.skipped_steps == 3


def test_nonfinite_loss_skips_step_then_stops(tmp_path):
    model = tiny_model()
    trainer = make_trainer(
        model, causal_rows(16), micro=2, accum=1, steps=10, output_dir=tmp_path, every=1, max_nonfinite=3
    )
    original = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        out = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 2:  # two good steps, then NaN forever
            out.loss = out.loss * float("nan")
        return out

    model.forward = forward
    with pytest.raises(TrainingDivergedError, match="3 steps in a row.*step_2"):
        trainer.fit()
    assert trainer.state.step == 5
    # The last good checkpoint is kept and no checkpoint was written from the bad steps.
    assert [s for s, _ in store.list_step_dirs(str(tmp_path))] == [1, 2]
    saved = checkpointing.load_checkpoint(os.path.join(tmp_path, "checkpoints", "step_2"), strategy=trainer.strategy)
    assert saved["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("clip", [1e-3, None])
def test_gradient_clipping_bounds_the_update_and_reports_the_unclipped_norm(tmp_path, clip):
    """Plain SGD with lr=1 moves the weights by exactly the (clipped) gradient: the update's norm is
    max_norm when clipping is on, the full gradient norm when it is off."""
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(
        model, causal_rows(4), micro=4, accum=1, steps=1, output_dir=tmp_path, clip=clip, sgd=True, lr=1.0
    )
    batch = next(iter(trainer.train_loader))
    result = trainer.train_step([batch])
    update = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.detach() - b) for p, b in zip(model.parameters(), before)])
    )
    assert result["grad_norm"] > 1e-2  # the reported norm is the one before clipping
    expected = clip if clip is not None else result["grad_norm"]
    assert float(update) == pytest.approx(expected, rel=1e-3)


def test_checkpoint_keep_last_and_atomic_names(tmp_path):
    model = tiny_model()
    trainer = make_trainer(model, causal_rows(16), micro=2, accum=1, steps=6, output_dir=tmp_path, every=2)
    trainer.cfg.checkpoint.keep_last = 2
    os.makedirs(tmp_path / "checkpoints" / "step_99.tmp")  # a crash mid-write leaves this behind
    trainer.fit()
    assert [s for s, _ in store.list_step_dirs(str(tmp_path))] == [4, 6]
    assert store.choose_resume("latest", str(tmp_path))[0].endswith("step_6")
    store.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_4", "step_6"]
    files = sorted(os.listdir(tmp_path / "checkpoints" / "step_6"))
    assert files == ["manifest.json", "model.safetensors", "optimizer.pt", "trainer_state.pt"]
    manifest = json.loads((tmp_path / "checkpoints" / "step_6" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["model.safetensors", "optimizer.pt", "trainer_state.pt"]


def test_in_process_resume_matches(tmp_path):
    """Resume from step 2 of 4 (dropout on) equals the uninterrupted run exactly."""

    def run(out, steps, resume=None):
        model = tiny_model(hidden_dropout=0.2)
        trainer = make_trainer(model, causal_rows(32), micro=2, accum=2, steps=steps, output_dir=out, every=2)
        if resume:
            trainer.resume_from(resume)
        trainer.fit()
        return model.state_dict()

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    torch.manual_seed(1234)  # a resumed process starts from a different RNG state
    resumed = run(tmp_path / "c", 4, resume=str(tmp_path / "b" / "checkpoints" / "step_2"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def _eval_loader(rows: list[dict], micro: int) -> PackedLoader:
    ids = np.stack([r["input_ids"].numpy() for r in rows])
    arrays = {
        "input_ids": ids,
        "labels": np.stack([r["labels"].numpy() for r in rows]),
        "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy(),
    }
    return PackedLoader(arrays, micro, seed=0, train=False)


def test_every_eval_pass_reads_the_same_first_eval_max_batches(tmp_path):
    """A pass cut short by eval_max_batches leaves the loader mid-way: each pass starts again from
    the first batch and stops after eval_max_batches (all batches with null)."""
    model = tiny_model()
    trainer = make_trainer(model, causal_rows(8), micro=2, accum=1, steps=1, output_dir=tmp_path)
    trainer.eval_loader = _eval_loader(causal_rows(10, seed=1), micro=2)
    everything = list(_eval_loader(causal_rows(10, seed=1), micro=2))
    assert len(everything) == 5
    for limit in (2, 2, None, 3, 2):
        trainer.cfg.trainer.eval_max_batches = limit
        got = list(trainer.eval_batches())
        want = everything[:limit]
        assert len(got) == len(want), limit
        for batch, expected in zip(got, want):
            assert batch.keys() == expected.keys()
            assert all(torch.equal(batch[k], expected[k]) for k in batch), limit
    # the eval loss is the hand-computed mean over the first 2 batches' target tokens, pass after pass
    trainer.cfg.trainer.eval_max_batches = 2
    with torch.no_grad():
        logits = torch.cat([model(b["input_ids"], position_ids=b["position_ids"]).logits for b in everything[:2]])
    labels = torch.cat([b["labels"] for b in everything[:2]])
    hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).double(), labels[:, 1:].flatten())
    assert [trainer.evaluate()["eval_loss"] for _ in range(2)] == pytest.approx([float(hand)] * 2, rel=1e-5)
