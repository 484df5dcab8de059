#!/usr/bin/env bash
# `make demo`: train crystal-tiny on this machine's CPU through the same path as the 7B (torchrun,
# Megatron-Core schedules, DDP, distributed optimizer, dist checkpointing, TensorBoard).
# Data: the embedded corpus that `make setup` builds (data/demo: Python's standard library as code, its
# reference manual, docstrings and licence texts as natural language), in the two phases of
# examples/phases/demo.yaml: text only, then 60% text / 40% code with FIM, switched inside the run.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-runs/demo}
NPROC=${NPROC:-2}
TRAIN_ITERS=${TRAIN_ITERS:-300}
rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"

OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29400}" \
  pretrain_crystal.py \
  --model crystal-tiny --seq-length 256 \
  --tokenizer-model data/demo/crystal_demo.model \
  --phases examples/phases/demo.yaml --num-workers 1 \
  --micro-batch-size 4 --global-batch-size 8 \
  --use-distributed-optimizer \
  --train-iters "$TRAIN_ITERS" \
  --eval-interval 100 --eval-samples-per-source 32 --log-interval 20 \
  --save "$RUN_DIR/checkpoints" --save-interval 150 \
  --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl"

echo "checkpoints: $RUN_DIR/checkpoints   TensorBoard: tensorboard --logdir $RUN_DIR/tensorboard"
