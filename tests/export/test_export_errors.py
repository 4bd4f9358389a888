"""User errors of recipes/export.py: one `error:` line naming the path or key, exit 2, nothing written;
and what is NOT an error any more: a checkpoint moved away from its run (no config.yaml, no data)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests.export.conftest import checkpoint_of
from tests.helpers import assert_one_line_error, load_tensors, run_in_process, run_recipe


def _moved_checkpoint(run, tmp_path):
    """The step folder alone, away from its run's config.yaml."""
    step = tmp_path / "elsewhere" / "checkpoints" / "step_3"
    shutil.copytree(checkpoint_of(run), step)
    return step


def _base_gone(run, tmp_path):
    """The manifest names a base model folder that no longer exists."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "adapter"))
    manifest_path = checkpoint_of(copy) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model"]["base"]["path"] = str(tmp_path / "deleted-base")
    manifest_path.write_text(json.dumps(manifest))
    return checkpoint_of(copy)


def _truncated(run, tmp_path):
    step = _moved_checkpoint(run, tmp_path)
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return step


CASES = {
    "not_a_checkpoint": (lambda run, tmp: tmp, [], "is neither a training checkpoint"),
    "base_gone": (_base_gone, [], "base model"),
    "truncated": (_truncated, [], "(truncated or replaced)"),
    "bad_dtype": (lambda run, tmp: checkpoint_of(run), ["dtype=fp16"], "dtype: 'fp16' is not one of auto, bf16, fp32"),
    "bad_flag": (lambda run, tmp: checkpoint_of(run), ["merge=maybe"], "merge='maybe' is not true or false"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_user_errors(case, lora_run, tmp_path):
    make, extra, message = CASES[case]
    checkpoint = make(lora_run, tmp_path)
    out = tmp_path / "out"
    ran = run_in_process("export", f"checkpoint={checkpoint}", f"output_dir={out}", *extra)
    line = assert_one_line_error(ran, message)
    names = {
        "not_a_checkpoint": str(tmp_path),
        "base_gone": str(tmp_path / "deleted-base"),
        "truncated": "step_3/model.safetensors",
    }.get(case, "")
    assert names in line, line  # the path at fault
    assert not out.exists()


def test_export_needs_only_the_checkpoint(lora_run, tmp_path):
    """Moved away from its run (no config.yaml beside it) the checkpoint still exports: all it needs
    is in its manifest; the result equals the run's own final/."""
    step = _moved_checkpoint(lora_run, tmp_path)
    out = tmp_path / "out"
    ran = run_in_process("export", f"checkpoint={step}", f"output_dir={out}", "dtype=fp32")
    assert ran.returncode == 0, ran.stderr[-2000:]
    exported, final = load_tensors(out), load_tensors(lora_run / "final")
    assert sorted(exported) == sorted(final)
    assert all(torch.equal(exported[k], final[k]) for k in final)


@pytest.mark.slow
def test_full_disk_during_export_is_one_line_and_leaves_nothing(lora_run, tmp_path, export_env):
    import resource

    out = tmp_path / "out"
    limit = 200_000  # below the merged model's weights file

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # CPython ignores SIGXFSZ: EFBIG

    proc = run_recipe(
        "export",
        f"checkpoint={checkpoint_of(lora_run)}",
        f"output_dir={out}",
        "dtype=fp32",
        env=export_env,
        check=False,
        preexec_fn=small_files,
    )
    assert_one_line_error(proc, "error: writing ", "model", "larger than this system allows")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []  # no staging folder left
