#!/usr/bin/env python
"""The project's Triton kernels against PyTorch eager and against their floor, on one GPU.

Each kernel is memory-bound: its floor is the bytes it must move divided by this GPU's copy bandwidth
measured in the same run (a device-to-device copy of 1 GiB). Printed per kernel: time, eager time, the
speed-up over eager, and the fraction of the measured bandwidth achieved (goal: >= 70%).
Shapes are the Crystal 7B's at TP 1, micro batch 1, sequence 2048, bf16:

  python benchmarks/kernels.py
"""

from __future__ import annotations

from megatron_ext.upstream_warnings import silence

silence()  # before Megatron-Core is imported

import sys

import torch

if not torch.cuda.is_available():
    sys.exit("benchmarks/kernels.py needs a CUDA GPU (on CPU the kernels run only in Triton's interpreter)")

import triton.testing  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from megatron_ext.kernels import cross_entropy, fp8_scaling, rope, swiglu  # noqa: E402

SEQ, HIDDEN, HEADS, FFN, VOCAB, PADDED_VOCAB = 2048, 4096, 32, 10922, 32032, 32128
HEAD_DIM = HIDDEN // HEADS
BF16 = torch.bfloat16


def bench(fn) -> float:
    """Median milliseconds."""
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms / 1e3)  # read + write, bytes/s


def report(name: str, ms: float, eager_ms: float, nbytes: int, bandwidth: float) -> None:
    achieved = nbytes / (ms / 1e3)
    print(
        f"{name:<34} {ms * 1e3:8.1f} us | eager {eager_ms * 1e3:8.1f} us ({eager_ms / ms:5.2f}x) | "
        f"floor {nbytes / bandwidth * 1e6:8.1f} us | {100 * achieved / bandwidth:5.1f}% of copy bandwidth"
    )


def main() -> None:
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()} | measured copy bandwidth {bw / 1e9:,.0f} GB/s (baseline)")
    el = 2  # bytes per bf16 element

    qkv = torch.randn(SEQ, 1, HEADS, 3 * HEAD_DIM, device="cuda", dtype=BF16)
    q, k = qkv[..., :HEAD_DIM], qkv[..., HEAD_DIM : 2 * HEAD_DIM]
    angles = torch.rand(SEQ, HEAD_DIM // 8, device="cuda") * SEQ
    rope_bytes = 2 * 2 * q.numel() * el  # q and k, each read and written once
    report(
        "rope fwd (q+k, 25% interleaved)",
        bench(lambda: rope.fused_rope(q, k, angles)),
        bench(lambda: (rope.rope_reference(q, angles), rope.rope_reference(k, angles))),
        rope_bytes,
        bw,
    )

    y = torch.randn(SEQ, 2 * FFN, device="cuda", dtype=BF16, requires_grad=True)
    b = torch.randn(2 * FFN, device="cuda", dtype=BF16, requires_grad=True)
    fwd_bytes = (y.numel() + y.numel() // 2) * el
    report(
        "bias+swiglu fwd",
        bench(lambda: swiglu.bias_swiglu(y, b)),
        bench(lambda: swiglu.bias_swiglu_reference(y, b)),
        fwd_bytes,
        bw,
    )
    out, grad = swiglu.bias_swiglu(y, b), torch.randn(SEQ, FFN, device="cuda", dtype=BF16)
    ref_out = swiglu.bias_swiglu_reference(y, b)
    bwd_bytes = (y.numel() + grad.numel() + y.numel()) * el  # read fc1 output and grad, write d(fc1)
    report(
        "bias+swiglu bwd",
        bench(lambda: torch.autograd.grad(out, (y, b), grad, retain_graph=True)),
        bench(lambda: torch.autograd.grad(ref_out, (y, b), grad, retain_graph=True)),
        bwd_bytes,
        bw,
    )

    x = torch.randn(SEQ, HIDDEN, device="cuda", dtype=BF16)
    scale = torch.tensor(10.0, device="cuda")
    cast_bytes = x.numel() * el + 2 * x.numel()  # read bf16, write fp8 and its transpose
    report(
        "fp8 amax+cast+transpose",
        bench(lambda: fp8_scaling.quantize(x, scale, fp8_scaling.E4M3, True)),
        bench(lambda: fp8_scaling.quantize_reference(x, scale, fp8_scaling.E4M3, True)),
        cast_bytes,
        bw,
    )

    # The loss over the padded vocabulary (one rank: its group is the whole world of one process).
    torch.distributed.init_process_group("nccl", init_method="tcp://127.0.0.1:29599", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    group = parallel_state.get_tensor_model_parallel_group()
    logits = torch.randn(SEQ, 1, PADDED_VOCAB, device="cuda", dtype=BF16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (SEQ, 1), device="cuda")

    def fused():
        cross_entropy.vocab_parallel_cross_entropy(logits, labels, 0, VOCAB, group).sum().backward()

    def eager():
        cross_entropy.cross_entropy_reference(logits, labels, 0, VOCAB).sum().backward()

    ce_bytes = 3 * logits.numel() * el  # forward reads the logits; backward reads them and writes the gradient
    report("vocab-parallel cross-entropy f+b", bench(fused), bench(eager), ce_bytes, bw)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
