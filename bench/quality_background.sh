#!/usr/bin/env bash
# Two invocations of the quality grid side by side (one torch thread each, niced), from a worktree pinned
# at a commit so that editing src/ does not change runs mid-grid; results go to this checkout's
# bench/results. Usage: bench/quality_background.sh [WORKTREE] [--methods ...]   (resumable: run it again)
# TASKS (default "gsm_symbolic gsm_symbolic": two fine-tuning invocations) starts one invocation per word,
# each with that --task: TASKS="gsm_symbolic pretrain" bench/quality_background.sh WORKTREE runs the
# pre-training half beside one fine-tuning invocation (--methods then names rows of either half);
# TASKS="gsm_symbolic pretrain,gsm_symbolic" makes the second join the fine-tuning grid once pre-training is done.
# To end the grid without losing a run: `touch runs/quality/STOP`; each invocation finishes and records the
# run it is in, then stops (this script removes the file when it starts). To stop at once: each invocation
# leads its own process group (setsid), with its fine-tuning workers in it: `kill -- -PID` (PID: its
# bench/quality.py process). Killing only that process leaves its running worker going, whose result no
# invocation then records. A worker still loading its model finishes loading before its SIGTERM handler
# (the command saves on SIGTERM) stops it; `kill -9 -- -PID` stops it at once (its unfinished run is lost).
set -euo pipefail
main=$(cd "$(dirname "$0")/.." && pwd)
wt=${1:-$main}; shift || true
cd "$wt"
mkdir -p "$main/runs/quality"
rm -f "$main/runs/quality/STOP"
i=0
for task in ${TASKS:-gsm_symbolic gsm_symbolic}; do
  i=$((i + 1))
  [ "$task" = gsm_symbolic ] && task_arg=() || task_arg=(--task "$task")  # the default: older worktrees lack --task
  OMP_NUM_THREADS=1 PYTHONPATH="$wt/src" setsid nohup nice -n 10 "$main/.venv/bin/python" bench/quality.py "${task_arg[@]}" \
    --results-dir "$main/bench/results" --runs-dir "$main/runs/quality" "$@" >> "$main/runs/quality/invocation_${task//,/-}_$i.log" 2>&1 &
  sleep 90  # the first makes the SmolLM2 export before the second could race for it
done
