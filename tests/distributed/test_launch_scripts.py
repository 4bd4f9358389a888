"""Launch scripts: syntax, DRY_RUN output. (torchrun.sh and deepspeed.sh also run the real 2-rank
jobs of test_equality / test_checkpoints.)"""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # the launch scripts run under bash

SCRIPTS = ["launch/torchrun.sh", "launch/deepspeed.sh", "launch/slurm/torchrun.sbatch", "launch/slurm/deepspeed.sbatch"]


def _dry(script: str, *args: str, **env) -> str:
    proc = subprocess.run(
        ["bash", script, "recipes/finetune.py", "strategy=fsdp", "data.train_files=[a b]", *args],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0


def test_torchrun_single_and_multi_node():
    assert _dry("launch/torchrun.sh", NPROC_PER_NODE="2").startswith(
        "torchrun --standalone --nnodes 1 --nproc_per_node 2 --max-restarts 3 "
        "--signals-to-handle SIGTERM\\,SIGINT\\,SIGHUP\\,SIGQUIT\\,SIGUSR1 --shutdown-timeout 170 "
        "recipes/finetune.py strategy=fsdp data.train_files=\\[a\\ b\\]"
    )
    multi = _dry("launch/torchrun.sh", NNODES="2", NODE_RANK="1", MASTER_ADDR="n1", MASTER_PORT="1234", RDZV_ID="j")
    assert "--nnodes 2 --node_rank 1" in multi and "--rdzv_backend c10d --rdzv_endpoint n1:1234 --rdzv_id j" in multi


def test_deepspeed_hostfile_and_no_ssh():
    dry = _dry("launch/deepspeed.sh", NUM_GPUS="2", MASTER_PORT="1")
    assert dry.startswith("deepspeed --num_gpus 2 --master_port 1 ")
    assert "--hostfile launch/hostfile.example --master_addr n1" in _dry(
        "launch/deepspeed.sh", HOSTFILE="launch/hostfile.example", MASTER_ADDR="n1"
    )
    assert "--no_ssh --num_nodes 2 --node_rank 0" in _dry(
        "launch/deepspeed.sh", NNODES="2", NODE_RANK="0", MASTER_ADDR="n1"
    )


@pytest.mark.parametrize(
    "script,launcher", [("launch/slurm/torchrun.sbatch", "torchrun"), ("launch/slurm/deepspeed.sbatch", "deepspeed")]
)
def test_slurm_dry_run_prints_one_command_per_node(script, launcher):
    out = _dry(script, NNODES="3", MASTER_ADDR="node7")
    assert out.startswith("MASTER_ADDR=node7 MASTER_PORT=29500 NNODES=3")
    assert "srun --nodes 3 --ntasks-per-node 1" in out
    for rank in range(3):
        assert f"# node {rank} runs:" in out
        assert f"--node_rank {rank}" in out
    assert out.count(f"{launcher} --") == 3


def test_torchrun_restarts_continue_with_resume_auto():
    """MAX_RESTARTS (default 3) restarts the group; the restarted ranks run the same command, so
    resume=auto is added when output_dir= is named and the command has no resume= of its own."""
    assert _dry("launch/torchrun.sh", "output_dir=/o").rstrip().endswith("output_dir=/o resume=auto")
    assert "resume=auto" not in _dry("launch/torchrun.sh")  # no output_dir: nothing to continue
    assert "resume=latest" in (dry := _dry("launch/torchrun.sh", "output_dir=/o", "resume=latest"))
    assert "resume=auto" not in dry
    dry = _dry("launch/torchrun.sh", "output_dir=/o", MAX_RESTARTS="0", SHUTDOWN_TIMEOUT="60")
    assert "--max-restarts 0" in dry and "--shutdown-timeout 60" in dry and "resume=auto" not in dry


@pytest.mark.parametrize("script", ["launch/slurm/torchrun.sbatch", "launch/slurm/deepspeed.sbatch"])
def test_slurm_scripts_ask_for_a_warning_signal_requeue_and_resume_auto(script):
    header = [line for line in (REPO / script).read_text().splitlines() if line.startswith("#SBATCH")]
    # No B:: every process of the step gets SIGUSR1 (the batch shell is exec'd into srun).
    assert "#SBATCH --signal=USR1@180" in header and "#SBATCH --requeue" in header
    out = _dry(script, "output_dir=/o", NNODES="2", MASTER_ADDR="n1")
    assert out.count("output_dir=/o resume=auto") == 2  # one command per node
