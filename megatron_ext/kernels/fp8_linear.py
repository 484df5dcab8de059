"""The FP8 linear for Megatron-Core's Column/RowParallelLinear when Transformer Engine is absent.

Forward y = x W^T and both backward GEMMs (dgrad = dy W, wgrad = dy^T x) run in FP8 through
``torch._scaled_mm`` (cuBLASLt on GPU; torch's own kernel on CPU, where the tests run it) with per-tensor
scales from ``fp8_scaling``. The weights, their gradients, the bias and the optimizer stay in high
precision. The FP8 copy of a weight (and its transpose) is made at its first use in a step and reused
by every later micro-batch, as Transformer Engine casts weights on the first micro-batch only;
``end_fp8_step``, which the trainer calls after each training step and each evaluation, drops it (the
optimizer may have changed the weight) and ends the step of the delayed scales (one amax all-reduce).
The forward saves the FP8 transposes that the backward GEMMs need (written by the same cast kernel),
not the high-precision input.

Tensor-parallel semantics are those of Megatron-Core's ``linear_with_grad_accumulation_and_async_allreduce``:
with sequence parallelism the column-parallel input is all-gathered along the sequence in the forward
and the input gradient reduce-scattered in the backward; otherwise the input gradient is all-reduced
over the tensor-parallel group when the layer asks for it (``allreduce_dgrad``). Row-parallel layers do
their output reduction outside, as in Megatron-Core.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import _gather_along_first_dim, _reduce_scatter_along_first_dim

from megatron_ext.kernels.fp8_scaling import FP8Recipe, ScalingState, update_delayed_scales


class FP8LinearState:
    """The three scaled tensors of one linear layer."""

    def __init__(self, recipe: FP8Recipe, device: torch.device | str, group=None):
        self.input = ScalingState(recipe, recipe.forward_dtype, device, group)
        self.weight = ScalingState(recipe, recipe.forward_dtype, device, group)
        self.grad_output = ScalingState(recipe, recipe.backward_dtype, device, group)
        self.weight_fp8 = None  # (q, q transposed, scale_inv) of the current weights, once made

    def quantized_weight(self, weight: torch.Tensor):
        if self.weight_fp8 is None:
            self.weight_fp8 = self.weight.quantize(weight, transpose=True)
        return self.weight_fp8

    def scaling_states(self) -> list[ScalingState]:
        return [self.input, self.weight, self.grad_output]

    def state_dict(self) -> dict:
        return {name: getattr(self, name).state_dict() for name in ("input", "weight", "grad_output")}

    def load_state_dict(self, state: dict) -> None:
        for name, sub in state.items():
            getattr(self, name).load_state_dict(sub)


def scaled_mm(a, b_t, scale_a, scale_b, rows: int, cols: int, out_dtype: torch.dtype) -> torch.Tensor:
    """a [M16, K16] (row-major) times b_t [K16, N16] (column-major), cut back to [rows, cols]."""
    return torch._scaled_mm(a, b_t, scale_a, scale_b, out_dtype=out_dtype)[:rows, :cols]


def dequantized_mm(a, b_t, scale_a, scale_b, rows: int, cols: int, out_dtype: torch.dtype) -> torch.Tensor:
    """The reference of scaled_mm: dequantise both operands, multiply in fp32."""
    return ((a.float() * scale_a) @ (b_t.float() * scale_b))[:rows, :cols].to(out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, state: FP8LinearState, sequence_parallel: bool, allreduce_dgrad: bool, tp_group, mm):
        if sequence_parallel:
            x = _gather_along_first_dim(x, group=tp_group)
        lead, k = x.shape[:-1], x.shape[-1]
        x2d = x.reshape(-1, k)
        n = weight.shape[0]
        xq, xqt, x_inv = state.input.quantize(x2d, transpose=True)
        wq, wqt, w_inv = state.quantized_weight(weight)
        y = mm(xq, wq.t(), x_inv, w_inv, x2d.shape[0], n, x.dtype)
        ctx.save_for_backward(xqt, x_inv, wqt, w_inv)
        ctx.state, ctx.mm, ctx.shapes = state, mm, (x2d.shape[0], k, n, lead)
        ctx.sequence_parallel, ctx.allreduce_dgrad, ctx.tp_group = sequence_parallel, allreduce_dgrad, tp_group
        ctx.weight_dtype = weight.dtype
        return y.reshape(*lead, n)

    @staticmethod
    def backward(ctx, grad_output):
        xqt, x_inv, wqt, w_inv = ctx.saved_tensors
        m, k, n, lead = ctx.shapes
        g2d = grad_output.reshape(-1, n)
        gq, gqt, g_inv = ctx.state.grad_output.quantize(g2d, transpose=True)
        grad_input = ctx.mm(gq, wqt.t(), g_inv, w_inv, m, k, grad_output.dtype).reshape(*lead, k)
        if ctx.sequence_parallel:
            grad_input = _reduce_scatter_along_first_dim(grad_input, group=ctx.tp_group)
        elif ctx.allreduce_dgrad:
            torch.distributed.all_reduce(grad_input, group=ctx.tp_group)
        grad_weight = ctx.mm(gqt, xqt.t(), g_inv, x_inv, n, k, ctx.weight_dtype)
        return grad_input, grad_weight, None, None, None, None, None


class _FP8Mixin:
    """Replaces the layer's matmul (``_forward_impl``) with the FP8 one; keeps its scaling state in the
    checkpoint as the layer's ``_extra_state`` (where Transformer Engine keeps its FP8 metadata): one
    copy, the same on every rank of the layer (amaxes are reduced over tensor- and data-parallel ranks)."""

    def _init_fp8(self, recipe: FP8Recipe, mm) -> None:
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        self.fp8_state = FP8LinearState(recipe, self.weight.device, group)
        self._fp8_mm = mm

    def _forward_impl(
        self,
        input,
        weight,
        bias=None,
        gradient_accumulation_fusion=False,
        allreduce_dgrad=False,
        sequence_parallel=False,
        tp_group=None,
        **unused,
    ):
        output = _FP8Linear.apply(
            input, weight, self.fp8_state, sequence_parallel, allreduce_dgrad, tp_group, self._fp8_mm
        )
        return output + bias if bias is not None else output

    def get_extra_state(self):
        return self.fp8_state.state_dict()

    def set_extra_state(self, state) -> None:
        # A checkpoint trained without FP8 has None here, one trained by Transformer Engine its own
        # serialised metadata: either way the scales start fresh, as on a first step.
        if isinstance(state, dict) and set(state) == {"input", "weight", "grad_output"}:
            self.fp8_state.load_state_dict(state)


def end_fp8_step(model_chunks: list, applied: bool) -> None:
    """After a training step (applied: its update was) or an evaluation (applied False): the delayed
    scales take the step's amaxes or forget them, and each FP8 layer casts its weight afresh next time."""
    layers = [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, _FP8Mixin)]
    update_delayed_scales([s for layer in layers for s in layer.fp8_state.scaling_states()], applied)
    for layer in layers:
        layer.fp8_state.weight_fp8 = None


def fp8_linear_classes(recipe: FP8Recipe, mm=scaled_mm):
    """Column/RowParallelLinear subclasses bound to a recipe, for the layer spec. mm: the FP8 GEMM
    (dequantized_mm is its reference)."""

    class FP8ColumnParallelLinear(_FP8Mixin, ColumnParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_fp8(recipe, mm)

    class FP8RowParallelLinear(_FP8Mixin, RowParallelLinear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._init_fp8(recipe, mm)

    return FP8ColumnParallelLinear, FP8RowParallelLinear
