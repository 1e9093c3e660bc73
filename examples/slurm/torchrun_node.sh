#!/bin/bash
# One per node, started by train_torchrun.sbatch through srun: runs torchrun with GPUS_PER_NODE
# workers of `python -m megamoe train "$@"` and passes stop signals on to the workers.
#
# Why not signal torchrun: its default reaction to USR1 is to die (orphaning the workers), and on
# TERM it kills the workers after a short grace period, possibly in the middle of a checkpoint.
# So torchrun starts with USR1 ignored, and this wrapper passes USR1 / TERM straight to the
# workers (torchrun's child processes). Workers that saved and exited 0 make torchrun exit 0, and
# the batch script decides about the requeue from run_state.json (USR1 requeues, TERM does not).
set -u

NPROC=${GPUS_PER_NODE:-1}
NNODES=${SLURM_JOB_NUM_NODES:-1}
NODE_RANK=${SLURM_NODEID:-0}

(
    trap '' USR1   # inherited by torchrun; megamoe's workers install their own handler
    exec "${PYTHON:-python}" -m torch.distributed.run \
        --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC" \
        --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --max-restarts 0 \
        -m megamoe train "$@"
) &
TORCHRUN_PID=$!

forward() {
    echo "torchrun_node [node $NODE_RANK]: got SIG$1, passing it to the workers of torchrun $TORCHRUN_PID"
    pkill "-$1" -P "$TORCHRUN_PID"
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

while true; do
    wait "$TORCHRUN_PID"
    kill -0 "$TORCHRUN_PID" 2>/dev/null || break
done
wait "$TORCHRUN_PID"
