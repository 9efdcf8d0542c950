#!/usr/bin/env bash
# Two invocations of the quality grid side by side (one torch thread each, niced), from a worktree pinned
# at a commit so that editing src/ does not change runs mid-grid; results go to this checkout's
# bench/results. Usage: bench/quality_background.sh [WORKTREE] [--methods ...]   (resumable: run it again)
set -euo pipefail
main=$(cd "$(dirname "$0")/.." && pwd)
wt=${1:-$main}; shift || true
cd "$wt"
for i in 1 2; do
  OMP_NUM_THREADS=1 PYTHONPATH="$wt/src" nohup nice -n 10 "$main/.venv/bin/python" bench/quality.py \
    --results-dir "$main/bench/results" --runs-dir "$main/runs/quality" "$@" > "$main/runs/quality/invocation$i.log" 2>&1 &
  sleep 90  # the first makes the SmolLM2 export before the second could race for it
done
