"""Run under `torchrun --nproc_per_node 2` by test_frozen_weights_fsdp.py; writes OUT/rank<r>.json.

The same bf16 LoRA run over a bf16 HF folder twice in one process group: with the frozen base's
shards held in float32 (`hold_frozen_for` off: the reference) and in bf16 (as runs do). Reports
each run's per-step losses, its trained adapters' checksums and the bytes of this rank's shards.
"""

from __future__ import annotations

import json
import os
import sys

import torch

import persimmon_train.parallel.fsdp as fsdp
from persimmon_train.parallel.fsdp import FSDPStrategy
from tests.helpers import lora_steps_from_folder


def main(out_dir: str, folder: str) -> None:
    strategy = FSDPStrategy(precision="bf16", device="cpu", model_path=folder, seed=0)
    report = {}
    hold = fsdp.hold_frozen_for
    for name, holder in (("float32_storage", lambda model, precision: 0), ("bf16_storage", hold)):
        fsdp.hold_frozen_for = holder
        losses, trained, dtypes = lora_steps_from_folder(strategy, folder, data_seed=strategy.rank)
        local = sum(p.to_local().numel() * p.element_size() for p in strategy.model.parameters())
        report[name] = {
            "losses": losses,
            "trained": {k: float(v.double().sum()) for k, v in trained.items()},
            "frozen_dtypes": sorted({str(d) for n, d in dtypes.items() if ".lora_" not in n}),
            "local_bytes": local,
        }
    fsdp.hold_frozen_for = hold
    with open(os.path.join(out_dir, f"rank{strategy.rank}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)
    strategy.close()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
