"""A DeepSpeed ZeRO checkpoint (`step_N/deepspeed/`, written by `engine.save_checkpoint`) read in one
process, per parameter: the one reader of its partitions outside DeepSpeed's own engine.

For every trainable parameter (the unwrapped model's names; frozen LoRA bases are not saved) it
assembles, on demand, the FULL fp32 master weight and the full AdamW moments (`exp_avg`,
`exp_avg_sq`) from every rank's partition, whatever world size and stage wrote them. Export reads
the weights (storage.checkpoint_weights); a resume at another world size or ZeRO stage reads all
three (parallel/zero_reshard.py) and hands each rank its new partition.

The optimizer files are memory-mapped (torch.load(mmap=True)): a file's pages are read when a
parameter's fragment is copied out, as clean page cache the kernel may drop, and the tensors this
reader allocates are one parameter's at a time, never a rank's whole partition.

Layout facts (DeepSpeed 0.19, the version the tests run; checked, with an error naming the file):
- every rank writes `[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt` holding
  `optimizer_state_dict` with `zero_stage`, `partition_count` and its flat fp32 partitions, one
  per parameter group; the base optimizer's state holds `exp_avg`/`exp_avg_sq` flats of the same
  layout, and `step`;
- ZeRO-1/2 (`single_partition_of_fp32_groups`): the group's parameters are concatenated and the
  flat cut into equal partitions, one per rank; `param_slice_mappings[g]` names, per rank, each
  parameter fragment in its partition (numel, start). A parameter is its fragments in rank order.
- ZeRO-3 (`fp32_flat_groups`): every parameter is cut separately into ceil(numel / ranks) pieces
  (the last padded) and a rank's flat is its pieces, in parameter order (`param_shapes`), across
  the groups back to back.
- the model-state file(s) hold `param_shapes` (names and shapes, in group order), `shared_params`
  (aliases), and the engine's counters (`global_steps`, `global_samples`, `skipped_steps`).
"""

from __future__ import annotations

import glob
import importlib
import math
import os
import pickle
import re

import torch

from persimmon_train.errors import CheckpointError, first_line

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")
_OPTIM = "optimizer_state_dict"


# Beside tensors and plain values DeepSpeed pickles these of its own types (DeepSpeed 0.19: every
# file of fp32 / bf16, ZeRO 1-3, LoRA or full checkpoints holds only the first three; fp16 runs add
# the dynamic scaler). torch's weights_only unpickler admits them and refuses anything else, so a
# crafted checkpoint cannot run code when it is exported or resharded. DeepSpeed's own
# load_checkpoint (a resume at the writing layout) unpickles with full trust: `check_pickled_types`
# refuses such a file first.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
)


def _deepspeed_globals(file: str) -> list:
    try:
        return [getattr(importlib.import_module(m), c) for m, _, c in (g.rpartition(".") for g in DEEPSPEED_GLOBALS)]
    except ImportError:
        raise CheckpointError(f"{file} is a DeepSpeed checkpoint; reading it needs the deepspeed package") from None


def _load(file: str, *, mmap: bool) -> dict:
    with torch.serialization.safe_globals(_deepspeed_globals(file)):
        try:
            return torch.load(file, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises several types for a damaged file
            if isinstance(exc, pickle.UnpicklingError):  # a refused type, or garbage: name the type if so
                _refuse_other_types(file)
            raise CheckpointError(f"{file}: cannot read ({first_line(exc, 200)})") from None


def _refuse_other_types(file: str) -> None:
    """One line naming the types `file` pickles beyond tensors and DEEPSPEED_GLOBALS, if any."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # noqa: BLE001 - not a zip-format torch file: the load reports it
        return
    unsafe = [name for name in found if name not in DEEPSPEED_GLOBALS]
    if unsafe:
        raise CheckpointError(
            f"{file}: refused by the safe loader (torch.load weights_only=True): it references "
            f"{', '.join(unsafe[:5])}; a DeepSpeed checkpoint holds tensors and {', '.join(DEEPSPEED_GLOBALS)} "
            "only, and this file will not be unpickled with full trust (that can run arbitrary code)"
        )


def check_pickled_types(folder: str) -> None:
    """Before DeepSpeed's load_checkpoint unpickles `folder`'s files with full trust: refuse one that
    references anything but tensors and DEEPSPEED_GLOBALS (reads each file's pickle, not its data)."""
    for file in sorted(glob.glob(os.path.join(folder, "*.pt"))):
        _refuse_other_types(file)


def _rank_files(folder: str, pattern: str) -> list[str]:
    """`zero_pp_rank_<r>_...` files in rank order (a lexical sort puts rank 10 before rank 2)."""
    files = glob.glob(os.path.join(folder, pattern))
    return sorted(files, key=lambda f: int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(f)).group(1)))


class ZeroCheckpoint:
    """The partitions of one `step_N/deepspeed/` folder; `full(name, key)` assembles one tensor."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: no such folder; not a strategy=deepspeed checkpoint")
        self.folder = folder
        # bf16 runs name theirs bf16_zero_pp_rank_<r>_mp_rank_00_optim_states.pt
        optim_files = _rank_files(folder, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")
        if not optim_files:
            raise CheckpointError(f"{folder}: no zero_pp_rank_*_optim_states.pt; not a ZeRO checkpoint")
        self._optim = []
        for file in optim_files:
            state = _load(file, mmap=True).get(_OPTIM)
            if not isinstance(state, dict) or "zero_stage" not in state:
                raise CheckpointError(f"{file}: no {_OPTIM}.zero_stage; not a ZeRO optimizer partition")
            self._optim.append(state)
        first = self._optim[0]
        self.stage = int(first["zero_stage"])
        counts = first["partition_count"]
        self.world_size = max(counts) if isinstance(counts, list) else int(counts)
        if self.world_size != len(optim_files):
            raise CheckpointError(
                f"{folder}: written by {self.world_size} ranks but {len(optim_files)} optimizer partitions are there"
            )
        model_files = (
            _rank_files(folder, "*zero_pp_rank_*_mp_rank_00_model_states.pt")
            if self.stage == 3
            else [os.path.join(folder, "mp_rank_00_model_states.pt")]
        )
        if not model_files or not os.path.isfile(model_files[0]):
            raise CheckpointError(f"{folder}: no model-state file for ZeRO stage {self.stage}")
        model_state = _load(model_files[0], mmap=True)
        self.counters = {k: model_state.get(k) for k in ("global_steps", "global_samples", "skipped_steps")}
        self.shapes: dict[str, torch.Size] = {}
        self._group_of: dict[str, int] = {}
        for g, shapes in enumerate(model_state["param_shapes"]):
            for name, shape in shapes.items():
                self.shapes[name], self._group_of[name] = torch.Size(shape), g
        self.aliases = dict(model_state.get("shared_params") or {})
        self._flats = {
            key: [self._rank_flats(state, key, file) for state, file in zip(self._optim, optim_files)]
            for key in STATE_KEYS
        }
        if self.stage == 3:
            self._offsets = self._zero3_offsets()

    # ------------------------------------------------------------------ reading
    @property
    def names(self) -> list[str]:
        return [*self.shapes, *self.aliases]

    def step(self) -> torch.Tensor:
        """The optimizer's step count (equal in every group and rank, or the checkpoint is refused)."""
        steps = {float(s["step"]) for state in self._optim for s in self._base_state(state).values() if "step" in s}
        if len(steps) != 1:
            raise CheckpointError(f"{self.folder}: optimizer step counts differ across groups/ranks: {sorted(steps)}")
        return torch.tensor(steps.pop())

    def param_groups(self) -> list[dict]:
        """The optimizer's hyperparameters per parameter group (lr, betas, ...; no tensors)."""
        base = self._optim[0].get("base_optimizer_state" if self.stage < 3 else _OPTIM)
        return [{k: v for k, v in group.items() if k != "params"} for group in base["param_groups"]]

    def full(self, name: str, key: str = "fp32") -> torch.Tensor:
        """The full fp32 `key` (fp32 master weight, exp_avg or exp_avg_sq) of parameter `name`."""
        name = self.aliases.get(name, name)
        if name not in self.shapes:
            raise CheckpointError(f"{self.folder}: no parameter {name} in this checkpoint")
        flats = self._flats[key]
        if self.stage == 3:
            pieces = [self._zero3_piece(rank_flats, name) for rank_flats in flats]
        else:
            g = self._group_of[name]
            pieces = []
            for state, rank_flats in zip(self._optim, flats):
                fragment = state["param_slice_mappings"][g].get(name)
                if fragment is not None:
                    pieces.append(rank_flats[g].narrow(0, fragment.start, fragment.numel))
        shape = self.shapes[name]
        joined = torch.cat(pieces)[: shape.numel()]
        if joined.numel() != shape.numel():
            raise CheckpointError(
                f"{self.folder}: parameter {name} has {joined.numel()} of its {shape.numel()} elements here"
            )
        return joined.view(shape)  # torch.cat copied: nothing here aliases the mapped files

    def __iter__(self):
        """(name, full fp32 weight), one at a time."""
        for name in self.names:
            yield name, self.full(name)

    # ------------------------------------------------------------------ layout
    def _base_state(self, state: dict) -> dict:
        base = state.get("base_optimizer_state" if self.stage < 3 else _OPTIM)
        if not isinstance(base, dict) or "state" not in base:
            raise CheckpointError(
                f"{self.folder}: the optimizer state is not one torch state_dict per rank "
                "(zero_optimization.elastic_checkpoint?); this reader does not know that layout"
            )
        return base["state"]

    def _rank_flats(self, state: dict, key: str, file: str) -> list[torch.Tensor]:
        if key == "fp32":
            flats = state.get("fp32_flat_groups" if self.stage == 3 else "single_partition_of_fp32_groups")
        else:
            base = self._base_state(state)
            flats = [base[g].get(key) for g in sorted(base)]
        if not flats or any(f is None for f in flats):
            raise CheckpointError(f"{file}: no {key} partitions (an optimizer other than Adam/AdamW?)")
        return [f.reshape(-1) for f in flats]

    def _zero3_offsets(self) -> dict[str, tuple[int, int]]:
        """name -> (offset into a rank's groups laid back to back, piece length)."""
        offsets, at = {}, 0
        for name, shape in self.shapes.items():
            piece = math.ceil(shape.numel() / self.world_size)
            offsets[name], at = (at, piece), at + piece
        available = sum(f.numel() for f in self._flats["fp32"][0])
        if at != available:
            raise CheckpointError(
                f"{self.folder}: ZeRO-3 partitions hold {available} elements a rank, the parameters need {at}"
            )
        return offsets

    def _zero3_piece(self, rank_flats: list[torch.Tensor], name: str) -> torch.Tensor:
        offset, length = self._offsets[name]
        parts, start = [], 0
        for flat in rank_flats:  # a piece may straddle two groups' flats
            end = start + flat.numel()
            lo, hi = max(offset, start), min(offset + length, end)
            if lo < hi:
                parts.append(flat[lo - start : hi - start])
            start = end
        return torch.cat(parts)
