# Shared by the launch scripts (sourced, not run).

# usage check: the first argument is the recipe to run.
require_recipe() {
  if [[ $# -lt 1 ]]; then
    echo "usage: $0 RECIPE.py [key=value ...]" >&2
    exit 2
  fi
}

# Number of GPUs on this node (1 when there are none: one CPU rank).
gpus() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true); fi
  if [[ "$n" -gt 0 ]]; then echo "$n"; else echo 1; fi
}

# ARGS=("$@"), plus resume=auto when the command names output_dir= and no resume= of its own: a
# job that torchrun restarts or Slurm requeues runs the same command again and must continue from
# its newest valid checkpoint, not start over (resume=null opts out).
add_resume_auto() {
  local arg has_output_dir=0
  ARGS=("$@")
  for arg in "$@"; do
    case "$arg" in
      resume=* | +resume=* | ++resume=*) return 0 ;;
      output_dir=* | +output_dir=* | ++output_dir=*) has_output_dir=1 ;;
    esac
  done
  if [[ "$has_output_dir" == 1 ]]; then ARGS+=(resume=auto); fi
}
