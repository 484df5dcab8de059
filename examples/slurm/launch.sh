# shellcheck shell=bash
# Shared by examples/crystal_*.sh (sourced, after they set their defaults): derives the launch from SLURM's
# environment and runs one torchrun per node through srun, all nodes rendezvousing on the first.
# DRY_RUN=1 (or --dry-run) prints the commands instead of running them; it needs no SLURM (placeholder
# host names where there is no allocation).
# A job stopped by SLURM's signal before its time limit saves, and then requeues itself (scontrol requeue),
# at most MAX_REQUEUES times; a job that finished, or failed, is not requeued.
# Within the allocation, torchrun restarts every worker in place when one dies or the job ends on the
# distributed timeout (--max-restarts MAX_RESTARTS), each attempt resuming from the last complete checkpoint
# in CKPT_DIR; a failure that repeats before the next checkpoint stops the job (pretrain_crystal.py's
# --max-restarts-from-one-checkpoint), which then fails here in one line. docs/cluster.md: what heals.

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
# Defaults the recipes share; the calling script sets MODEL, CKPT_DIR, TP, PP, MICRO_BATCH, SAVE_INTERVAL.
DATA_DIR=${DATA_DIR:-/data/crystal}                  # holds the tokenizer; the corpus paths are in PHASES
PHASES=${PHASES:-examples/phases/crystal.yaml}
TOKENIZER=${TOKENIZER:-$DATA_DIR/tokenizer/crystal.model}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
KEEP_CHECKPOINTS=${KEEP_CHECKPOINTS:-3}
LOG_INTERVAL=${LOG_INTERVAL:-10}
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAX_REQUEUES=${MAX_REQUEUES:-20}
MAX_RESTARTS=${MAX_RESTARTS:-3}   # torchrun's in-place restarts per allocation (0: a failure ends the job)
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then DRY_RUN=1; fi
done
if [ "${DRY_RUN:-0}" != "1" ] && ! command -v scontrol >/dev/null; then
  echo "error: no scontrol: run inside a SLURM allocation (sbatch $0), or preview with DRY_RUN=1" >&2
  exit 2
fi
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol >/dev/null; then
    # Not `| head -n 1`: under pipefail, scontrol dying of SIGPIPE after head exits would fail the job.
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${HOSTS[0]:?"scontrol show hostnames $SLURM_JOB_NODELIST gave no host"}
  else
    MASTER_ADDR="<first-node>"   # a dry run outside an allocation: SLURM names the hosts at launch
  fi
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}

WORLD=$((NODES * GPUS_PER_NODE))
if [ $((WORLD % (TP * PP))) -ne 0 ]; then
  echo "error: $NODES node(s) x $GPUS_PER_NODE GPUs = $WORLD is not a multiple of TP x PP = $TP x $PP" >&2
  exit 2
fi
DP=$((WORLD / (TP * PP)))

# NCCL and CUDA settings for Megatron-Core on InfiniBand clusters; each can be overridden from outside.
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}   # TP/SP overlap needs in-order kernels
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

TRAIN_ARGS=(
  --model "$MODEL" --tokenizer-model "$TOKENIZER" --phases "$PHASES"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --use-distributed-optimizer --sequence-parallel --bf16
  --micro-batch-size "$MICRO_BATCH" --seq-length "$SEQ_LENGTH"
  --save "$CKPT_DIR" --load "$CKPT_DIR" --save-interval "$SAVE_INTERVAL" --keep-last-checkpoints "$KEEP_CHECKPOINTS"
  --tensorboard-dir "$CKPT_DIR/tensorboard" --log-interval "$LOG_INTERVAL" --num-workers 2
)
# EXTRA_ARGS: more pretrain_crystal.py flags, split on spaces (e.g. "--train-iters 1000 --eval-interval 500").
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
TRAIN_ARGS+=("${EXTRA[@]}")

# One task per node. The torchrun agent ignores SIGUSR1 (SLURM's --signal reaches every process of the
# step): the training ranks catch it, finish the step, save and exit 0.
NODE_COMMAND="trap '' USR1; cd $(printf '%q' "$REPO") && exec torchrun --nnodes $NODES --nproc-per-node $GPUS_PER_NODE \
--node-rank \"\$SLURM_NODEID\" --master-addr $MASTER_ADDR --master-port $MASTER_PORT --max-restarts $MAX_RESTARTS \
pretrain_crystal.py \
$(printf '%q ' "${TRAIN_ARGS[@]}")"
# The flags checked once, here, before torchrun (the same validation, no process group): a mistake is one line
# per job, not a line per rank and torchrun's traceback per node. PYTHON: the environment torchrun runs in.
CHECK=(env WORLD_SIZE="$WORLD" "${PYTHON:-python}" pretrain_crystal.py --check-args "${TRAIN_ARGS[@]}")
SRUN=(srun --nodes "$NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c "$NODE_COMMAND")

echo "crystal-megatron: $NODES node(s) x $GPUS_PER_NODE GPUs = $WORLD ranks: TP $TP x PP $PP x DP $DP;" \
     "rendezvous $MASTER_ADDR:$MASTER_PORT; checkpoints $CKPT_DIR"
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "cd $(printf '%q' "$REPO") && $(printf '%q ' "${CHECK[@]}")"
  echo "mkdir -p $CKPT_DIR"
  printf '%q ' "${SRUN[@]}"
  echo
  for ((node = 0; node < NODES; node++)); do
    echo "node $node: ${NODE_COMMAND//\"\$SLURM_NODEID\"/$node}"
  done
  exit 0
fi
(cd "$REPO" && "${CHECK[@]}") || exit 2
mkdir -p "$CKPT_DIR"   # an empty --load directory starts fresh; a requeued job finds its checkpoints here
STOP_MARKER="$CKPT_DIR/stopped_by_signal"   # pretrain_crystal.py writes it after a signal-triggered save
GAVE_UP="$CKPT_DIR/restarts/stopped"        # and this where its restarts kept failing at one checkpoint
rm -f "$STOP_MARKER" "$GAVE_UP"
status=0
"${SRUN[@]}" || status=$?
# The workers exit 0 there (the one exit torchrun does not restart): the job's failure is said here.
if [ -f "$GAVE_UP" ]; then
  echo "crystal-megatron: not restarted again, not requeued: $(cat "$GAVE_UP")" >&2
  exit 1
fi
# SLURM's --requeue does not requeue a job that exited 0, which a signal-triggered save does.
if [ -f "$STOP_MARKER" ]; then
  if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
    echo "crystal-megatron: stopped by a signal and saved at iteration $(cat "$STOP_MARKER"): requeueing job" \
         "${SLURM_JOB_ID:?} ($((${SLURM_RESTART_COUNT:-0} + 1)) of MAX_REQUEUES=$MAX_REQUEUES)"
    scontrol requeue "$SLURM_JOB_ID"
  else
    echo "crystal-megatron: stopped by a signal, not requeued: $MAX_REQUEUES requeues already (MAX_REQUEUES)" >&2
  fi
fi
# A failed training fails the job (a script sourcing this one goes on only after a success or a requeue).
if [ "$status" -ne 0 ]; then exit "$status"; fi
