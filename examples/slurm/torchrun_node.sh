#!/bin/bash
# One per node, started by train_torchrun.sbatch through srun: runs torchrun with GPUS_PER_NODE
# workers of `python -m megamoe train "$@"` and passes stop signals on to the workers.
#
# Why not signal torchrun: its default reaction to USR1 is to die (orphaning the workers), and on
# TERM it kills the workers after a short grace period, possibly in the middle of a checkpoint.
# So torchrun starts with USR1 ignored, and this wrapper passes USR1 / TERM straight to the
# workers (torchrun's child processes). Workers that saved and exited 0 make torchrun exit 0, and
# the batch script decides about the requeue from run_state.json (USR1 requeues, TERM does not).
# A failed worker ends this script with that worker's exit code (see launch_torchrun.py).
# A signal that comes before torchrun has started its workers is kept and delivered once they exist.
# TERM from Slurm itself (scancel, the time limit) reaches every process of the step, torchrun
# included: torchrun passes it to its workers, waits for them (they save a checkpoint and exit)
# and exits 143, so such a job ends FAILED / CANCELLED with its checkpoint written.
set -u

NPROC=${GPUS_PER_NODE:-1}
NNODES=${SLURM_JOB_NUM_NODES:-1}
NODE_RANK=${SLURM_NODEID:-0}
TORCHRUN_PID=""
PENDING=""

deliver() {  # pass a pending signal to torchrun's workers, if they exist yet
    [ -n "$PENDING" ] && [ -n "$TORCHRUN_PID" ] || return 0
    if pkill "-$PENDING" -P "$TORCHRUN_PID"; then
        echo "torchrun_node [node $NODE_RANK]: got SIG$PENDING, passing it to the workers of torchrun $TORCHRUN_PID"
        PENDING=""
    fi
}
# Trapped before anything starts: bash's default reaction to USR1 is to die.
trap 'PENDING=USR1; deliver' USR1
trap 'PENDING=TERM; deliver' TERM

# launch_torchrun.py is torchrun (torch.distributed.run) that reports a failed worker in one
# line and exits with that worker's own exit code (torchrun: a traceback, and always 1).
LAUNCHER="$(dirname "${BASH_SOURCE[0]}")/launch_torchrun.py"
(
    trap '' USR1   # inherited by torchrun; megamoe's workers install their own handler
    exec "${PYTHON:-python}" "$LAUNCHER" \
        --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --max-restarts 0 \
        -m megamoe train "$@"
) &
TORCHRUN_PID=$!

# `wait` returns early whenever a trapped signal arrives; while a signal is pending (no workers
# yet), poll once a second.
while kill -0 "$TORCHRUN_PID" 2>/dev/null; do
    deliver
    if [ -n "$PENDING" ]; then
        sleep 1
    else
        wait "$TORCHRUN_PID"
    fi
done
wait "$TORCHRUN_PID"
