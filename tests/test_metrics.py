"""The GPU figures of the training log line, with the device substituted: TFLOP/s per GPU from the
Megatron-LM FLOP count, and MFU against the peak of the precision the GEMMs run in."""

import json
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_ext.kernels.selection import Probes, select
from megatron_ext.training import metrics

H100 = "NVIDIA H100 80GB HBM3"


def test_peaks_by_device_and_precision():
    assert metrics.peak_tflops(H100) == 989.0 and metrics.peak_tflops(H100, fp8=True) == 1979.0
    assert metrics.peak_tflops("NVIDIA H100 PCIe", fp8=True) == 1513.0  # not the SXM part's
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB", fp8=True) is None  # no FP8 tensor cores
    assert metrics.peak_tflops("Tesla V100-SXM2-32GB") is None


@pytest.mark.parametrize("fp8", [False, True])
def test_log_line_on_a_gpu(monkeypatch, fp8):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: H100)
    clock = iter([0.0, 2e-6])  # the logger's start, then the second step's end: 2 us for 2 steps
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    path = select(
        fp8_format="hybrid" if fp8 else None, probes=Probes(gpu_name=H100, compute_capability=(9, 0), triton=True)
    )
    model = SimpleNamespace(hidden_size=64, ffn_hidden_size=128, num_layers=2, seq_length=32)
    scalars = {}
    writer = SimpleNamespace(add_scalar=lambda name, value, step: scalars.__setitem__(name, value))
    logger = metrics.TrainingLogger(
        model, padded_vocab=256, world_size=2, log_interval=2, train_iters=4, fp8=path.fp8 is not None, writer=writer
    )
    assert logger.step(1, 5.0, 1e-3, 0.5, consumed_samples=8, global_batch_size=8) is None
    line = logger.step(2, 4.0, 1e-3, 0.5, consumed_samples=16, global_batch_size=8)
    # Per token: 3 x (2 layers x (2 (4 h^2 + 3 h f) + 4 s h) + 2 h V) = 638,976 FLOPs; 2 x 8 x 32 tokens in
    # 2 us over 2 GPUs: 81.79 TFLOP/s each; of 989 (bf16) or 1979 (fp8) TFLOP/s.
    tflops = 512 / 2e-6 * 638976 / 2 / 1e12
    assert f"TFLOP/s/GPU {tflops:.1f}" in line
    mfu = re.search(r"MFU ([\d.]+)% \((\w+) peak(?:; ([\d.]+)% of bf16 peak)?\)", line)
    assert mfu.group(2) == ("fp8" if fp8 else "bf16")
    assert float(mfu.group(1)) == pytest.approx(100 * tflops / (1979.0 if fp8 else 989.0), abs=0.05)
    if fp8:  # the bf16-peak figure beside it, as peers quote FP8 runs
        assert float(mfu.group(3)) == pytest.approx(100 * tflops / 989.0, abs=0.05)
    assert scalars["tflops-per-gpu"] == pytest.approx(tflops)  # and TensorBoard gets the same figures
    assert scalars["mfu-percent"] == pytest.approx(float(mfu.group(1)), abs=0.05)


def test_saves_and_evaluations_stay_out_of_step_time():
    """Two 100 ms steps with a 2.5 s save between them: 100 ms steps, not 1.35 s; TensorBoard gets the step
    time and the consumed tokens, as the log line shows them."""
    clock = iter([0.0, 2.7])  # the window's start; the second step's end (0.1 + 2.5 s save + 0.1)
    model = SimpleNamespace(hidden_size=64, ffn_hidden_size=128, num_layers=2, seq_length=32)
    scalars = {}
    writer = SimpleNamespace(add_scalar=lambda name, value, step: scalars.__setitem__(name, value))
    logger = metrics.TrainingLogger(
        model, padded_vocab=256, world_size=1, log_interval=2, train_iters=10, fp8=False, writer=writer
    )
    real = metrics.time.perf_counter
    metrics.time.perf_counter = lambda: next(clock)
    try:
        logger._reset(metrics.time.perf_counter())
        assert logger.step(1, 5.0, 1e-3, 0.5, consumed_samples=8, global_batch_size=8) is None
        logger.exclude(2.5)
        line = logger.step(2, 4.0, 1e-3, 0.5, consumed_samples=16, global_batch_size=8)
    finally:
        metrics.time.perf_counter = real
    assert "step time 100.0 ms" in line and "tokens/s 2,560" in line and "ETA 0:00:00" in line, line
    assert scalars["step-time-ms"] == pytest.approx(100.0) and scalars["consumed-tokens"] == 16 * 32
    assert scalars["tokens-per-second"] == pytest.approx(2560.0)


@pytest.mark.launch
def test_profile_writes_a_chrome_trace_of_the_chosen_steps(tmp_path):
    from helpers.distributed_run import TINY_RUN, train

    flags = ["--train-iters", "3", "--profile", "--profile-step-start", "1", "--profile-step-end", "2"]
    out = train(2, TINY_RUN + flags + ["--profile-ranks", "1", "--tensorboard-dir", str(tmp_path)])
    # Kineto's own C++ log says profiler_start / profiler_stop on stderr; nothing else may be there.
    assert all("SyncActivityProfilerHandler" in line for line in out.stderr.splitlines()), out.stderr[-2000:]
    (trace,) = list(tmp_path.glob("profile_*.json"))
    assert trace.name == "profile_rank1_steps2-2.json"  # the chosen rank, steps (1, 2]
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
