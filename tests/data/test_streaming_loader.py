"""The streaming packed loader on several ranks (simulated in-process: one loader per rank over the
same document stream): disjoint rows, resume across an epoch boundary, and the same resume checks
as the map-style loader."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from persimmon_train.data.loader import PackedLoader
from persimmon_train.data.streaming import StreamingPackedLoader
from persimmon_train.errors import DataError

SEQ = 16


def _documents():
    """60 documents of 3..13 tokens; document d's tokens are all 100 + d, so a row names its documents."""

    def documents():
        for d in range(60):
            n = 3 + (d * 7) % 11
            yield [100 + d] * n, [100 + d] * n

    return documents


def _loader(rank=0, world=1, micro=2, seed=5, train=True):
    return StreamingPackedLoader(
        _documents(),
        seq_len=SEQ,
        pad_id=0,
        long_docs="split",
        buffer_rows=4,
        micro_batch_size=micro,
        seed=seed,
        rank=rank,
        world_size=world,
        train=train,
    )


def _rows(batch) -> list[tuple]:
    return [tuple(r) for r in batch["input_ids"].tolist()]


def _batches_per_epoch(world, micro) -> int:
    return sum(1 for _ in _loader(world=world, micro=micro)._global_batches(0))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_rows_that_make_up_the_global_batch(world):
    micro = 2
    per_epoch = _batches_per_epoch(world, micro)
    assert per_epoch >= 3
    ranks = [list(itertools.islice(iter(_loader(r, world, micro)), per_epoch)) for r in range(world)]
    seen = [row for batches in ranks for batch in batches for row in _rows(batch)]
    assert len(seen) == len(set(seen)) == per_epoch * world * micro  # disjoint, nothing repeated
    whole = list(itertools.islice(iter(_loader(0, 1, micro * world)), per_epoch))  # one rank, the global batch
    for b in range(per_epoch):
        assert sorted(_rows(whole[b])) == sorted(row for r in range(world) for row in _rows(ranks[r][b]))


def test_resume_after_an_epoch_boundary_continues_that_epochs_order():
    world, micro = 2, 2
    per_epoch = _batches_per_epoch(world, micro)
    stop = per_epoch + 2  # inside epoch 1
    for rank in range(world):
        run = _loader(rank, world, micro)
        it = iter(run)
        first = list(itertools.islice(it, stop))
        state = run.state_dict()
        assert state["epoch"] == 1 and state["batch"] == 2
        rest = list(itertools.islice(it, 3))
        resumed = _loader(rank, world, micro)
        resumed.load_state_dict(state)
        again = list(itertools.islice(iter(resumed), 3))
        assert [_rows(b) for b in again] == [_rows(b) for b in rest]
        # epochs are shuffled differently, so replaying epoch 0's order would be caught above
        assert [_rows(b) for b in first[2:4]] != [_rows(b) for b in rest[:2]]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seed=6), "seed=5 but this run has seed=6"),
        (dict(world=1, micro=4), "world_size=2 but this run has world_size=1"),
        (dict(micro=1), "micro_batch_size=2 but this run has micro_batch_size=1"),
    ],
)
def test_resume_refuses_a_changed_seed_world_size_or_batch(change, message):
    run = _loader(0, 2, 2)
    next(iter(run))
    state = run.state_dict()
    settings = dict(rank=0, world=2, micro=2, seed=5)
    settings.update(change)
    with pytest.raises(DataError, match=message):
        _loader(**settings).load_state_dict(state)


@pytest.mark.parametrize("change", [dict(seed=6), dict(world=1, micro=4)])
def test_resume_refusal_is_the_map_style_loaders_one_line_error(change):
    """A changed seed, or world size at the same global batch, is refused by both loaders alike."""

    def refusal(loader, state) -> str:
        with pytest.raises(DataError) as e:
            loader.load_state_dict(state)
        return str(e.value)

    settings = dict(rank=0, world=2, micro=2, seed=5)
    changed = {**settings, **change}
    stream = _loader(**settings)
    next(iter(stream))
    rows = {k: np.zeros((8, SEQ), np.int32) for k in ("input_ids", "labels", "position_ids")}

    def packed(rank, world, micro, seed):
        return PackedLoader(rows, micro, seed, rank, world)

    saved = packed(**settings)
    next(iter(saved))
    message = refusal(_loader(**changed), stream.state_dict())
    assert message == refusal(packed(**changed), saved.state_dict())
    assert "\n" not in message and message.startswith("cannot resume the data loader: checkpoint has ")
