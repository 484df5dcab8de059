# shellcheck shell=bash
# Shared by examples/crystal_*.sh (sourced, after they set their defaults): derives the launch from SLURM's
# environment and runs one torchrun per node through srun, all nodes rendezvousing on the first.
# DRY_RUN=1 (or --dry-run) prints the commands instead of running them.

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
NODELIST=${SLURM_JOB_NODELIST:-localhost}
if [ -z "${MASTER_ADDR:-}" ]; then
  # Not `| head -n 1`: under pipefail, scontrol dying of SIGPIPE after head exits would fail the job.
  mapfile -t HOSTS < <(scontrol show hostnames "$NODELIST")
  MASTER_ADDR=${HOSTS[0]:?"scontrol show hostnames $NODELIST gave no host"}
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then DRY_RUN=1; fi
done

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
--node-rank \"\$SLURM_NODEID\" --master-addr $MASTER_ADDR --master-port $MASTER_PORT pretrain_crystal.py \
$(printf '%q ' "${TRAIN_ARGS[@]}")"
SRUN=(srun --nodes "$NODES" --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c "$NODE_COMMAND")

echo "crystal-megatron: $NODES node(s) x $GPUS_PER_NODE GPUs = $WORLD ranks: TP $TP x PP $PP x DP $DP;" \
     "rendezvous $MASTER_ADDR:$MASTER_PORT; checkpoints $CKPT_DIR"
if [ "${DRY_RUN:-0}" = "1" ]; then
  echo "mkdir -p $CKPT_DIR"
  printf '%q ' "${SRUN[@]}"
  echo
  for ((node = 0; node < NODES; node++)); do
    echo "node $node: ${NODE_COMMAND//\"\$SLURM_NODEID\"/$node}"
  done
  exit 0
fi
mkdir -p "$CKPT_DIR"   # an empty --load directory starts fresh; a requeued job finds its checkpoints here
"${SRUN[@]}"
