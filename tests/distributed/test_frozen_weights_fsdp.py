"""FSDP2 shards of a bf16 LoRA run's frozen base are bf16, and the run's numbers do not change.

FSDP2 all-gathers every parameter in bf16 for compute (MixedPrecisionPolicy), so shards that are
already bf16 give the same gathered values as float32 shards of a bf16 checkpoint: the losses and
the trained adapters are bit-identical, on every rank, at about half the shard bytes.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch

from tests.helpers import REPO, VENV_BIN, tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    tiny_model(seed=3, hidden_size=64, intermediate_size=128).to(torch.bfloat16).save_pretrained(root / "base")
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    worker = REPO / "tests" / "distributed" / "frozen_worker.py"
    cmd = [
        str(VENV_BIN / "torchrun"),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(root),
        str(root / "base"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_bf16_shards_change_no_number(reports):
    for report in reports:
        ref, got = report["float32_storage"], report["bf16_storage"]
        assert got["losses"] == ref["losses"]
        assert got["trained"] == ref["trained"]
        assert got["losses"][-1] < got["losses"][0]
    assert reports[0]["bf16_storage"]["losses"] != reports[1]["bf16_storage"]["losses"]  # ranks saw other rows


def test_frozen_shards_are_bf16(reports):
    for report in reports:
        assert report["float32_storage"]["frozen_dtypes"] == ["torch.float32"]
        assert report["bf16_storage"]["frozen_dtypes"] == ["torch.bfloat16", "torch.float32"]  # 1-D tensors stay
        ratio = report["bf16_storage"]["local_bytes"] / report["float32_storage"]["local_bytes"]
        print(f"FROZEN rank shard bytes, bf16 / float32 storage: {ratio:.3f}")
        assert ratio < 0.56
