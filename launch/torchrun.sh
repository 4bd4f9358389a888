#!/usr/bin/env bash
# Launch a recipe with torchrun (strategy=fsdp, or strategy=deepspeed: the recipes run under either launcher).
#
#   launch/torchrun.sh recipes/finetune.py strategy=fsdp model=persimmon_8b model.path=/models/persimmon-8b ...
#
# One node (default): torchrun --standalone, NPROC_PER_NODE processes (default: number of GPUs, or 1).
# Many nodes: run this script once on every node with the same NNODES, MASTER_ADDR, MASTER_PORT and
# RDZV_ID, and that node's NODE_RANK (launch/slurm/torchrun.sbatch does this for you):
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node001 MASTER_PORT=29500 launch/torchrun.sh recipes/finetune.py ...
# Restarts: when a rank fails, torchrun restarts the whole group up to MAX_RESTARTS times (default 3);
# the restarted ranks run the same command, so resume=auto is added when the command names
# output_dir= and no resume= (they continue from the newest valid checkpoint). torchrun passes
# SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 (Slurm's warning) on to the ranks, which save and stop
# at the next step boundary (exit 3); SHUTDOWN_TIMEOUT (default 170 s) is how long it then waits
# before SIGKILL: keep it above one checkpoint write and below the scheduler's grace period.
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_recipe "$@"
RECIPE=$1
shift
MAX_RESTARTS=${MAX_RESTARTS:-3}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-170}
ARGS=("$@")
if [[ "$MAX_RESTARTS" != 0 ]]; then add_resume_auto "$@"; fi
RESTARTS=(--max-restarts "$MAX_RESTARTS" --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
          --shutdown-timeout "$SHUTDOWN_TIMEOUT")

NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TORCHRUN=${TORCHRUN:-torchrun}
# One torch thread pool per rank sized to the cores it gets, unless the caller chose.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ "$NNODES" == 1 ]]; then
  CMD=("$TORCHRUN" --standalone --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" "${RESTARTS[@]}" "$RECIPE" "${ARGS[@]}")
else
  : "${MASTER_ADDR:?MASTER_ADDR (the host of node rank 0) is required for NNODES>1}"
  MASTER_PORT=${MASTER_PORT:-29500}
  RDZV_ID=${RDZV_ID:-persimmon-train}
  CMD=("$TORCHRUN" --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE"
       --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "$RDZV_ID"
       "${RESTARTS[@]}" "$RECIPE" "${ARGS[@]}")
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
