"""The run's memory: what each pipeline stage's ranks will need, predicted at start-up from the layout
(megatron_ext/model/memory.py), and on a GPU what a rank holds, measured at each log step (allocated,
reserved, peak: torch.cuda's allocator statistics), for the log line and --log-memory-to-tensorboard."""

from __future__ import annotations

import torch

from megatron_ext import cpu_compat
from megatron_ext.model import memory
from megatron_ext.training.metric_sinks import MEMORY
from megatron_ext.training.run_config import RunConfig


def layout_of(run: RunConfig, global_batch_size: int | None = None) -> memory.Layout:
    layout, recompute = run.layout, run.recompute
    return memory.Layout(
        tp=layout.tensor_model_parallel_size,
        pp=layout.pipeline_model_parallel_size,
        vp=layout.virtual_pipeline_model_parallel_size,
        dp=layout.data_parallel_size,
        micro_batch_size=layout.micro_batch_size,
        num_microbatches=layout.num_microbatches(global_batch_size or run.optimizer.global_batch_size),
        sequence_parallel=layout.sequence_parallel,
        distributed_optimizer=layout.use_distributed_optimizer,
        bf16=run.kernels.bf16,
        grad_reduce_in_fp32=not layout.grad_reduce_in_bf16,
        recompute_granularity=recompute.granularity,
        recompute_method=recompute.recompute_method,
        recompute_num_layers=recompute.recompute_num_layers,
        fused_swiglu=run.kernels.path.fused_swiglu,
    )


def predicted_lines(run: RunConfig) -> list[str]:
    """One line per pipeline stage: every rank of a stage needs the same (the first stage holds the most
    activations in flight, the last the logits)."""
    layout = layout_of(run)
    lines = []
    for stage in range(layout.pp):
        estimate = memory.estimate(run.crystal, run.model.padded_vocab, layout, stage)
        where = f"stage {stage + 1}/{layout.pp}" if layout.pp > 1 else "every rank"
        lines.append(f"memory predicted per rank ({where}): {estimate.describe()}")
    return lines


def measured() -> dict[str, float]:
    """This rank's allocator figures in GiB (empty on CPU, where there is no device allocator)."""
    if cpu_compat.is_active() or not torch.cuda.is_available():
        return {}
    gib = memory.GIB
    return {
        MEMORY + "allocated-gib": torch.cuda.memory_allocated() / gib,
        MEMORY + "reserved-gib": torch.cuda.memory_reserved() / gib,
        MEMORY + "peak-allocated-gib": torch.cuda.max_memory_allocated() / gib,
    }
