#!/bin/bash
# One task of the training step (srun starts it once per task): runs "$@" and, when that fails,
# notes how in $MEGAMOE_TASK_EXITS/task_$SLURM_PROCID: "<end time, ns> <exit code> <TERM|->".
#
# Why: with --kill-on-bad-exit srun answers the first failing task by sending SIGTERM to the
# others, and returns the highest exit code of all tasks. A config error (exit 2) then shows as
# 143 whenever another rank was still importing torch when it was killed. From these notes the
# batch shell reports the first failing task's own code (common.sh, megamoe_first_failure); a
# task that got SIGTERM is marked, because its failure is an effect, not the cause.
#
# Signals: Slurm delivers USR1 / TERM to every process of the task, the command's included, so
# this shell passes nothing on. It traps both only to stay alive (bash dies of an untrapped
# USR1) and to note a TERM; the traps run once the command has ended.
set -u
got_term=-
trap 'got_term=TERM' TERM
trap ':' USR1
"$@"
rc=$?
if [ "$rc" != 0 ] && [ -n "${MEGAMOE_TASK_EXITS:-}" ]; then
    # One file per task: no appends to a shared file from several nodes.
    echo "$(date +%s%N) $rc $got_term" > "$MEGAMOE_TASK_EXITS/task_${SLURM_PROCID:-0}" 2>/dev/null
fi
exit "$rc"
