"""2-rank CPU runs of the real recipes through launch/torchrun.sh (FSDP2, gloo) and
launch/deepspeed.sh (ZeRO, DeepSpeed's CPU accelerator), shared by the tests of this folder.

Every run is made at most once per session (`runs.get(name)`), so the equality, checkpoint and
resume tests reuse the same jobs. The first DeepSpeed run on a fresh machine builds DeepSpeed's
shared-memory op with ninja (minutes): its timeout is generous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.recipes.conftest import FAST, REPO, read_metrics, recipe_env

VENV_BIN = Path(sys.executable).parent
STEPS = 10
# fp32, AC on, 10 steps, global batch 8 rows: 1 rank x 8 or 2 ranks x 4.
COMMON = [
    *FAST,
    f"trainer.max_steps={STEPS}",
    "trainer.eval_at_start=false",
    "trainer.eval_every_n_steps=0",
    "trainer.eval_max_batches=2",
    "trainer.activation_checkpointing=1",
    "checkpoint.every_n_steps=5",
    "checkpoint.keep_last=0",
    "optim.warmup_steps=2",
    "trainer.num_threads=1",
]
LORA = ["peft=lora", "peft.dropout=0.0"]
# Tiny params would stay unpartitioned under ZeRO-3 (persistence threshold); partition everything.
ZERO3 = [
    "strategy=deepspeed",
    "strategy.stage=3",
    "strategy.extra={zero_optimization:{stage3_param_persistence_threshold:0}}",
]
JOBS = {
    "single": ["strategy=single", "peft=none", "trainer.micro_batch_size=8"],
    "single_lora": ["strategy=single", *LORA, "trainer.micro_batch_size=8"],
    "fsdp": ["strategy=fsdp", "peft=none", "trainer.micro_batch_size=4"],
    "fsdp_lora": ["strategy=fsdp", *LORA, "trainer.micro_batch_size=4"],
    "zero2": ["strategy=deepspeed", "strategy.stage=2", "peft=none", "trainer.micro_batch_size=4"],
    # bf16: DeepSpeed names its optimizer partitions bf16_zero_pp_rank_*; the run ends in an export.
    "zero2_bf16": [
        "strategy=deepspeed",
        "strategy.stage=2",
        "peft=none",
        "trainer.micro_batch_size=4",
        "trainer.precision=bf16",
    ],
    "zero2_lora": ["strategy=deepspeed", "strategy.stage=2", *LORA, "trainer.micro_batch_size=4"],
    "zero3": [*ZERO3, "peft=none", "trainer.micro_batch_size=4"],
    "zero3_lora": [*ZERO3, *LORA, "trainer.micro_batch_size=4"],
}
LAUNCHERS = {"single": "python", "fsdp": "torchrun", "deepspeed": "deepspeed"}


def strategy_of(overrides) -> str:
    names = [o.split("=", 1)[1] for o in overrides if o.startswith("strategy=")]
    return names[-1] if names else "single"


def launch_command(output_dir: Path, overrides: list[str], env: dict, nproc: int = 2, common=None):
    """(argv, env) running recipes/finetune.py as a user would: python, launch/torchrun.sh or launch/deepspeed.sh."""
    launcher = LAUNCHERS[strategy_of(overrides)] if nproc > 1 else "python"
    args = [*(COMMON if common is None else common), *overrides, f"output_dir={output_dir}"]
    if launcher == "python":
        cmd = [sys.executable, str(REPO / "recipes" / "finetune.py"), *args]
    else:
        cmd = ["bash", str(REPO / "launch" / f"{launcher}.sh"), "recipes/finetune.py", *args]
    env = dict(
        env,
        # launch/torchrun.sh restarts a failed group 3 times by default: a test that expects a
        # failure would wait for every restart (tests of restarts set MAX_RESTARTS themselves).
        MAX_RESTARTS=env.get("MAX_RESTARTS", "0"),
        NPROC_PER_NODE=str(nproc),
        NUM_GPUS=str(nproc),
        TORCHRUN=str(VENV_BIN / "torchrun"),
        DEEPSPEED=str(VENV_BIN / "deepspeed"),
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
    )
    return cmd, env


def launch(output_dir: Path, overrides: list[str], env: dict, timeout: float = 600, nproc: int = 2, common=None):
    """Run recipes/finetune.py to completion (COMMON settings unless `common` is given); fail with its output."""
    cmd, env = launch_command(output_dir, overrides, env, nproc=nproc, common=common)
    # Its own session, so a timeout kills the launcher's ranks too: subprocess.run would kill only
    # the bash launcher and leave the ranks holding ports and cores for the tests after it.
    with subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as child:
        try:
            stdout, stderr = child.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            stdout, stderr = child.communicate()
            raise AssertionError(
                f"{' '.join(cmd[:4])} ... still running after {timeout:.0f} s; killed\nstdout:\n{stdout[-3000:]}\n"
                f"stderr:\n{stderr[-6000:]}"
            ) from None
    proc = subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:4])} ... exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
            f"stderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    """Poll until `path` exists, while the launch `proc` runs (to SIGKILL it mid-run after that)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            output = proc.stdout.read()[-3000:] if proc.stdout else ""
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path} appeared\n{output}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


class Runs:
    def __init__(self, root: Path):
        self.root = root
        self.env = recipe_env(root)
        self.done: dict[str, Path] = {}

    def get(self, name: str) -> Path:
        if name not in self.done:
            out = self.root / name
            launch(out, JOBS[name], self.env)
            self.done[name] = out
        return self.done[name]


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"))


def train_losses(output_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(output_dir) if "loss" in row}


def strategy_json(checkpoint: Path) -> dict:
    """What the checkpoint's manifest says about its writer (strategy + peft settings)."""
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    return {**manifest["strategy"], "peft": manifest["peft"]}
