#!/usr/bin/env python
"""Training throughput of a Crystal-shaped model: tokens/s, TFLOP/s per GPU and MFU.

Default: the 7B's width (hidden 4096, 32 heads, FFN 10922, seq 2048, vocab 32032) with 4 layers, so that
it fits one GPU. Runs pretrain_crystal.py's own Trainer for --iters steps on mock data, discards the
first --warmup steps, and prints the steady-state figures; the baseline in the same run is the device's
measured bf16 matmul rate (an 8192^3 GEMM), against which the achieved TFLOP/s is also given.

  torchrun --nproc-per-node 1 benchmarks/train_throughput.py --num-layers 4 --iters 20
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.training import arguments, data, distributed  # noqa: E402
from megatron_ext.training.loop import Trainer  # noqa: E402
from megatron_ext.training.metrics import device_peak_tflops, training_flops_per_token  # noqa: E402


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


def main() -> None:
    bench = argparse.ArgumentParser(add_help=False)
    bench.add_argument("--iters", type=int, default=20)
    bench.add_argument("--warmup", type=int, default=5)
    own, rest = bench.parse_known_args()
    defaults = ["--model", "crystal-7b", "--num-layers", "4", "--mock-data", "--micro-batch-size", "1",
                "--global-batch-size", "8", "--num-workers", "2", "--lr", "1e-4", "--log-interval", "1000000"]
    if torch.cuda.is_available():
        defaults.append("--bf16")
    args = arguments.build_parser().parse_args(defaults + rest + ["--train-iters", str(own.iters)])
    crystal = arguments.validate(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    device = distributed.initialize(args)
    trainer = Trainer(args, crystal, device)
    train_ds, _ = data.build_datasets(args, crystal)
    its = trainer.data_iterators(train_ds, 0)
    for i in range(own.iters):
        if i == own.warmup:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            start = time.perf_counter()
        trainer.train_step(its)
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    step_time = (time.perf_counter() - start) / (own.iters - own.warmup)
    world = torch.distributed.get_world_size()
    tokens = args.global_batch_size * crystal.seq_length
    tflops = training_flops_per_token(crystal, crystal.seq_length, trainer.padded_vocab) * tokens / step_time / world / 1e12
    if torch.distributed.get_rank() == 0:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        print(f"device: {name} x {world} | model: hidden {crystal.hidden_size}, {crystal.num_layers} layers, "
              f"seq {crystal.seq_length}, {'bf16' if args.bf16 else 'fp32'}")
        print(f"step time {step_time * 1000:.1f} ms | tokens/s/GPU {tokens / step_time / world:,.0f} | TFLOP/s/GPU {tflops:.1f}")
        peak, measured = device_peak_tflops(), measured_matmul_tflops()
        if peak:
            print(f"MFU {100 * tflops / peak:.1f}% of the {peak:.0f} TFLOP/s bf16 peak")
        if measured:
            print(f"baseline: bf16 8192^3 matmul {measured:.0f} TFLOP/s measured; ratio {tflops / measured:.3f}")
    distributed.shutdown()


if __name__ == "__main__":
    main()
