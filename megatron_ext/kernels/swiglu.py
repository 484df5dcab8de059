"""Bias + SwiGLU, fused: fc1's output [.., 2F] is [gate; up] (Crystal's fc1, as Megatron-Core lays out
a gated MLP, per tensor-parallel shard); out = silu(gate + b_gate) * (up + b_up).

Without the fusion Megatron-Core's local path adds the bias (one pass), splits, applies silu and
multiplies (more passes), and autograd keeps the intermediates. The kernel reads fc1's output once and
writes F; the backward recomputes the activation from the saved fc1 output instead of storing it.
The bias gradient is a column sum of the input gradient, left to torch (an in-kernel atomic sum would
make it non-deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from megatron_ext.kernels.triton_runtime import HAVE_TRITON, runs_on


def bias_swiglu_reference(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if bias is not None:
        y = y + bias
    gate, up = torch.chunk(y, 2, dim=-1)
    return F.silu(gate) * up


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _load_gate_up(y_ptr, b_ptr, r, c, mask, width, HAS_BIAS: tl.constexpr):
        gate = tl.load(y_ptr + r * 2 * width + c, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptr + r * 2 * width + width + c, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            gate += tl.load(b_ptr + c, mask=c < width, other=0.0).to(tl.float32)
            up += tl.load(b_ptr + width + c, mask=c < width, other=0.0).to(tl.float32)
        return gate, up

    @triton.jit
    def _swiglu_forward_kernel(
        y_ptr, b_ptr, out_ptr, rows, width, HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < width)
        gate, up = _load_gate_up(y_ptr, b_ptr, r, c, mask, width, HAS_BIAS)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + r * width + c, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(
        grad_ptr,
        y_ptr,
        b_ptr,
        dy_ptr,
        rows,
        width,
        HAS_BIAS: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        mask = (r < rows) & (c < width)
        gate, up = _load_gate_up(y_ptr, b_ptr, r, c, mask, width, HAS_BIAS)
        grad = tl.load(grad_ptr + r * width + c, mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        d_gate = grad * up * sig * (1.0 + gate * (1.0 - sig))
        d_up = grad * gate * sig
        out_ty = dy_ptr.dtype.element_ty
        tl.store(dy_ptr + r * 2 * width + c, d_gate.to(out_ty), mask=mask)
        tl.store(dy_ptr + r * 2 * width + width + c, d_up.to(out_ty), mask=mask)

    _BLOCK_R, _BLOCK_C = 16, 128

    def _grid(rows: int, width: int):
        return (triton.cdiv(rows, _BLOCK_R), triton.cdiv(width, _BLOCK_C))


class _FusedBiasSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, bias):
        y2d = y.reshape(-1, y.shape[-1]).contiguous()
        rows, width = y2d.shape[0], y2d.shape[1] // 2
        out = torch.empty(rows, width, dtype=y.dtype, device=y.device)
        has_bias = bias is not None
        _swiglu_forward_kernel[_grid(rows, width)](
            y2d, bias if has_bias else y2d, out, rows, width, has_bias, BLOCK_R=_BLOCK_R, BLOCK_C=_BLOCK_C
        )
        ctx.save_for_backward(y2d, bias)
        ctx.shape = y.shape
        return out.reshape(*y.shape[:-1], width)

    @staticmethod
    def backward(ctx, grad):
        y2d, bias = ctx.saved_tensors
        rows, width = y2d.shape[0], y2d.shape[1] // 2
        dy = torch.empty_like(y2d)
        has_bias = bias is not None
        _swiglu_backward_kernel[_grid(rows, width)](
            grad.contiguous(),
            y2d,
            bias if has_bias else y2d,
            dy,
            rows,
            width,
            has_bias,
            BLOCK_R=_BLOCK_R,
            BLOCK_C=_BLOCK_C,
        )
        grad_bias = dy.sum(dim=0, dtype=torch.float32).to(bias.dtype) if has_bias else None
        return dy.reshape(ctx.shape), grad_bias


def bias_swiglu(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if runs_on(y):
        return _FusedBiasSwiGLU.apply(y, bias)
    return bias_swiglu_reference(y, bias)


class FusedSwiGLUMLP(MLP):
    """Megatron-Core's MLP for Crystal's case (dense, gated, silu, biases) with ``bias_swiglu`` between
    fc1 and fc2."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        if per_token_scale is not None:
            raise ValueError("FusedSwiGLUMLP is the dense MLP: per_token_scale (MoE) is not supported")
        intermediate, bias = self.linear_fc1(hidden_states)
        return self.linear_fc2(bias_swiglu(intermediate, bias))
