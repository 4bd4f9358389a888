#!/usr/bin/env bash
# One-GPU benchmark of persimmon-train vs transformers+peft (about 8 minutes on one H100/H200).
#
#   bench/gpu.sh RESULTS_FILE [--cpu-smoke] [--layers N] [--parts equality,throughput,context] ...
#
# Needs only: torch (CUDA build, >= 2.5; varlen attention needs >= 2.10), triton, transformers, peft,
# safetensors, sentencepiece. No deepspeed, datasets, hydra, wandb, omegaconf, and no network.
# Prints one table (backend equality at 4K bf16; tokens/s, MFU and peak memory at 16K packed rows
# for full fine-tuning and LoRA, ours with each attention backend vs transformers+peft; longest
# LoRA context of the 36-layer model: peak memory of Persimmon-8B LoRA with a bf16 base at 2K, 4K, 16K
# and beyond) and writes it to RESULTS_FILE after every part.
# BENCH_TIMEOUT (seconds, default 470) bounds the whole run; what finished is already in the file.
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: bench/gpu.sh RESULTS_FILE [--cpu-smoke] [--layers N] [--parts ...] [--contexts ...]" >&2
  exit 2
fi
out="$1"; shift
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout "${BENCH_TIMEOUT:-470}" python "$here/gpu_bench.py" --out "$out" "$@"
