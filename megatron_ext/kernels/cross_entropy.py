"""Vocab-parallel cross-entropy, fused, over the padded vocabulary with its padding rows masked out.

Megatron-Core's ``vocab_parallel_cross_entropy`` upcasts the [s, b, V/TP] logits to fp32 and keeps
several tensors of that size (shifted logits, their exponentials, the softmax saved for the backward);
the padding mask this project needs (see ``CrystalGPTModel``) adds one more. Here one kernel reads each
row of logits once (online max and sum of exponentials, and the target's logit, padding columns
skipped); three all-reduces of [s, b] statistics over the tensor-parallel group (as Megatron-Core's)
make them global; the backward kernel writes softmax - one-hot straight into the gradient, recomputing
the softmax from the saved logits and row statistics. Memory: the logits and one gradient tensor.

The muP logit multiplier is not fused here: it is applied to the final norm's output, before the LM head
(a [s, b, h] tensor rather than [s, b, V]; ``CrystalLayerNorm``), so nothing of it is left to fuse.
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel

from megatron_ext.kernels.triton_runtime import HAVE_TRITON, runs_on


def cross_entropy_reference(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int
) -> torch.Tensor:
    """Megatron-Core's vocab-parallel cross-entropy with the columns at or beyond vocab_size (the padding)
    out of the softmax. logits [s, b, V/TP] (this rank's columns from vocab_start), labels [s, b]."""
    per_rank = logits.shape[-1]
    if vocab_start + per_rank > vocab_size:
        ids = torch.arange(vocab_start, vocab_start + per_rank, device=logits.device)
        logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    return tensor_parallel.vocab_parallel_cross_entropy(logits, labels)


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_statistics_kernel(
        logits_ptr,
        labels_ptr,
        max_ptr,
        sum_ptr,
        target_ptr,
        vocab_start,
        vocab_size,
        COLUMNS: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        local_label = tl.load(labels_ptr + row) - vocab_start
        running_max = tl.full((), float("-inf"), tl.float32)
        running_sum = tl.zeros((), tl.float32)
        target = tl.zeros((), tl.float32)
        for start in range(0, COLUMNS, BLOCK_V):  # a constant per run (the vocabulary shard): one compile
            cols = start + tl.arange(0, BLOCK_V)
            valid = (cols < COLUMNS) & (vocab_start + cols < vocab_size)
            x = tl.load(logits_ptr + row * COLUMNS + cols, mask=valid, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(x, axis=0))
            # A block of padding only leaves new_max at -inf: keep the sum as it is.
            rescale = tl.where(new_max == float("-inf"), 1.0, tl.exp(running_max - new_max))
            shifted = tl.where(valid, tl.exp(x - new_max), 0.0)
            running_sum = running_sum * rescale + tl.sum(shifted, axis=0)
            running_max = new_max
            target += tl.sum(tl.where(valid & (cols == local_label), x, 0.0), axis=0)
        tl.store(max_ptr + row, running_max)
        tl.store(sum_ptr + row, running_sum)
        tl.store(target_ptr + row, target)

    @triton.jit
    def _gradient_kernel(
        logits_ptr,
        labels_ptr,
        max_ptr,
        sum_ptr,
        grad_loss_ptr,
        grad_ptr,
        columns,
        vocab_start,
        vocab_size,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        inside = cols < columns
        valid = inside & (vocab_start + cols < vocab_size)
        x = tl.load(logits_ptr + row * columns + cols, mask=valid, other=float("-inf")).to(tl.float32)
        softmax = tl.exp(x - tl.load(max_ptr + row)) / tl.load(sum_ptr + row)
        one_hot = (cols == tl.load(labels_ptr + row) - vocab_start).to(tl.float32)
        grad = tl.where(valid, (softmax - one_hot) * tl.load(grad_loss_ptr + row), 0.0)
        tl.store(grad_ptr + row * columns + cols, grad.to(grad_ptr.dtype.element_ty), mask=inside)

    _BLOCK_V = 1024


class _FusedVocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, vocab_start: int, vocab_size: int, group):
        rows_shape, columns = logits.shape[:-1], logits.shape[-1]
        logits2d = logits.reshape(-1, columns).contiguous()
        labels1d = labels.reshape(-1).contiguous()
        rows = logits2d.shape[0]
        stats = torch.empty(3, rows, dtype=torch.float32, device=logits.device)
        row_max, row_sum, target = stats[0], stats[1], stats[2]
        _row_statistics_kernel[(rows,)](
            logits2d, labels1d, row_max, row_sum, target, vocab_start, vocab_size, COLUMNS=columns, BLOCK_V=_BLOCK_V
        )
        global_max = row_max.clone()
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
        row_sum = row_sum * torch.exp(row_max - global_max).nan_to_num_(0.0)  # a rank of padding only: -inf - max
        totals = torch.stack((row_sum, target))
        torch.distributed.all_reduce(totals, group=group)
        global_sum, target = totals[0], totals[1]
        ctx.save_for_backward(logits2d, labels1d, global_max, global_sum)
        ctx.meta = (vocab_start, vocab_size, logits.shape)
        return (torch.log(global_sum) + global_max - target).reshape(rows_shape)

    @staticmethod
    def backward(ctx, grad_loss):
        logits2d, labels1d, global_max, global_sum = ctx.saved_tensors
        vocab_start, vocab_size, shape = ctx.meta
        rows, columns = logits2d.shape
        grad = torch.empty_like(logits2d)
        _gradient_kernel[(rows, triton.cdiv(columns, _BLOCK_V))](
            logits2d,
            labels1d,
            global_max,
            global_sum,
            grad_loss.reshape(-1).float().contiguous(),
            grad,
            columns,
            vocab_start,
            vocab_size,
            BLOCK_V=_BLOCK_V,
        )
        return grad.reshape(shape), None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, vocab_start: int, vocab_size: int, group
) -> torch.Tensor:
    """Per-token loss [s, b] of logits [s, b, V/TP] (this rank's columns from vocab_start) and labels
    [s, b]; columns at or beyond vocab_size are padding, outside the softmax."""
    if runs_on(logits):
        return _FusedVocabParallelCrossEntropy.apply(logits, labels, vocab_start, vocab_size, group)
    return cross_entropy_reference(logits, labels, vocab_start, vocab_size)
