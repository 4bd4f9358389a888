import numpy as np
import pytest
import torch

from persimmon_train.data import DataConfig, build_data, demo_assets
from persimmon_train.errors import DataError


@pytest.fixture
def chat_cfg(cache):
    a = demo_assets()
    return DataConfig(train_files=a.train_files, eval_files=a.eval_files, format="chat", seq_len=256, cache_dir=cache)


def _rows(batch):
    return [tuple(r.tolist()) for r in batch["input_ids"]]


def test_two_ranks_disjoint_and_covering(tok, chat_cfg):
    loaders = [
        build_data(chat_cfg, tok, micro_batch_size=3, seed=7, rank=r, world_size=2).train_loader for r in range(2)
    ]
    assert len(loaders[0]) == len(loaders[1]) > 0
    seen = []
    for loader in loaders:
        it = iter(loader)
        seen.append([row for _ in range(len(loader)) for row in _rows(next(it))])
    assert not set(seen[0]) & set(seen[1])
    everything = build_data(chat_cfg, tok, micro_batch_size=3, seed=7).train_loader.arrays["input_ids"]
    n = len(everything)
    covered = set(seen[0]) | set(seen[1])
    assert len(covered) == (n // 6) * 6  # all rows but the < 1 global batch remainder
    assert covered <= {tuple(r.tolist()) for r in np.asarray(everything)}


def test_resume_sees_the_same_batches(tok, chat_cfg):
    def loader():
        return build_data(chat_cfg, tok, micro_batch_size=2, seed=3, rank=1, world_size=2).train_loader

    steps = len(loader()) + 5  # crosses an epoch boundary
    full = loader()
    it = iter(full)
    reference = [next(it) for _ in range(steps)]
    for k in (4, len(full), len(full) + 2):
        first = loader()
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        resumed = loader()
        resumed.load_state_dict(state)
        it = iter(resumed)
        for want in reference[k:]:
            got = next(it)
            for key in want:
                assert torch.equal(got[key], want[key]), (k, key)
    # epochs are reshuffled
    assert _rows(reference[0]) != _rows(reference[len(full)])


def test_resume_refuses_changed_world_size(tok, chat_cfg):
    a = build_data(chat_cfg, tok, micro_batch_size=2, seed=3, rank=0, world_size=2).train_loader
    b = build_data(chat_cfg, tok, micro_batch_size=2, seed=3).train_loader
    with pytest.raises(DataError, match="world_size"):
        b.load_state_dict(a.state_dict())


def test_eval_loader_is_finite_complete_and_equal_across_ranks(tok, chat_cfg):
    evals = [build_data(chat_cfg, tok, micro_batch_size=4, seed=0, rank=r, world_size=2).eval_loader for r in range(2)]
    batches = [list(e) for e in evals]
    assert len(batches[0]) == len(batches[1]) == len(evals[0])
    assert len(list(evals[0])) == len(batches[0])  # can run again
    labelled = sum(int((b["labels"] != -100).sum()) for bs in batches for b in bs)
    rows = evals[0].arrays["labels"]
    assert labelled == int((np.asarray(rows) != -100).sum())


def test_padded_loader_sharding_and_resume(tok, write_jsonl, cache):
    rows = [{"text": f"{i} " + "word " * (1 + i % 37), "label": ["a", "b", "c"][i % 3]} for i in range(203)]
    f = write_jsonl("cls.jsonl", rows)
    cfg = DataConfig(train_files=[f], format="classification", seq_len=128, cache_dir=cache)

    def loader(rank):
        return build_data(cfg, tok, micro_batch_size=4, seed=1, rank=rank, world_size=2).train_loader

    ids = []
    for r in range(2):
        it = iter(loader(r))
        ids.append(
            [
                tok.decode(x[m.bool()][:-1].tolist()).split()[0]
                for _ in range(len(loader(r)))
                for b in [next(it)]
                for x, m in zip(b["input_ids"], b["attention_mask"])
            ]
        )
    assert not set(ids[0]) & set(ids[1]) and len(set(ids[0]) | set(ids[1])) == (203 // 8) * 8
    full = iter(loader(0))
    ref = [next(full) for _ in range(40)]
    first = loader(0)
    it = iter(first)
    for _ in range(17):
        next(it)
    resumed = loader(0)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for want in ref[17:]:
        got = next(it)
        assert all(torch.equal(got[k], want[k]) for k in want)
    # length bucketing: pad to the batch's longest (rounded to 8), not to seq_len
    widths = [b["input_ids"].shape[1] for b in ref]
    assert min(widths) < 64 and all(w % 8 == 0 for w in widths)


def test_too_little_data_for_one_global_batch(tok, write_jsonl, cache):
    f = write_jsonl("t.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError, match="fewer than one global batch"):
        build_data(DataConfig(train_files=[f], seq_len=64, cache_dir=cache), tok, micro_batch_size=2, seed=0)
