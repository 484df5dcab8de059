#!/usr/bin/env bash
# The one GPU check (one H100 / H200, under 8 minutes): whoever has a GPU runs it first and puts its summary
# table in the closing note.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default runs/gpu_check
#
# 1. the kernel tests on CUDA (Triton kernels compiled, FP8 linear, the log line's MFU);
# 2. benchmarks/kernels.py: the Triton kernels against eager PyTorch and the copy bandwidth;
# 3. the 7B's width (hidden 4096, FFN 10922, seq 2048) at 4 layers: bf16 and FP8 in one process (tokens/s,
#    TFLOP/s, MFU), and bf16 with full recomputation: peak memory against the start-up report's prediction;
# 4. benchmarks/checkpoint_io.py at hidden 1024 (51M parameters): a synchronous and an asynchronous save's blocking time;
# then one summary table (benchmarks/gpu_check_summary.py). Each step's whole output is in OUT_DIR/<step>.log. Needs megatron-core
# (MCORE_WHEEL=path/to/megatron_core-0.16.1-*.whl installs it with --no-deps where it is missing).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check.sh: error: $PY has no torch that sees a CUDA device; this check is for a GPU machine" >&2
    exit 2
fi
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    if [ -z "${MCORE_WHEEL:-}" ]; then
        echo "gpu_check.sh: error: megatron-core is not installed; set MCORE_WHEEL to its wheel" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-deps "$MCORE_WHEEL" || exit 2
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

status=()
step() {  # step NAME TIMEOUT_S COMMAND...: run it, keep its log, note pass / fail / time
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    status+=("$name rc=$rc $((SECONDS - started))s")
    echo "== $name: exit $rc in $((SECONDS - started)) s (log: $OUT/$name.log)"
}

"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__, '| CUDA', torch.version.cuda)" | tee "$OUT/device.log"
step kernel_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_fp8.py tests/test_metrics.py
step kernels 60 "$PY" benchmarks/kernels.py
LAYERS=(--model crystal-7b --num-layers 4 --global-batch-size 8 --num-workers 0)
step throughput_fp8 150 "$PY" -m torch.distributed.run --nproc-per-node 1 benchmarks/train_throughput.py \
    "${LAYERS[@]}" --iters 30 --warmup 10 --fp8
step throughput_recompute 90 "$PY" -m torch.distributed.run --nproc-per-node 1 benchmarks/train_throughput.py \
    "${LAYERS[@]}" --iters 12 --warmup 4 --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
step checkpoint_io 90 "$PY" -m torch.distributed.run --nproc-per-node 1 benchmarks/checkpoint_io.py \
    --hidden-sizes 1024 --repeats 2 --dir "$OUT/checkpoints"

"$PY" benchmarks/gpu_check_summary.py "$OUT" "${status[@]}"
