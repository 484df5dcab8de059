#!/usr/bin/env python
"""Training throughput of a Crystal-shaped model: tokens/s, TFLOP/s per GPU and MFU.

Default: the 7B's width (hidden 4096, 32 heads, FFN 10922, seq 2048, vocab 32032) with 4 layers, so that
it fits one GPU. Runs pretrain_crystal.py's own Trainer for --iters steps on mock data, discards the
first --warmup steps, and prints the steady-state figures; the baseline in the same run is the device's
measured bf16 matmul rate (an 8192^3 GEMM), against which the achieved TFLOP/s is also given.

  torchrun --nproc-per-node 1 benchmarks/train_throughput.py --num-layers 4 --iters 20
  torchrun --nproc-per-node 1 benchmarks/train_throughput.py --fp8 --iters 200   # bf16 vs FP8, same run

With --fp8 the same model, seed and data train again with --fp8-format hybrid (Transformer Engine's
FP8 where TE is present, else torch._scaled_mm with this project's cast kernels) and the ratio of
tokens/s and the largest relative difference between the two loss curves are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported

from megatron_ext.model import memory  # noqa: E402
from megatron_ext.training import arguments, distributed, memory_report  # noqa: E402
from megatron_ext.training.batches import feeds  # noqa: E402
from megatron_ext.training.loop import Trainer  # noqa: E402
from megatron_ext.training.metrics import device_peak_tflops, mfu_text, training_flops_per_token  # noqa: E402


def measured_matmul_tflops(n: int = 8192, reps: int = 10) -> float | None:
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def measure(run, iters: int, warmup: int) -> tuple[float, list[float], float | None]:
    """(steady-state step time, loss of every step, peak allocated GiB on a GPU) of a fresh model on the same
    seed and data."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(run, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    feed = feeds.build(run)
    trainer.set_data(feed)
    its = trainer.train_iterators(iters)
    losses = []
    for i in range(iters):
        if i == warmup:
            synchronize()
            start = time.perf_counter()
        loss, _, _, _ = trainer.train_step(its)
        losses.append(loss)
    synchronize()
    peak = torch.cuda.max_memory_allocated() / memory.GIB if torch.cuda.is_available() else None
    del trainer
    return (time.perf_counter() - start) / (iters - warmup), losses, peak


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--iters", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument(
        "--fp8", action="store_true", help="also run the same model, seed and data with --fp8-format hybrid and compare"
    )
    own, rest = bench.parse_known_args()
    defaults = [
        "--model",
        "crystal-7b",
        "--num-layers",
        "4",
        "--mock-data",
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "8",
        "--num-workers",
        "2",
        "--lr",
        "1e-4",
        "--log-interval",
        "1000000",
    ]
    if torch.cuda.is_available():
        defaults.append("--bf16")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    argv = defaults + rest + ["--train-iters", str(own.iters)]
    run = arguments.validate(arguments.build_parser().parse_args(argv), world_size)
    crystal = run.crystal
    distributed.initialize(run)
    runs = {"bf16" if run.kernels.bf16 else "fp32": run}
    if own.fp8:
        runs["fp8"] = arguments.validate(
            arguments.build_parser().parse_args(argv + ["--fp8-format", "hybrid"]), world_size
        )
    world = torch.distributed.get_world_size()
    tokens = run.optimizer.global_batch_size * crystal.seq_length
    flops_per_step = training_flops_per_token(crystal, crystal.seq_length, run.model.padded_vocab) * tokens
    results = {}
    for name, each in runs.items():
        step_time, losses, peak = measure(each, own.iters, own.warmup)
        results[name] = (step_time, losses, each.kernels.path.describe(), peak)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if torch.distributed.get_rank() == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        measured = measured_matmul_tflops()
        peaks = {p: device_peak_tflops(fp8=p == "fp8") for p in ("bf16", "fp8")}
        peaks = ", ".join(f"{p} {tflops:.0f}" for p, tflops in peaks.items() if tflops)
        print(
            f"device: {device} x {world} | model: hidden {crystal.hidden_size}, {crystal.num_layers} layers, "
            f"seq {crystal.seq_length}, global batch {run.optimizer.global_batch_size}"
            + (f" | data-sheet peaks (TFLOP/s): {peaks}" if peaks else "")
        )
        predicted = memory.estimate(crystal, run.model.padded_vocab, memory_report.layout_of(run))
        for name, (step_time, losses, path, peak) in results.items():
            tflops = flops_per_step / step_time / world / 1e12
            mfu = mfu_text(tflops, fp8=name == "fp8")
            mfu = f" | {mfu}" if mfu else ""
            print(
                f"{name}: step time {step_time * 1000:.1f} ms | tokens/s/GPU {tokens / step_time / world:,.0f} | "
                f"TFLOP/s/GPU {tflops:.1f}{mfu}\n  steps {len(losses)} | final loss {losses[-1]:.4f}\n"
                f"  kernel path: {path}\n"
                f"  peak memory allocated: {f'{peak:.2f} GiB' if peak is not None else 'n/a (CPU)'} | predicted "
                f"(the start-up report): {predicted.total / memory.GIB:.2f} GiB ({predicted.describe()})"
            )
        if measured:
            print(f"baseline: bf16 8192^3 matmul {measured:.0f} TFLOP/s measured in this run")
        if own.fp8:
            (base_time, base_losses, _, _), (fp8_time, fp8_losses, _, _) = results.values()
            worst = max(abs(a - b) / abs(b) for a, b in zip(fp8_losses, base_losses))
            print(
                # Four significant figures: emulated FP8 on CPU is ~100x slower, and 0.011 would hide the ratio.
                f"fp8 / {next(iter(results))} tokens/s: {base_time / fp8_time:#.4g}x | loss curves over {own.iters} "
                f"steps: max relative difference {100 * worst:.2f}% "
                f"(final {fp8_losses[-1]:.4f} vs {base_losses[-1]:.4f})"
            )
    distributed.shutdown()


if __name__ == "__main__":
    main()
