"""Per-tensor FP8 scaling (Transformer Engine's semantics) and the fused amax + cast (+ transpose).

A tensor x is stored as q = fp8(clamp(x * scale, -max, max)) with scale_inv = 1 / scale beside it, so
that x ~ q * scale_inv. How scale is chosen:
- ``delayed``: from the largest amax in a history of the last ``amax_history_len`` training steps,
  scale = (fp8 max / amax) / 2^margin. Every use of the tensor in a step (each micro-batch) is cast
  with the scale found from earlier steps, and only notes its amax; at the step's end
  ``update_delayed_scales`` reduces the amaxes of all the rank's tensors in one all-reduce and moves
  each into its history (Transformer Engine reduces once per micro-batch forward and once per backward;
  a reduction per use would be 256 per micro-batch in the 7B: 32 layers x 4 linears x input and
  gradient). A step whose update is skipped (non-finite gradients, a loss spike) or an evaluation
  leaves no trace. The first use of a tensor has no history to go by: it takes the current scale from
  its own amax, once (Transformer Engine starts from scale 1, at which gradients below e5m2's smallest
  value, 2^-16, flush to zero until the first update).
- ``tensorwise`` (current scaling): from this tensor's own amax at every use: one more read of the data
  and a reduction per use, no stale scale.
A zero or non-finite amax keeps the previous scale. Each amax is the maximum over the group given (the
tensor- and data-parallel ranks that hold the same layer): every such rank then has the same history
and scales, as with Transformer Engine's amax reduction, so one saved copy restores all of them, at any
TP/DP layout. Values beyond the format's range saturate (TE's behaviour; torch's own cast would turn
them into NaN for e4m3).

Formats: ``e4m3`` for every tensor, or ``hybrid``: e4m3 forward (activations, weights), e5m2 for the
gradients (more range, less precision).

The cast kernel also pads both dimensions to a multiple of 16 (zeros), which FP8 GEMMs require: the
Crystal 7B's FFN width 10922 is not one, and a zero row or column adds nothing to a dot product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.kernels.triton_runtime import HAVE_TRITON, runs_on

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
GEMM_ALIGN = 16
RECIPES = ("delayed", "tensorwise")
FORMATS = ("e4m3", "hybrid")


@dataclass(frozen=True)
class FP8Recipe:
    format: str = "hybrid"
    recipe: str = "delayed"
    amax_history_len: int = 1024
    margin: int = 0

    @property
    def forward_dtype(self) -> torch.dtype:
        return E4M3

    @property
    def backward_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "hybrid" else E4M3


def compute_scale(amax: torch.Tensor, previous: torch.Tensor, fp8_max: float, margin: int) -> torch.Tensor:
    scale = (fp8_max / amax) / (2.0**margin)
    keep = (amax <= 0) | ~torch.isfinite(amax) | ~torch.isfinite(scale)
    return torch.where(keep, previous, scale)


def _aligned(n: int) -> int:
    return -(-n // GEMM_ALIGN) * GEMM_ALIGN


def quantize_reference(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """(q [R16, C16], q transposed or None, amax) of a 2-D x: the plain-PyTorch reference of the kernel."""
    rows, cols = x.shape
    fp8_max = torch.finfo(dtype).max
    scaled = (x.float() * scale).clamp(-fp8_max, fp8_max)
    padded = torch.nn.functional.pad(scaled, (0, _aligned(cols) - cols, 0, _aligned(rows) - rows))
    q = padded.to(dtype)
    return q, (q.t().contiguous() if transpose else None), x.detach().abs().amax().float()


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _round_to_fp8_grid(a, MANTISSA_BITS: tl.constexpr, MIN_EXPONENT: tl.constexpr):
        """Round |values| (fp32, within the format's range) to the nearest FP8 value, ties to even, in
        fp32 arithmetic. The cast that follows is then exact, so the result does not depend on the
        rounding of the hardware's (or Triton's interpreter's) conversion."""
        exponent = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
        exponent = tl.maximum(exponent, MIN_EXPONENT)  # below it the format is subnormal: a fixed step
        step = ((exponent - MANTISSA_BITS + 127) << 23).to(tl.float32, bitcast=True)
        magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |a / step| < 2^22 to an integer, ties to even
        return ((a / step + magic) - magic) * step

    @triton.jit
    def _amax_cast_kernel(
        x_ptr,
        q_ptr,
        qt_ptr,
        scale_ptr,
        amax_ptr,
        rows,
        cols,
        stride_r,
        stride_c,
        padded_rows,
        padded_cols,
        fp8_max,
        CAST: tl.constexpr,
        TRANSPOSE: tl.constexpr,
        MANTISSA_BITS: tl.constexpr,
        MIN_EXPONENT: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows_i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols_i = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        r, c = rows_i[:, None], cols_i[None, :]
        inside = (r < rows) & (c < cols)
        x = tl.load(x_ptr + r * stride_r + c * stride_c, mask=inside, other=0.0).to(tl.float32)
        tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x), axis=1), axis=0))
        if CAST:
            scaled = tl.minimum(tl.abs(x * tl.load(scale_ptr)), fp8_max)
            rounded = _round_to_fp8_grid(scaled, MANTISSA_BITS, MIN_EXPONENT)
            q = tl.where(x < 0, -rounded, rounded).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + r * padded_cols + c, q, mask=(r < padded_rows) & (c < padded_cols))
            if TRANSPOSE:
                # The tile transposed in registers, so that the store runs along the output's rows.
                rt, ct = rows_i[None, :], cols_i[:, None]
                tl.store(qt_ptr + ct * padded_rows + rt, tl.trans(q), mask=(rt < padded_rows) & (ct < padded_cols))

    _FORMAT_BITS = {E4M3: (3, -6), E5M2: (2, -14)}  # mantissa bits, smallest normal exponent

    def _launch(x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, transpose: bool):
        rows, cols = x.shape
        pr, pc = _aligned(rows), _aligned(cols)
        amax = torch.zeros((), dtype=torch.float32, device=x.device)
        q = torch.empty(pr, pc, dtype=dtype, device=x.device) if scale is not None else None
        qt = torch.empty(pc, pr, dtype=dtype, device=x.device) if scale is not None and transpose else None
        block_r, block_c = 64, 64
        mantissa_bits, min_exponent = _FORMAT_BITS[dtype]
        grid = (triton.cdiv(pr, block_r), triton.cdiv(pc, block_c))
        _amax_cast_kernel[grid](
            x,
            q if q is not None else amax,
            qt if qt is not None else amax,
            scale if scale is not None else amax,
            amax,
            rows,
            cols,
            x.stride(0),
            x.stride(1),
            pr,
            pc,
            torch.finfo(dtype).max,
            CAST=scale is not None,
            TRANSPOSE=qt is not None,
            MANTISSA_BITS=mantissa_bits,
            MIN_EXPONENT=min_exponent,
            BLOCK_R=block_r,
            BLOCK_C=block_c,
        )
        return q, qt, amax


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, transpose: bool):
    """(q, q transposed or None, amax of x): one read of x, one write of each output."""
    if runs_on(x):
        return _launch(x, scale, dtype, transpose)
    return quantize_reference(x, scale, dtype, transpose)


def amax(x: torch.Tensor) -> torch.Tensor:
    if runs_on(x):
        return _launch(x, None, E4M3, False)[2]
    return x.detach().abs().amax().float()


class ScalingState:
    """The scale of one tensor role (a layer's input, weight or output gradient) and its amax history."""

    def __init__(self, recipe: FP8Recipe, dtype: torch.dtype, device: torch.device | str, group=None):
        self.recipe, self.dtype, self.group = recipe, dtype, group
        self.fp8_max = torch.finfo(dtype).max
        self.amax_history = torch.zeros(recipe.amax_history_len, dtype=torch.float32, device=device)
        self.scale = torch.ones((), dtype=torch.float32, device=device)
        self.step_amax = torch.zeros((), dtype=torch.float32, device=device)  # delayed: this step's, not reduced
        self.calibrated = False  # delayed: a scale has been set from data

    def quantize(self, x: torch.Tensor, transpose: bool = False):
        """(q, q transposed or None, scale_inv) of a 2-D x, updating the scaling state."""
        x = x.detach()
        current = None
        if self.recipe.recipe == "tensorwise" or not self.calibrated:
            current = _all_reduce_max(amax(x), self.group)
            self.scale = compute_scale(current, self.scale, self.fp8_max, self.recipe.margin)
            self.calibrated = True
        q, qt, cast_amax = quantize(x, self.scale, self.dtype, transpose)
        if self.recipe.recipe == "tensorwise":
            self.amax_history = torch.roll(self.amax_history, 1)
            self.amax_history[0] = current
        else:
            self.step_amax = torch.maximum(self.step_amax, cast_amax)
        return q, qt, self.scale.reciprocal()

    def state_dict(self) -> dict:
        # Copies: the tensors may be views into the rows update_delayed_scales made for all states,
        # and saving a view saves its whole storage.
        return {
            "amax_history": self.amax_history.to("cpu", copy=True),
            "scale": self.scale.to("cpu", copy=True),
            "calibrated": torch.tensor(self.calibrated),
        }

    def load_state_dict(self, state: dict) -> None:
        history = state["amax_history"].to(self.amax_history.device)
        n = min(len(history), len(self.amax_history))
        self.amax_history.zero_()
        self.amax_history[:n] = history[:n]
        self.scale = state["scale"].to(self.scale.device)
        self.calibrated = bool(state["calibrated"])


def _all_reduce_max(amaxes: torch.Tensor, group) -> torch.Tensor:
    """In place, the maximum over the group's ranks (none: this rank's own)."""
    if group is not None and torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(amaxes, op=torch.distributed.ReduceOp.MAX, group=group)
    return amaxes


def update_delayed_scales(states: list[ScalingState], applied: bool) -> None:
    """The end of a training step (applied: its update was) or of an evaluation (not applied): the
    delayed states' amaxes of the step, all reduced in one all-reduce, go into their histories and the
    next scales come from those, or the step is forgotten. Every state given shares one group (this
    rank's tensor- and data-parallel ranks) and one recipe. The states' histories and scales are
    updated together, as rows of one tensor (a few kernel launches, not a few per tensor: the 7B has
    384 such states)."""
    delayed = [s for s in states if s.recipe.recipe == "delayed"]
    if not delayed:
        return
    if applied:
        amaxes = _all_reduce_max(torch.stack([s.step_amax for s in delayed]), delayed[0].group)
        histories = torch.roll(torch.stack([s.amax_history for s in delayed]), 1, dims=1)
        histories[:, 0] = amaxes
        fp8_max = torch.tensor([s.fp8_max for s in delayed], device=amaxes.device)
        scales = compute_scale(
            histories.amax(dim=1), torch.stack([s.scale for s in delayed]), fp8_max, delayed[0].recipe.margin
        )
        for state, history, scale in zip(delayed, histories.unbind(), scales.unbind()):
            state.amax_history, state.scale = history, scale
    for state, zero in zip(delayed, torch.zeros(len(delayed), device=delayed[0].step_amax.device).unbind()):
        state.step_amax = zero
