"""bench/gpu.sh runs end to end (tiny CPU shapes) on a box without deepspeed/datasets/hydra/wandb/omegaconf."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_script_cpu_smoke_without_training_stack(tmp_path):
    poison = tmp_path / "poison"
    poison.mkdir()
    # A bare GPU box lacks these: importing any of them raises ImportError.
    (poison / "sitecustomize.py").write_text(
        "import sys\nfor n in ('deepspeed', 'datasets', 'hydra', 'wandb', 'omegaconf'):\n    sys.modules[n] = None\n"
    )
    out = tmp_path / "table.txt"
    env = dict(os.environ, PYTHONPATH=str(poison), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), str(out), "--cpu-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "FAILED" not in text, text
    for section in (
        "backend equality vs sdpa",
        "segments",
        "flex",
        "throughput:",
        "transformers+peft/lora/sdpa",
        "ours/full/segments",
        "longest LoRA context",
    ):
        assert section in text, section


@pytest.mark.slow
def test_gpu_script_usage_error():
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh")], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr
