"""The run's one metrics stream, and what it measures of the training itself.

Sources record (name, value) for the step in progress (`Metrics.record`): the loop's step (lm loss,
learning-rate, grad-norm, lm loss by source/NAME, tokens by source/NAME, data-hash), the throughput meter
here (tokens-per-second, step-time-ms, consumed-tokens, and on a GPU tflops-per-gpu and mfu-percent, at
log steps), the data feed (data/...), the side work of callbacks (side-work-seconds). At the end of each
step `log_step` hands the step's values to every sink (training/metric_sinks.py: the console line,
TensorBoard, --metrics-jsonl); an evaluation's figures go to them through `log_figures`. Sinks exist on
the logging rank only. OLMo-core's record_metric / log_metrics is the model.
"""

from __future__ import annotations

import time

import torch

from megatron_ext.model.crystal_config import CrystalConfig

# Dense tensor-core peaks in TFLOP/s (the data sheets' figures without sparsity): device-name fragment,
# bf16, fp8 (None: no FP8 tensor cores). The first fragment the device's name contains wins, so the
# PCIe / NVL parts come before the SXM ones.
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 1513.0),
    ("H100 NVL", 835.0, 1671.0),
    ("H200 NVL", 835.0, 1671.0),
    ("H100", 989.0, 1979.0),
    ("H200", 989.0, 1979.0),
    ("A100", 312.0, None),
    ("L40S", 362.0, 733.0),
    ("A10G", 70.0, None),
]


def peak_tflops(device_name: str, fp8: bool = False) -> float | None:
    """The device's dense peak for the precision its GEMMs run in (MFU is measured against it)."""
    return next(
        ((fp8_peak if fp8 else bf16) for fragment, bf16, fp8_peak in PEAK_TFLOPS if fragment in device_name), None
    )


def device_peak_tflops(fp8: bool = False) -> float | None:
    return peak_tflops(torch.cuda.get_device_name(), fp8) if torch.cuda.is_available() else None


def mfu_percent(tflops: float, fp8: bool = False) -> float | None:
    peak = device_peak_tflops(fp8)
    return 100 * tflops / peak if peak else None


def mfu_text(tflops: float, fp8: bool) -> str | None:
    """The MFU against the peak of the GEMMs' precision, named; an FP8 run's against the bf16 peak
    beside it, as peers quote FP8 runs, so that no denominator is guessed. None: the peak is unknown."""
    percent = mfu_percent(tflops, fp8)
    if percent is None:
        return None
    if fp8:
        return f"MFU {percent:.1f}% (fp8 peak; {mfu_percent(tflops):.1f}% of bf16 peak)"
    return f"MFU {percent:.1f}% (bf16 peak)"


def training_flops_per_token(crystal: CrystalConfig, seq_length: int, padded_vocab: int) -> float:
    """Forward + backward matmul FLOPs per token (x3 forward), attention counted without the causal
    halving, as Megatron-LM counts it."""
    h, f, layers = crystal.hidden_size, crystal.ffn_hidden_size, crystal.num_layers
    per_layer = 2 * (4 * h * h + 3 * h * f) + 4 * seq_length * h
    return 3 * (layers * per_layer + 2 * h * padded_vocab)


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


SIDE_WORK = "side-work-seconds"  # recorded (summed) by saves and evaluations; kept out of the step time


class Metrics:
    """The stream: values recorded for the step in progress, handed to the sinks once per step."""

    def __init__(self, sinks=()):
        self.sinks = list(sinks)
        self.values: dict[str, float] = {}

    def record(self, name: str, value, reduce: str = "last") -> None:
        """reduce: "last" keeps the latest value of the step, "sum" adds them up (side work)."""
        self.values[name] = self.values.get(name, 0) + value if reduce == "sum" else value

    def log_step(self, step: int, context: dict) -> None:
        """context: what is not a number (the phase), and what the console needs besides the values."""
        for sink in self.sinks:
            sink.write_step(step, self.values, context)
        self.values = {}

    def log_figures(self, step: int, figures: list, context: dict) -> None:
        """An evaluation's figures (evaluation/eval_set.Figure), with the context its records carry."""
        for sink in self.sinks:
            sink.write_figures(step, figures, context)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class Throughput:
    """tokens/s, step time, ETA and on a GPU TFLOP/s and MFU, over the steps since the last log step, without
    the side work (saves, evaluations) done between them, which would otherwise show e.g. 2.5 s steps after
    a save."""

    def __init__(self, crystal: CrystalConfig, padded_vocab: int, world_size: int, train_iters: int, fp8: bool):
        self.world_size, self.train_iters, self.fp8 = world_size, train_iters, fp8
        self.flops_per_token = training_flops_per_token(crystal, crystal.seq_length, padded_vocab)
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.window_start, self.steps, self.tokens, self.excluded = now, 0, 0, 0.0

    def step(self, tokens: int, side_work_seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.excluded += side_work_seconds

    def figures(self, iteration: int) -> dict[str, float]:
        """At a log step: the window's figures, and a new window from now."""
        now = time.perf_counter()
        training = max(now - self.window_start - self.excluded, 1e-9)
        step_time = training / self.steps
        out = {
            "tokens-per-second": self.tokens / training,
            "step-time-ms": step_time * 1000,
            "eta-seconds": step_time * (self.train_iters - iteration),
        }
        if torch.cuda.is_available():
            out["tflops-per-gpu"] = self.flops_per_token * out["tokens-per-second"] / self.world_size / 1e12
            mfu = mfu_percent(out["tflops-per-gpu"], self.fp8)
            if mfu is not None:
                out["mfu-percent"] = mfu
        self._reset(now)
        return out


# Megatron-Core's timers a step can have (level 1, then level 2), Megatron-LM's names; on a rank where one did
# not run it reads 0 and is left out. The list is fixed because gathering them is a collective.
TIMERS = (
    "forward-backward", "all-grads-sync", "embedding-grads-all-reduce", "non-tensor-parallel-grads-all-reduce",
    "params-all-gather", "optimizer", "optimizer-copy-to-main-grad", "optimizer-clip-main-grad",
    "optimizer-inner-step", "optimizer-copy-main-to-model-params", "forward-compute", "backward-compute",
    "batch-generator",
)  # fmt: skip


def timer_figures(timers, steps: int) -> dict[str, tuple[float, float]]:
    """name -> (fastest rank, slowest rank) in ms per step over the last `steps` steps, and the timers reset.
    Megatron-Core 0.16.1's Timers offers these figures only as text (get_all_timers_string) or to a
    TensorBoard writer; its _get_global_min_max_time is what both use."""
    return {
        name: (fastest * 1000, slowest * 1000)
        for name, (fastest, slowest) in timers._get_global_min_max_time(
            list(TIMERS), reset=True, barrier=False, normalizer=max(steps, 1)
        ).items()
    }
