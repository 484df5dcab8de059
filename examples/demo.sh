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
# Downstream tasks scored by log-likelihood, all of them at every evaluation (the final one included): their
# requests are packed several to a row, which keeps the evaluations under a tenth of the training time
# here (the log line says how much). The end evaluates only what the loop cannot: generation.
LOOP_TASKS=${LOOP_TASKS:-arc_easy:32,piqa:32,hellaswag:32,lambada:32,humaneval_gold:16,infill_single_gold:16}
rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
# The corpus is built from this machine's Python (tools/build_demo_corpus.py): what it was built from comes
# first, so that two machines' figures can be compared (README, "Which figures are machine-dependent").
.venv/bin/python tools/build_demo_corpus.py --describe data/demo | tee "$RUN_DIR/corpus.txt"

TRAIN_ARGS=(
  --model crystal-tiny --seq-length 256
  --tokenizer-model data/demo/crystal_demo.model
  --phases examples/phases/demo.yaml --num-workers 1
  --micro-batch-size 4 --global-batch-size 8
  --use-distributed-optimizer
  --train-iters "$TRAIN_ITERS"
  --eval-interval 100 --eval-samples-per-source 32 --log-interval 20
  --eval-tasks "$LOOP_TASKS"
  --save "$RUN_DIR/checkpoints" --save-interval 150
  --tensorboard-dir "$RUN_DIR/tensorboard" --metrics-jsonl "$RUN_DIR/metrics.jsonl"
)
# Checked once in this process before torchrun: a mistake (e.g. in LOOP_TASKS) is one line, not one per rank.
WORLD_SIZE=$NPROC .venv/bin/python pretrain_crystal.py --check-args "${TRAIN_ARGS[@]}"
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node "$NPROC" --master-port "${MASTER_PORT:-29400}" \
  pretrain_crystal.py "${TRAIN_ARGS[@]}"

# The final checkpoint's generation tasks (converted in memory): derived single-line infilling by exact
# match. Running the generated programs (HumanEval pass@1, infilling pass@1) needs ALLOW_CODE_EXECUTION=1
# make demo: nothing model-written runs otherwise.
GENERATION=infill_single:100
EXECUTE=()
if [ "${ALLOW_CODE_EXECUTION:-0}" = 1 ]; then
  GENERATION=infill_single:100,humaneval:40
  EXECUTE=(--allow-code-execution)
fi
# 32 rows a generate() call: the model is small enough that wider batches keep the cores busy.
.venv/bin/python tools/evaluate.py --checkpoint "$RUN_DIR/checkpoints" --output-dir "$RUN_DIR/eval" \
  --results "$RUN_DIR/checkpoints/eval_results.jsonl" --run-name demo \
  --tasks "$GENERATION" --max-new-tokens 64 --batch-size 32 ${EXECUTE[@]+"${EXECUTE[@]}"}
.venv/bin/python tools/eval_report.py "$RUN_DIR/checkpoints" --output "$RUN_DIR/report"

echo "checkpoints: $RUN_DIR/checkpoints   TensorBoard: tensorboard --logdir $RUN_DIR/tensorboard"
echo "evaluation: $RUN_DIR/report/report.md, plots in $RUN_DIR/report/plots"
