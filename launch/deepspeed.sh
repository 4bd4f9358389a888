#!/usr/bin/env bash
# Launch a recipe with the DeepSpeed launcher (it appends --local_rank=N; the recipes accept it).
#
#   launch/deepspeed.sh recipes/finetune.py strategy=deepspeed strategy.stage=3 ...
#
# One node (default): NUM_GPUS processes (default: number of GPUs, or 1; on a CPU-only machine
# DeepSpeed's CPU accelerator runs that many ranks).
# Many nodes, from one node over ssh/pdsh: HOSTFILE=launch/hostfile.example (lines "host slots=N").
# Many nodes without ssh (Slurm): run on every node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT
# (launch/slurm/deepspeed.sbatch does this).
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_recipe "$@"
RECIPE=$1
shift

NUM_GPUS=${NUM_GPUS:-$(gpus)}
NNODES=${NNODES:-1}
MASTER_PORT=${MASTER_PORT:-$((29500 + RANDOM % 2000))}
DEEPSPEED=${DEEPSPEED:-deepspeed}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [[ -n "${HOSTFILE:-}" ]]; then
  : "${MASTER_ADDR:?MASTER_ADDR (the first host of the hostfile) is required with HOSTFILE}"
  CMD=("$DEEPSPEED" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$RECIPE" "$@")
elif [[ "$NNODES" != 1 ]]; then
  : "${MASTER_ADDR:?MASTER_ADDR (the host of node rank 0) is required for NNODES>1}"
  : "${NODE_RANK:?NODE_RANK is required for NNODES>1}"
  CMD=("$DEEPSPEED" --no_ssh --num_nodes "$NNODES" --node_rank "$NODE_RANK" --num_gpus "$NUM_GPUS"
       --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$RECIPE" "$@")
else
  CMD=("$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$MASTER_PORT" "$RECIPE" "$@")
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
