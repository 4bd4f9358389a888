"""User errors of recipes/export.py: one `error:` line naming the path or key, exit 2, nothing written."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.export.conftest import checkpoint_of, run_script


def _moved_checkpoint(run, tmp_path):
    """The step folder alone, away from its run's config.yaml."""
    step = tmp_path / "elsewhere" / "checkpoints" / "step_3"
    shutil.copytree(checkpoint_of(run), step)
    return step


def _base_gone(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("final", "adapter"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["path"] = str(tmp_path / "deleted-base")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return checkpoint_of(copy)


CASES = {
    "not_a_checkpoint": (lambda run, tmp: tmp, [], "is not a training checkpoint"),
    "missing_config": (_moved_checkpoint, [], "no run config at"),
    "base_gone": (_base_gone, [], "model.path"),
    "bad_dtype": (lambda run, tmp: checkpoint_of(run), ["dtype=fp16"], "dtype: 'fp16' is not one of bf16, fp32"),
    "bad_flag": (lambda run, tmp: checkpoint_of(run), ["merge=maybe"], "merge='maybe' is not true or false"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_export_user_errors(case, lora_run, tmp_path, export_env):
    make, extra, message = CASES[case]
    checkpoint = make(lora_run, tmp_path)
    out = tmp_path / "out"
    proc = run_script("export.py", f"checkpoint={checkpoint}", f"output_dir={out}", *extra, env=export_env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr
    names = {"not_a_checkpoint": str(tmp_path), "missing_config": "elsewhere/config.yaml",
             "base_gone": str(tmp_path / "deleted-base")}.get(case, "")
    assert names in lines[-1], lines[-1]  # the path at fault
    assert not out.exists()
