"""Hand-made examples through build_data: chat loss masks, token-classification alignment, labels."""

import pytest
import torch

from persimmon_train.data import DataConfig, build_data

IGNORE = -100


def _one_batch(cfg, tok, mbs=1):
    b = build_data(cfg, tok, micro_batch_size=mbs, seed=0)
    return b, next(iter(b.train_loader))


def test_text_labels_every_token_but_the_first(tok, write_jsonl, cache):
    f = write_jsonl("t.jsonl", [{"text": "hello there"}])
    _, batch = _one_batch(DataConfig(train_files=[f], seq_len=32, cache_dir=cache), tok)
    ids = tok.encode("hello there", eos=True)
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    assert batch["labels"][0, : len(ids)].tolist() == [IGNORE] + ids[1:]
    assert (batch["labels"][0, len(ids) :] == IGNORE).all()


def test_chat_loss_only_on_response_and_eos(tok, write_jsonl, cache):
    f = write_jsonl("c.jsonl", [{"prompt": "What is 2 plus 3?", "response": "5."}])
    _, batch = _one_batch(DataConfig(train_files=[f], format="chat", seq_len=64, cache_dir=cache), tok)
    p = tok.encode("human: What is 2 plus 3?\n\nadept:")
    r = tok.encode("5.") + [tok.eos_id]
    n = len(p) + len(r)
    assert batch["input_ids"][0, :n].tolist() == p + r
    assert batch["labels"][0, :n].tolist() == [IGNORE] * len(p) + r
    assert (batch["labels"][0, n:] == IGNORE).all()


def test_chat_messages_multi_turn_with_system(tok, write_jsonl, cache):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
    ]
    f = write_jsonl("m.jsonl", [{"messages": msgs}])
    _, batch = _one_batch(DataConfig(train_files=[f], format="chat", seq_len=128, cache_dir=cache), tok)
    p1 = tok.encode("Be brief.\n\nhuman: Hi\n\nadept:")
    r1 = tok.encode("Hello.") + [tok.eos_id]
    p2 = tok.encode("human: 2+2?\n\nadept:")
    r2 = tok.encode("4.") + [tok.eos_id]
    ids = p1 + r1 + p2 + r2
    assert batch["input_ids"][0, : len(ids)].tolist() == ids
    want = [IGNORE] * len(p1) + r1 + [IGNORE] * len(p2) + r2
    assert batch["labels"][0, : len(ids)].tolist() == want


def test_token_classification_tag_on_first_subtoken(tok, write_jsonl, cache):
    words = ["Paris", "is", "in", "Francelandia"]
    tags = ["B-LOC", "O", "O", "B-LOC"]
    f = write_jsonl("tc.jsonl", [{"tokens": words, "tags": tags}, {"tokens": ["x"], "tags": ["I-LOC"]}])
    cfg = DataConfig(train_files=[f], format="token_classification", seq_len=64, cache_dir=cache)
    b = build_data(cfg, tok, micro_batch_size=2, seed=0)
    assert b.id2label == {0: "B-LOC", 1: "I-LOC", 2: "O"}
    batch = next(iter(b.train_loader))
    row = [i for i in range(2) if batch["attention_mask"][i].sum() > 3][0]
    pieces = [tok.encode(w) for w in words]
    assert len(pieces[3]) > 1  # a word split into several sub-tokens
    ids, labels = [], []
    for p, t in zip(pieces, tags):
        ids += p
        labels += [b.label2id[t]] + [IGNORE] * (len(p) - 1)
    n = len(ids)
    assert batch["input_ids"][row, :n].tolist() == ids
    assert batch["labels"][row, :n].tolist() == labels
    assert (batch["labels"][row, n:] == IGNORE).all() and batch["attention_mask"][row, :n].all()
    assert batch["attention_mask"][row, n:].sum() == 0


@pytest.mark.parametrize(
    "labels,problem,num",
    [
        (["neg", "pos", "neg", "pos"], "single_label_classification", 2),
        ([0, 2, 1, 2], "single_label_classification", 3),
        ([["a", "b"], ["b"], [], ["c"]], "multi_label_classification", 3),
        ([0.5, 1.5, 2.0, -1.0], "regression", 1),
    ],
)
def test_classification_label_kinds(tok, write_jsonl, cache, labels, problem, num):
    rows = [{"text": f"text number {i}", "label": lab} for i, lab in enumerate(labels)]
    f = write_jsonl("cls.jsonl", rows)
    cfg = DataConfig(train_files=[f], format="classification", seq_len=64, cache_dir=cache)
    b = build_data(cfg, tok, micro_batch_size=4, seed=0)
    assert b.problem_type == problem and b.num_labels == num
    batch = next(iter(b.train_loader))
    texts = [tok.decode(r[m.bool()][:-1].tolist()) for r, m in zip(batch["input_ids"], batch["attention_mask"])]
    idx = [int(t.split()[-1]) for t in texts]
    got = batch["labels"]
    for k, i in enumerate(idx):
        lab = labels[i]
        if problem == "regression":
            assert got.dtype == torch.float32 and got[k].item() == pytest.approx(lab)
        elif problem == "multi_label_classification":
            assert got.dtype == torch.float32
            assert sorted(b.id2label[j] for j in torch.nonzero(got[k]).flatten().tolist()) == sorted(lab)
        else:
            assert got.dtype == torch.int64 and b.id2label[got[k].item()] == str(lab)
    assert sorted(idx) == [0, 1, 2, 3]


def test_fixed_label_set_from_config(tok, write_jsonl, cache):
    f = write_jsonl("cls.jsonl", [{"text": "a", "label": "pos"}])
    cfg = DataConfig(
        train_files=[f], format="classification", seq_len=16, cache_dir=cache, labels=["neg", "neutral", "pos"]
    )
    b = build_data(cfg, tok, micro_batch_size=1, seed=0)
    assert b.label2id == {"neg": 0, "neutral": 1, "pos": 2}
    assert next(iter(b.train_loader))["labels"].tolist() == [2]
