"""classify.py and tag.py really run on tiny models and toy tasks they can learn."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import FAST, eval_losses, read_metrics, recipe_env, run_recipe_here

pytestmark = pytest.mark.slow  # real recipe runs (in this process: the runs' outputs are checked)


def _final_eval(out) -> dict:
    return [r for r in read_metrics(out) if "eval_loss" in r][-1]


def test_classify_lora_learns_sentiment(tmp_path, classification_files):
    train, evals = classification_files
    out = tmp_path / "cls"
    run_recipe_here(
        "classify",
        *FAST,
        "peft=lora",
        "trainer.max_steps=60",
        "trainer.eval_every_n_steps=0",
        "optim.lr=3e-3",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{evals}]",
        f"output_dir={out}",
        env=recipe_env(tmp_path),
    )
    losses = eval_losses(out)
    assert losses[-1] < losses[0] - 0.2, losses
    final = _final_eval(out)
    assert final["eval_accuracy"] > 0.8 and "eval_macro_f1" in final, final

    # final/ is a classification model folder with the label names, loadable by transformers.
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["PersimmonForSequenceClassification"]
    assert set(config["id2label"].values()) == {"neg", "pos"}
    transformers = pytest.importorskip("transformers")
    from persimmon_train.model import PersimmonForSequenceClassification

    ours = PersimmonForSequenceClassification.from_pretrained(out / "final").eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.randint(3, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, attention_mask=mask).logits,
            theirs(input_ids=ids, attention_mask=mask).logits,
            atol=1e-5,
            rtol=1e-4,
        )


def test_tag_full_learns_entities(tmp_path, tagging_files):
    train, evals = tagging_files
    out = tmp_path / "tag"
    run_recipe_here(
        "tag",
        *FAST,
        "peft=none",
        "trainer.max_steps=40",
        "trainer.eval_every_n_steps=20",
        "optim.lr=1e-2",
        f"data.train_files=[{train}]",
        f"data.eval_files=[{evals}]",
        f"output_dir={out}",
        env=recipe_env(tmp_path),
    )
    losses = eval_losses(out)
    assert losses[-1] < losses[0] - 0.5, losses
    final = _final_eval(out)
    assert final["entity_f1"] > 0.6, final
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["architectures"] == ["PersimmonForTokenClassification"]
    assert {"B-ANI", "B-LOC", "I-LOC", "O"} <= set(config["id2label"].values())
