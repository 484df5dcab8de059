"""The GPU benchmark of training throughput, run small on CPU so that it cannot rot between the
sessions that have a GPU: it trains, prints every figure, and its bf16-vs-FP8 comparison holds (the
FP8 run emulated here, as in test_fp8.py)."""

import re
import subprocess
import sys

from distributed_run import REPO, free_port, subprocess_environment


def test_train_throughput_runs_and_compares_fp8():
    env = subprocess_environment(dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                      MASTER_PORT=str(free_port())))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--model", "crystal-test",
                           "--seq-length", "64", "--iters", "4", "--warmup", "1", "--fp8", "--fp8-cpu-emulation",
                           "--num-workers", "0"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "device: CPU x 1 | model: hidden 64, 4 layers, seq 64, global batch 8" in out
    for run in ("fp32", "fp8"):
        assert re.search(rf"^{run}: step time [\d.]+ ms \| tokens/s/GPU [\d,]+ \| TFLOP/s/GPU [\d.]+$", out, re.M), out
    assert "fp8: hybrid delayed" in out and "fp8: off" in out  # each run's kernel path
    ratio = re.search(r"fp8 / fp32 tokens/s: ([\d.]+)x \| loss curves over 4 steps: max relative difference ([\d.]+)%", out)
    assert ratio and float(ratio.group(1)) > 0 and float(ratio.group(2)) < 1.0, out
