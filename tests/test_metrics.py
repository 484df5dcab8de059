"""The devices' peaks that MFU is measured against (the log line itself: test_callbacks.py), and the
profiler's trace of the chosen steps."""

import json

import pytest

from megatron_ext.training import metrics

H100 = "NVIDIA H100 80GB HBM3"


def test_peaks_by_device_and_precision():
    assert metrics.peak_tflops(H100) == 989.0 and metrics.peak_tflops(H100, fp8=True) == 1979.0
    assert metrics.peak_tflops("NVIDIA H100 PCIe", fp8=True) == 1513.0  # not the SXM part's
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert metrics.peak_tflops("NVIDIA A100-SXM4-80GB", fp8=True) is None  # no FP8 tensor cores
    assert metrics.peak_tflops("Tesla V100-SXM2-32GB") is None


@pytest.mark.launch
def test_profile_writes_a_chrome_trace_of_the_chosen_steps(tmp_path):
    from helpers.distributed_run import TINY_RUN, train

    flags = ["--train-iters", "3", "--profile", "--use-pytorch-profiler", "--profile-step-start", "1"]
    flags += ["--profile-step-end", "2"]
    out = train(2, TINY_RUN + flags + ["--profile-ranks", "1", "--tensorboard-dir", str(tmp_path)])
    # Kineto's own C++ log says profiler_start / profiler_stop on stderr; nothing else may be there.
    assert all("SyncActivityProfilerHandler" in line for line in out.stderr.splitlines()), out.stderr[-2000:]
    (trace,) = list(tmp_path.glob("profile_*.json"))
    assert trace.name == "profile_rank1_steps2-2.json"  # the chosen rank, steps (1, 2]
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)
