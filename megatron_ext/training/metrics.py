"""The training log line and TensorBoard scalars: loss, lr, grad norm, tokens/s, ETA, TFLOP/s and MFU."""
# The log line's figures go to TensorBoard as: lm loss, lm loss by source/NAME, learning-rate, grad-norm,
# tokens-per-second, step-time-ms, consumed-tokens, tflops-per-gpu and mfu-percent (on a GPU).

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


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class TrainingLogger:
    """Accumulates per-step values and prints one line every log interval (on the last rank, which
    holds the loss)."""

    def __init__(
        self,
        crystal: CrystalConfig,
        padded_vocab: int,
        world_size: int,
        log_interval: int,
        train_iters: int,
        fp8: bool,
        writer=None,
    ):
        self.writer, self.world_size = writer, world_size
        self.log_interval, self.train_iters, self.fp8 = log_interval, train_iters, fp8
        self.seq_length = crystal.seq_length
        self.flops_per_token = training_flops_per_token(crystal, crystal.seq_length, padded_vocab)
        self._reset(time.perf_counter())

    def _reset(self, now: float):
        self.window_start, self.steps, self.loss_sum, self.window_tokens = now, 0, 0.0, 0
        self.excluded = 0.0  # seconds of side work (saves, evaluations) inside the window
        self.source_sums: dict[str, list[float]] = {}

    def exclude(self, seconds: float) -> None:
        """Side work between steps (a save, an evaluation): reported on its own, and kept out of the step
        time, tokens/s and ETA, which would otherwise show e.g. 2.5 s steps after a save."""
        self.excluded += seconds

    def step(
        self,
        iteration: int,
        loss: float | None,
        lr: float,
        grad_norm: float | None,
        consumed_samples: int,
        global_batch_size: int,
        phase: str | None = None,
        source_losses: dict[str, tuple[float, float]] | None = None,
    ) -> str | None:
        """source_losses: source -> (summed loss, tokens) of this step's samples from it."""
        self.steps += 1
        self.window_tokens += global_batch_size * self.seq_length
        if loss is not None:
            self.loss_sum += loss
        for name, (total, tokens) in (source_losses or {}).items():
            sums = self.source_sums.setdefault(name, [0.0, 0.0])
            sums[0] += total
            sums[1] += tokens
        if self.writer is not None and loss is not None:
            self.writer.add_scalar("lm loss", loss, iteration)
            self.writer.add_scalar("learning-rate", lr, iteration)
            if grad_norm is not None:
                self.writer.add_scalar("grad-norm", grad_norm, iteration)
            for name, (total, tokens) in (source_losses or {}).items():
                if tokens:
                    self.writer.add_scalar(f"lm loss by source/{name}", total / tokens, iteration)
        if iteration % self.log_interval and iteration != self.train_iters:
            return None
        now = time.perf_counter()
        training = max(now - self.window_start - self.excluded, 1e-9)
        step_time = training / self.steps
        tokens_per_s = self.window_tokens / training
        eta = step_time * (self.train_iters - iteration)
        by_source = " ".join(f"{n} {t / c:.4f}" for n, (t, c) in self.source_sums.items() if c)
        parts = [
            f"iteration {iteration:>7d}/{self.train_iters}",
            f"phase {phase}" if phase else None,
            f"consumed tokens {consumed_samples * self.seq_length:,}",
            f"lm loss {self.loss_sum / self.steps:.6f}" if loss is not None else None,
            f"by source {by_source}" if by_source else None,
            f"lr {lr:.4e}",
            f"grad norm {grad_norm:.4f}" if grad_norm is not None else None,
            f"tokens/s {tokens_per_s:,.0f}",
            f"step time {step_time * 1000:.1f} ms",
            f"ETA {_fmt_duration(eta)}",
        ]
        if torch.cuda.is_available():
            tflops = self.flops_per_token * tokens_per_s / self.world_size / 1e12
            parts.append(f"TFLOP/s/GPU {tflops:.1f}")
            parts.append(mfu_text(tflops, self.fp8))
            if self.writer is not None:
                self.writer.add_scalar("tflops-per-gpu", tflops, iteration)
                mfu = mfu_percent(tflops, self.fp8)
                if mfu is not None:
                    self.writer.add_scalar("mfu-percent", mfu, iteration)
        if self.writer is not None:
            self.writer.add_scalar("tokens-per-second", tokens_per_s, iteration)
            self.writer.add_scalar("step-time-ms", step_time * 1000, iteration)
            self.writer.add_scalar("consumed-tokens", consumed_samples * self.seq_length, iteration)
        self._reset(now)
        return " | ".join(p for p in parts if p)
