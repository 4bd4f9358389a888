"""storage.ZeroCheckpoint's refusals, without a DeepSpeed run (its readings are checked against
DeepSpeed's zero_to_fp32 and single-process AdamW in tests/distributed/test_checkpoints.py)."""

from __future__ import annotations

import json

import pytest
import torch

from persimmon_train.errors import CheckpointError
from persimmon_train.storage.zero_checkpoint import ZeroCheckpoint, check_pickled_types


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'deepspeed'}: no such folder"):
        ZeroCheckpoint(str(tmp_path / "deepspeed"))


def test_a_folder_without_partitions_is_not_a_zero_checkpoint(tmp_path):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no zero_pp_rank_\\*_optim_states.pt; not a ZeRO checkpoint"):
        ZeroCheckpoint(str(tmp_path))


def test_a_damaged_partition_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=f"{bad}: cannot read"):
        ZeroCheckpoint(str(tmp_path))


def test_a_partition_without_zero_state_is_refused(tmp_path):
    file = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"state": {}}}, file)
    with pytest.raises(CheckpointError, match=f"{file}: no optimizer_state_dict.zero_stage"):
        ZeroCheckpoint(str(tmp_path))


def test_a_missing_partition_is_counted(tmp_path):
    # 11 files, ranks 0..10 (two-digit ranks parse); the partitions say 12 ranks wrote them.
    for rank in range(11):
        state = {"zero_stage": 2, "partition_count": [12], "single_partition_of_fp32_groups": [torch.zeros(1)]}
        torch.save({"optimizer_state_dict": state}, tmp_path / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match="written by 12 ranks but 11 optimizer partitions"):
        ZeroCheckpoint(str(tmp_path))


class _Payload:
    """Unpickled with full trust, this creates `marker` (what a crafted checkpoint could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_folder(folder, marker):
    """A ZeRO folder whose partition also pickles an `open(marker)` call; and a model-state file
    holding tensors and DeepSpeed's own enum only."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder.mkdir(parents=True)
    state = {"zero_stage": ZeroStageEnum.gradients, "partition_count": [1], "hook": _Payload(marker)}
    torch.save({"optimizer_state_dict": state}, folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    model_state = {"module": {"w": torch.zeros(2)}, "stage": ZeroStageEnum.gradients}
    torch.save(model_state, folder / "mp_rank_00_model_states.pt")
    return folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def test_a_partition_that_references_other_code_is_refused_unrun(tmp_path):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "ran"
    file = _crafted_folder(tmp_path / "deepspeed", marker)
    with pytest.raises(CheckpointError, match=f"{file}: refused by the safe loader .* references io.open;"):
        ZeroCheckpoint(str(tmp_path / "deepspeed"))
    assert not marker.exists()


def test_deepspeeds_own_resume_never_unpickles_a_file_with_other_types(tmp_path):
    """A resume at the writing layout goes through DeepSpeed's load_checkpoint, which unpickles with
    full trust: load_state checks every file's pickled types first (check_pickled_types)."""
    pytest.importorskip("deepspeed")
    from persimmon_train.parallel.deepspeed import DeepSpeedStrategy
    from persimmon_train.storage.checkpoints import FORMAT, MANIFEST

    marker = tmp_path / "ran"
    bad = _crafted_folder(tmp_path / "step_5" / "deepspeed", marker)
    manifest = {"format": FORMAT, "files": {}, "strategy": {"name": "deepspeed", "world_size": 1, "stage": 2}}
    (tmp_path / "step_5" / MANIFEST).write_text(json.dumps(manifest))

    class Unreachable:
        def __getattr__(self, name):
            raise AssertionError(f"DeepSpeed's engine was reached ({name})")

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # the layout that wrote it, no engine
    strategy.world_size, strategy.stage, strategy.engine, strategy.optimizer = 1, 2, Unreachable(), None
    with pytest.raises(CheckpointError, match=f"{bad}: refused by the safe loader .* references io.open;"):
        strategy.load_state(str(tmp_path / "step_5"))
    assert not marker.exists()
    bad.unlink()
    check_pickled_types(str(tmp_path / "step_5" / "deepspeed"))  # tensors and ZeroStageEnum: accepted
