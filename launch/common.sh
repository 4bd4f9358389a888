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
