# Shared body of the sbatch scripts in this folder; they `source` it after setting CONFIG (and
# optionally OVERRIDES). Runs in the batch shell, on the first node of the allocation:
#
# * one srun task per node, each a torchrun starting GPUS_PER_NODE trainers, all meeting at a c10d
#   rendezvous on the first node;
# * srun gets --cpus-per-task explicitly (since Slurm 22.05 srun no longer inherits it from sbatch,
#   and without it the 8 trainers and their SGLang processes share about one core);
# * a shared output directory (OUTPUT_ROOT, default <submit dir>/runs) keyed by the job name, so a
#   requeued or resubmitted job finds its checkpoints; every launch passes --resume (a fresh start
#   when there is no checkpoint yet);
# * preemption: the scripts ask Slurm for USR1 some minutes before the time limit (--signal=B:USR1@...)
#   and may be sent SIGTERM at preemption. The trap forwards the signal to srun, which forwards it to
#   every torchrun; torchrun (--signals-to-handle) forwards it to its trainers, which write a checkpoint
#   at the end of their current step and exit; the batch shell then requeues the job
#   (`scontrol requeue`, allowed by --requeue), and the new run continues with --resume.
#
# * COMMAND=sft (the sft_*.sbatch scripts) runs care-sft instead of care-train, with the same --resume and
#   requeue: care-sft checkpoints into <OUT>/sft_checkpoints (every train.sft_save_every steps and at the
#   signal); the policy lands in <OUTPUT_ROOT>/<job-name>/sft, which is the RL recipes' train.init_from
#   when the job is named after the SFT recipe's output directory (<model>-sft) and OUTPUT_ROOT is the
#   default runs/.
#
# Environment: CONFIG (required), COMMAND (train or sft; default train), OVERRIDES (extra section.field=value
# words), GPUS_PER_NODE (8),
# OUTPUT_ROOT, MASTER_PORT (29500), SHUTDOWN_TIMEOUT (seconds torchrun waits for the checkpoint after
# forwarding the signal before it kills the trainers; keep it below the --signal lead time).

: "${CONFIG:?set CONFIG to a config file before sourcing launch.sh}"
: "${SLURM_JOB_ID:?launch.sh runs inside a Slurm allocation (sbatch)}"
SUBMIT_DIR=${SLURM_SUBMIT_DIR:-$PWD}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODES=${SLURM_JOB_NUM_NODES:-1}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
OUTPUT_ROOT=${OUTPUT_ROOT:-$SUBMIT_DIR/runs}
OUT="$OUTPUT_ROOT/${SLURM_JOB_NAME:-care}"
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-540}
COMMAND=${COMMAND:-train}
case "$COMMAND" in
  train) RESUME=--resume; CHECKPOINTS=$OUT/checkpoints ;;
  sft) RESUME=--resume; CHECKPOINTS=$OUT/sft_checkpoints ;;
  *) echo "launch.sh: COMMAND must be train or sft, got '$COMMAND'" >&2; exit 2 ;;
esac

mkdir -p "$OUT" "$SUBMIT_DIR/logs"
cd "$SUBMIT_DIR"
export SRUN_CPUS_PER_TASK=$CPUS_PER_TASK     # the same, for any srun a user adds
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1          # Megatron TP/SP overlap needs in-order kernel queues
export TOKENIZERS_PARALLELISM=false
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}

PREEMPTED=0
SRUN_PID=
forward_preemption() {
  PREEMPTED=1
  echo "launch.sh: $1 received; asking the trainers to checkpoint (requeue after they exit)"
  [[ -n "$SRUN_PID" ]] && kill -USR1 "$SRUN_PID" 2>/dev/null
}
trap 'forward_preemption USR1' USR1
trap 'forward_preemption TERM' TERM

# shellcheck disable=SC2086  # OVERRIDES is a list of words on purpose, RESUME one word or none
srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" \
  --output="$SUBMIT_DIR/logs/%x-%j-node%n.out" \
  torchrun --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout="$SHUTDOWN_TIMEOUT" \
    -m care_megatron.cli "$COMMAND" --config "$CONFIG" $RESUME --no-progress train.output_dir="$OUT" ${OVERRIDES:-} &
SRUN_PID=$!
STATUS=0
# `wait` returns early (status > 128) when a trapped signal arrives: wait until srun has really exited
while :; do
  wait "$SRUN_PID" && STATUS=0 || STATUS=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
if (( PREEMPTED )); then
  echo "launch.sh: trainers exited ($STATUS); requeueing job $SLURM_JOB_ID to resume from $CHECKPOINTS"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$STATUS"
