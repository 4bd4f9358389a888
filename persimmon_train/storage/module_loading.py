"""Load an HF safetensors folder into a module, possibly built on the meta device.

Built for an 8B model on a machine that cannot hold two copies of it: everything is validated
from the headers first (keys, shapes, truncation), then tensors are read one at a time with
``safetensors.safe_open`` and put straight into the module. On CPU those tensors are views of a
private (copy-on-write) memory map, so a meta-built model ends up holding the only copy (like
``torch.load(mmap=True)`` + ``load_state_dict(assign=True)``). Each tensor is checked for NaN/Inf
as it arrives, so a damaged download is named before training starts.
"""

from __future__ import annotations

import fnmatch
import os
from collections import defaultdict
from collections.abc import Iterable

import torch
from safetensors import safe_open

from persimmon_train.errors import WeightsError
from persimmon_train.storage.safetensors_io import has_nonfinite, inspect_folder, preview


def load_safetensors_into(
    module: torch.nn.Module,
    folder: str | os.PathLike,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    ignore_keys: Iterable[str] = (),
    device: str | torch.device = "cpu",
) -> None:
    """Load HF safetensors weights from ``folder`` into ``module`` (possibly built on the meta device).

    - Validates everything (folder, index, headers, keys, shapes) before reading any tensor.
    - ``strict``: the files must hold exactly the module's state-dict keys (tied weights need one
      of their names). Shape mismatches are errors either way.
    - ``ignore_keys``: names or fnmatch patterns (``"score.*"``) left out of loading and of the
      missing / unexpected checks.
    - dtype: floating tensors become ``dtype`` when given; otherwise a tensor keeps the dtype of
      the module's tensor, or the file's when the module's is on meta.
    - Meta tensors are replaced (Parameter type and ``requires_grad`` kept) by tensors on
      ``device``; real tensors are updated in place (or replaced on their own device when the
      dtype changes). Non-persistent buffers (rope ``inv_freq``) are not touched.
    - Afterwards no state-dict tensor may still be on meta (raises ``WeightsError`` naming them).
    """
    folder = os.fspath(folder)
    files = inspect_folder(folder)
    ignore = tuple(ignore_keys)

    def ignored(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)

    targets = module.state_dict(keep_vars=True)  # persistent tensors only, tied ones under each name
    groups: dict[int, list[str]] = defaultdict(list)  # names sharing one tensor object (tied weights)
    for name, tensor in targets.items():
        groups[id(tensor)].append(name)

    missing, plan = [], []  # plan: (file name to read, all module names it fills)
    for names in groups.values():
        wanted = [name for name in names if not ignored(name)]
        present = [name for name in wanted if name in files]
        if present:
            plan.append((present[0], names))  # tied names stay one tensor, even an ignored alias
        elif wanted:
            missing.append(wanted[0])
    unexpected = [name for name in files if name not in targets and not ignored(name)]
    if strict and (missing or unexpected):
        raise WeightsError(_key_mismatch_message(folder, missing, unexpected, files))

    mismatched = [
        name
        for name, tensor in targets.items()
        if name in files and not ignored(name) and files[name].shape != tuple(tensor.shape)
    ]
    if mismatched:
        name = mismatched[0]
        more = f" (and {len(mismatched) - 1} more shape mismatches)" if len(mismatched) > 1 else ""
        raise WeightsError(
            f"tensor {name} in {files[name].path} has shape {list(files[name].shape)} "
            f"but the model expects {list(targets[name].shape)}{more}"
        )
    owners = {name: _owner(module, name) for _, names in plan for name in names}

    by_file: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for source, names in plan:
        by_file[files[source].path].append((source, names))
    for path, items in by_file.items():
        with safe_open(path, framework="pt", device=str(device)) as handle:
            for source, names in items:
                current = targets[names[0]]
                value = handle.get_tensor(source)
                if has_nonfinite(value):
                    raise WeightsError(f"tensor {source} in {path} holds NaN/Inf values; refusing to load it")
                value = value.to(_target_dtype(value.dtype, current, dtype))
                _put(value, current, [owners[name] for name in names])
                del value

    still_meta = [name for name, tensor in module.state_dict(keep_vars=True).items() if tensor.is_meta]
    if still_meta:
        raise WeightsError(
            f"after loading {folder}, {len(still_meta)} tensors are still on the meta device "
            f"(not in the weights files): {preview(still_meta)}"
        )


def _target_dtype(file_dtype: torch.dtype, current: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None and file_dtype.is_floating_point:
        return dtype
    return file_dtype if current.is_meta else current.dtype


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    if leaf not in owner._parameters and leaf not in owner._buffers:
        raise WeightsError(f"state-dict key {name} is neither a parameter nor a buffer of the module")
    return owner, leaf


def _put(value: torch.Tensor, current: torch.Tensor, owners: list[tuple[torch.nn.Module, str]]) -> None:
    """Give every (tied) name the loaded value: in place when possible, else by replacement."""
    if not current.is_meta and value.dtype == current.dtype:
        with torch.no_grad():
            current.copy_(value)
        return
    if not current.is_meta:
        value = value.to(current.device)
    if isinstance(current, torch.nn.Parameter):
        value = torch.nn.Parameter(value, requires_grad=current.requires_grad)
    for owner, leaf in owners:
        if leaf in owner._parameters:
            owner._parameters[leaf] = value
        else:
            owner._buffers[leaf] = value


def _key_mismatch_message(folder: str, missing: list[str], unexpected: list[str], files) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors the model needs are missing: {preview(missing)}")
    if unexpected:
        described = [f"{name} ({os.path.basename(files[name].path)})" for name in unexpected]
        parts.append(f"{len(unexpected)} tensors the model does not have: {preview(described)}")
    return f"weights in {folder} do not match the model: " + "; ".join(parts)
