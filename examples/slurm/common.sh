# Shared by the examples/slurm/*.sbatch scripts (sourced, not run).
#
# What it provides:
#   megamoe_setup           defaults for the env-var parameters, MASTER_ADDR / MASTER_PORT, threads;
#                           traps USR1 / TERM from here on (see megamoe_trap_signals)
#   megamoe_train_args      the `python -m megamoe train` arguments (array TRAIN_ARGS)
#   megamoe_run_requeueable run a launcher (srun ... bash examples/slurm/task.sh ...) so that a
#                           stop signal ends in a checkpoint and a requeue, a finished or crashed
#                           run does not requeue, and a failed run ends with the exit code of the
#                           task that failed first (see task.sh), not srun's highest one
#   megamoe_check_time_limit  warns at start when the time limit leaves (almost) no training time
#                           before the stop signal (#SBATCH --signal=B:USR1@<offset>)
#
# The stop / requeue protocol:
#   1. Slurm signals before the time limit (#SBATCH --signal=B:USR1@120 signals this batch shell;
#      `scancel --signal=USR1 JOB` signals the job's steps, i.e. the training processes).
#   2. The batch shell traps USR1 / TERM and forwards the signal to the launcher (srun forwards it
#      to every task). megamoe finishes its current step, saves a checkpoint and writes
#      $OUT_DIR/run_state.json = {"state": "stopped", ...} (or "finished" at the last step).
#   3. When the launcher has exited: stopped by USR1 (run_state.json says so, or the batch shell
#      itself got USR1 and the run did not finish) -> `scontrol requeue $SLURM_JOB_ID`. The
#      requeued job runs this script again and megamoe resumes from the newest checkpoint in
#      $OUT_DIR (resume is on by default).
#   Only USR1 requeues. TERM (plain `scancel`, or the time limit without the early USR1) still
#   saves a checkpoint but ends the job: a cancelled job must stay cancelled. A crash (no signal)
#   is not requeued either, so a broken run cannot loop forever.

megamoe_log() { echo "megamoe-slurm [$(date +%H:%M:%S)] $*"; }

megamoe_setup() {
    # Parameters (environment variables, all optional):
    #   CONFIG        YAML config (default: the script's own default)
    #   OUT_DIR       run directory: checkpoints, metrics.jsonl, run_state.json; a requeued or
    #                 resubmitted job with the same OUT_DIR resumes there (default runs/$SLURM_JOB_NAME)
    #   EXTRA_ARGS    more train arguments, e.g. "--steps 1000 --parallel.ep 8" (word-split)
    #   PYTHON        interpreter (default python; e.g. a venv's bin/python)
    #   MAX_REQUEUES  stop requeueing after this many restarts (default 20)
    #   MASTER_PORT   rendezvous port (default derived from the job id)
    : "${OUT_DIR:=runs/${SLURM_JOB_NAME:-megamoe}}"
    : "${EXTRA_ARGS:=}"
    : "${PYTHON:=python}"
    : "${MAX_REQUEUES:=20}"
    export OUT_DIR CONFIG EXTRA_ARGS PYTHON
    # Rank 0 lives on the first node of the allocation; every node computes the same address.
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # One port per job, so jobs sharing a node do not collide; the same after a requeue.
    MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}  # as megamoe.parallel.launch
    export MASTER_ADDR MASTER_PORT
    # Torch would otherwise start one thread per core in every rank of a node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    mkdir -p "$OUT_DIR"
    MEGAMOE_SIGNALLED=""
    megamoe_trap_signals
    megamoe_log "job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_JOB_NUM_NODES:-1} node(s)" \
        "[${SLURM_JOB_NODELIST}], ${SLURM_NTASKS:-?} task(s), master ${MASTER_ADDR}:${MASTER_PORT}," \
        "config ${CONFIG:-<preset>}, out_dir ${OUT_DIR}"
    megamoe_check_time_limit
}

# ------------------------------------------------------------------ time limit vs. stop signal

_megamoe_seconds() {  # Slurm duration ([D-]HH:MM:SS, MM:SS, MM) -> seconds; fails if none
    local t=$1 days=0 h=0 m=0 sec=0
    case "$t" in *[!0-9:-]*|"") return 1 ;; esac   # UNLIMITED, Partition_Limit, NOT_SET...
    if [[ $t == *-* ]]; then days=${t%%-*}; t=${t#*-}; fi
    IFS=: read -r -a parts <<< "$t"
    case ${#parts[@]} in
        3) h=${parts[0]}; m=${parts[1]}; sec=${parts[2]} ;;
        2) if [ "$days" != 0 ]; then h=${parts[0]}; m=${parts[1]}; else m=${parts[0]}; sec=${parts[1]}; fi ;;
        1) if [ "$days" != 0 ]; then h=${parts[0]}; else m=${parts[0]}; fi ;;
        *) return 1 ;;
    esac
    echo $(( ((10#$days * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$sec ))
}

megamoe_signal_spec() {  # the job's --signal: $SBATCH_SIGNAL, else the batch script's #SBATCH line
    # Slurm does not tell a job its --signal; a `sbatch --signal=...` given on the command line
    # is not visible here (SBATCH_SIGNAL=B:USR1@120 sbatch ... is, and sbatch honours it too).
    if [ -n "${SBATCH_SIGNAL:-}" ]; then
        echo "$SBATCH_SIGNAL"
    else
        sed -n 's/^#SBATCH[[:space:]]\{1,\}--signal[=[:space:]]\{1,\}\([^[:space:]]*\).*/\1/p' \
            "${MEGAMOE_BATCH_SCRIPT:-$0}" 2>/dev/null | tail -n 1
    fi
}

megamoe_check_time_limit() {
    # A stop signal due before the job has had time to train (e.g. --time=2 with B:USR1@120)
    # makes every allocation start, train a few seconds, save and requeue: say so at start.
    local spec offset sig limit_s limit window
    spec=$(megamoe_signal_spec)
    [ -n "$spec" ] || return 0
    offset=60                                     # Slurm's default when @offset is left out
    [[ $spec == *@* ]] && offset=${spec##*@}
    sig=${spec%@*}; sig=${sig#*:}
    [[ $offset =~ ^[0-9]+$ ]] || return 0
    limit=$(scontrol show job "${SLURM_JOB_ID:-}" 2>/dev/null | sed -n 's/.*TimeLimit=\([^[:space:]]*\).*/\1/p')
    limit_s=$(_megamoe_seconds "$limit") || return 0
    window=$(( limit_s - offset ))
    # Slurm may send the signal up to 60 s early; under ~3 minutes a requeue cycle is mostly
    # start-up and checkpointing.
    if [ "$window" -lt "${MEGAMOE_MIN_TRAIN_S:-180}" ]; then
        megamoe_log "WARNING: time limit ${limit_s} s, stop signal SIG${sig} ${offset} s before the end" \
            "(--signal=${spec}): that leaves $(( window > 0 ? window : 0 )) s of training per allocation" \
            "(Slurm may signal up to 60 s earlier) before it saves and requeues; raise --time or lower the offset"
    fi
}

megamoe_train_args() {
    TRAIN_ARGS=()
    [ -n "${CONFIG:-}" ] && TRAIN_ARGS+=(--config "$CONFIG")
    # Progress bars do not belong in log files: plain lines every log_interval steps instead.
    # shellcheck disable=SC2206  # EXTRA_ARGS is meant to be word-split
    TRAIN_ARGS+=(--out_dir "$OUT_DIR" --progress false $EXTRA_ARGS)
}

_megamoe_forward() {  # signal: called from the trap
    MEGAMOE_SIGNALLED=$1
    if [ -z "${MEGAMOE_CHILD:-}" ]; then
        megamoe_log "batch shell got SIG$1 before the training started"
    elif [ "$1" = TERM ] && [ -n "${SLURM_JOB_ID:-}" ] && command -v scancel >/dev/null; then
        # srun answers TERM by killing its step at once (no time to save): send TERM to the
        # step's processes through Slurm instead (they then have KillWait seconds to save).
        megamoe_log "batch shell got SIGTERM: sending it to the job's steps to save and stop"
        scancel --signal=TERM "$SLURM_JOB_ID"
    else
        # srun passes USR1 on to its tasks.
        megamoe_log "batch shell got SIG$1: forwarding it to the training (pid $MEGAMOE_CHILD) to save and stop"
        kill -s "$1" "$MEGAMOE_CHILD" 2>/dev/null
    fi
}

megamoe_trap_signals() {
    # Installed by megamoe_setup, i.e. early: bash's default reaction to USR1 is to die, and a
    # batch shell killed that way could neither pass the signal on nor requeue the job.
    trap '_megamoe_forward USR1' USR1
    trap '_megamoe_forward TERM' TERM
}

# ----------------------------------------------------------------- which task failed first

megamoe_first_failure() {  # dir -> "<exit code> <task>" of the first task that failed by itself
    # task.sh notes "<end ns> <code> <TERM|->" per failed task. Tasks that got SIGTERM were
    # stopped (by srun after another task failed, or by a cancel), so they do not count.
    local f
    for f in "$1"/task_*; do
        [ -f "$f" ] || continue
        printf '%s %s\n' "$(cat "$f")" "${f##*/task_}"
    done | awk '$3 != "TERM" && $2 != 0 {print $1, $2, $4}' | sort -n | head -n 1 | cut -d' ' -f2-
}

megamoe_run_requeueable() {  # launcher command...
    local state_file="$OUT_DIR/run_state.json" pid rc state step signum first
    rm -f "$state_file"  # a stale file from an earlier run must not trigger a requeue
    # Where task.sh notes failed tasks (OUT_DIR is on a file system every node sees).
    export MEGAMOE_TASK_EXITS="$OUT_DIR/.task_exits"
    rm -rf "$MEGAMOE_TASK_EXITS" && mkdir -p "$MEGAMOE_TASK_EXITS"
    MEGAMOE_CHILD=""
    megamoe_trap_signals
    if [ -n "${MEGAMOE_SIGNALLED:-}" ]; then
        megamoe_log "not starting the training: SIG$MEGAMOE_SIGNALLED came first"
        rc=$((128 + $(kill -l "$MEGAMOE_SIGNALLED")))
    else
        "$@" &
        pid=$!
        MEGAMOE_CHILD=$pid
        # A signal that came while the launcher was being started has not been passed on yet.
        [ -n "${MEGAMOE_SIGNALLED:-}" ] && kill -s "$MEGAMOE_SIGNALLED" "$pid" 2>/dev/null
        # `wait` returns early whenever a trapped signal arrives: wait until the launcher is
        # gone, then once more for its exit status (bash keeps the status of a finished job).
        while true; do
            wait "$pid"
            kill -0 "$pid" 2>/dev/null || break
        done
        wait "$pid"
        rc=$?
    fi
    trap - USR1 TERM
    state=$(sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' "$state_file" 2>/dev/null)
    step=$(sed -n 's/.*"step": *\([0-9]*\).*/\1/p' "$state_file" 2>/dev/null)
    signum=$(sed -n 's/.*"signal": *\([0-9]*\).*/\1/p' "$state_file" 2>/dev/null)
    if [ "$rc" != 0 ]; then
        first=$(megamoe_first_failure "$MEGAMOE_TASK_EXITS")
        if [ -n "$first" ] && [ "${first%% *}" != "$rc" ]; then
            megamoe_log "task ${first#* } failed first, with exit code ${first%% *} (the launcher" \
                "returned $rc, the highest code of all tasks, those it stopped after the failure included)"
            rc=${first%% *}
        fi
    fi
    megamoe_log "training exited with code $rc, state '${state:-unknown}' at step ${step:-?}"
    if { [ "$state" = stopped ] && [ "$signum" = "$(kill -l USR1)" ]; } \
            || { [ "$MEGAMOE_SIGNALLED" = USR1 ] && [ "$state" != finished ]; }; then
        if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
            megamoe_log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES)"
            return 1
        fi
        megamoe_log "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint in $OUT_DIR"
        # The job goes back to the queue (same id, SLURM_RESTART_COUNT + 1) once this allocation
        # ends; Slurm holds it for a short while (AuthInfo cred_expire, default 120 s) first.
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$rc"
}
