"""Which parallel layouts fit a cluster, and which is fastest: every layout the model allows (TP dividing its
heads and FFN width, PP its layers, VP a stage's layers), with its memory per GPU by part (memory.py) and a
predicted step time by part, best first. NeMo's auto-configurator is the anchor; unlike it, every number
here is a formula one can check:

  compute    FLOPs of a step (Megatron-LM's count; +1 forward of the layers with full recomputation) /
             (GPUs x peak x the stated MFU)
  bubble     compute x (PP - 1) / (VP x micro-batches per DP rank)          (1F1B, interleaved with VP)
  TP comm    per micro-batch and layer, 4 all-reduces (2 with recomputation redone: 6) of s b h bf16 values,
             ring cost 2 (t-1)/t x bytes / the intra-node link; not overlapped (no TE: no --tp-comm-overlap)
  PP comm    per micro-batch, an activation forward and a gradient back, s b h bf16 values (/t with SP), over
             the link between stages (intra-node when a model replica fits a node)
  DP comm    the gradients' reduction ((d-1)/d x 2 x bytes for an all-reduce; with the distributed optimizer a
             reduce-scatter of the gradients and an all-gather of bf16 parameters, (d-1)/d x bytes each), over
             the inter-node link when data-parallel ranks span nodes; overlapped (--overlap-grad-reduce,
             --overlap-param-gather) with the last micro-batch's backward and the first one's forward, so only
             what exceeds them is exposed
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.model import memory
from megatron_ext.model.crystal_config import CrystalConfig, layout_problem


@dataclass(frozen=True)
class Cluster:
    gpus: int
    gpu_memory_gib: float = 80.0
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16, H100 SXM
    mfu: float = 0.45  # of the compute part (Megatron-LM reaches ~47% on H100 with overlap on)
    intra_node_gbps: float = 450.0  # GB/s per GPU (NVLink 4, one direction)
    inter_node_gbps: float = 50.0  # GB/s per GPU (400 Gb/s InfiniBand)
    headroom_gib: float = 6.0  # CUDA context, NCCL buffers, allocator fragmentation


@dataclass(frozen=True)
class StepTime:
    compute: float
    bubble: float
    tp_comm: float
    pp_comm: float
    dp_comm: float  # exposed
    dp_comm_total: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.pp_comm + self.dp_comm


@dataclass(frozen=True)
class Plan:
    layout: memory.Layout
    memory: memory.Memory  # the most loaded stage's rank
    time: StepTime
    fits: bool


# The planner's recomputation choices: none, or full by single layers. Selective (core attention) is left
# out: with SDPA / flash attention it saves only the log-sum-exp (a s b fp32 values a layer), well under 1%.
RECOMPUTE = {
    None: {},
    "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
}


def _splits(crystal: CrystalConfig, gpus: int, gpus_per_node: int, vocab_divisible_by: int):
    """(TP, PP, VP) the model allows: TP within a node, the project's layout rules (layout_problem), VP
    dividing a stage's layers."""
    for tp in (t for t in range(1, gpus_per_node + 1) if gpus_per_node % t == 0):
        for pp in range(1, crystal.num_layers + 1):
            if gpus % (tp * pp) or layout_problem(crystal, tp, pp, vocab_divisible_by):
                continue
            stage_layers = crystal.num_layers // pp
            yield tp, pp, None
            for vp in range(2, stage_layers + 1) if pp > 1 else ():
                if stage_layers % vp == 0:
                    yield tp, pp, vp


def candidate_layouts(crystal: CrystalConfig, gpus: int, global_batch: int, gpus_per_node: int,
                      vocab_divisible_by: int = 128) -> list[memory.Layout]:  # fmt: skip
    """Every layout the model and the batch allow; DP = GPUs / (TP x PP) dividing the batch with the
    micro-batch; sequence parallelism wherever TP > 1 (as Megatron-LM advises); bf16 with the fused kernels."""
    layouts = []
    for tp, pp, vp in _splits(crystal, gpus, gpus_per_node, vocab_divisible_by):
        dp = gpus // (tp * pp)
        for mbs in (1, 2, 4, 8):
            m = global_batch // (mbs * dp)
            if global_batch % (mbs * dp) or (vp and m % pp):  # interleaving needs micro-batches in PP multiples
                continue
            for recompute in RECOMPUTE.values():
                for dist_opt in (False, True) if dp > 1 else (False,):
                    layouts.append(memory.Layout(tp=tp, pp=pp, vp=vp, dp=dp, micro_batch_size=mbs, num_microbatches=m,
                                                 sequence_parallel=tp > 1, distributed_optimizer=dist_opt, bf16=True,
                                                 fused_swiglu=True, **recompute))  # fmt: skip
    return layouts


def _ring(bytes_: float, ranks: int, gbps: float, factor: float = 2.0) -> float:
    return factor * (ranks - 1) / ranks * bytes_ / (gbps * 1e9) if ranks > 1 else 0.0


def step_time(crystal: CrystalConfig, padded_vocab: int, layout: memory.Layout, cluster: Cluster,
              global_batch: int, peak_memory: memory.Memory) -> StepTime:  # fmt: skip
    from megatron_ext.training.metrics import training_flops_per_token

    s, h = crystal.seq_length, crystal.hidden_size
    flops = training_flops_per_token(crystal, s, padded_vocab) * global_batch * s
    if layout.recompute_granularity == "full":  # one more forward of the layers (not of the output layer)
        layer_flops = crystal.num_layers * (2 * (4 * h * h + 3 * h * crystal.ffn_hidden_size) + 4 * s * h)
        flops += layer_flops * global_batch * s
    compute = flops / cluster.gpus / (cluster.peak_tflops * 1e12 * cluster.mfu)
    m = layout.num_microbatches
    bubble = compute * (layout.pp - 1) / ((layout.vp or 1) * m)
    activation = s * layout.micro_batch_size * h * 2  # bf16 bytes of one micro-batch's hidden states
    layers = crystal.num_layers // layout.pp
    all_reduces = 6 if layout.recompute_granularity == "full" else 4
    tp_comm = m * layers * all_reduces * _ring(activation, layout.tp, cluster.intra_node_gbps)
    replica_in_node = layout.tp * layout.pp <= cluster.gpus_per_node
    pp_link = cluster.intra_node_gbps if replica_in_node else cluster.inter_node_gbps
    pp_bytes = activation / (layout.tp if layout.sequence_parallel else 1)
    pp_comm = 2 * m * pp_bytes / (pp_link * 1e9) if layout.pp > 1 else 0.0
    dp_link = cluster.inter_node_gbps if cluster.gpus > cluster.gpus_per_node else cluster.intra_node_gbps
    params = peak_memory.parameters
    if layout.distributed_optimizer:
        dp_total = _ring(params * 4, layout.dp, dp_link, 1.0) + _ring(params * 2, layout.dp, dp_link, 1.0)
    else:
        dp_total = _ring(params * 4, layout.dp, dp_link)
    window = compute / m  # the last micro-batch's backward (2/3) and the first one's forward (1/3)
    return StepTime(compute, bubble, tp_comm, pp_comm, max(0.0, dp_total - window), dp_total)


def plan(crystal: CrystalConfig, padded_vocab: int, cluster: Cluster, global_batch: int) -> list[Plan]:
    """Every candidate with its memory (the most loaded stage) and time, the fitting ones first, fastest first."""
    plans = []
    for layout in candidate_layouts(crystal, cluster.gpus, global_batch, cluster.gpus_per_node):
        stages = [memory.estimate(crystal, padded_vocab, layout, stage) for stage in range(layout.pp)]
        peak = max(stages, key=lambda each: each.total)
        fits = peak.total <= (cluster.gpu_memory_gib - cluster.headroom_gib) * memory.GIB
        plans.append(Plan(layout, peak, step_time(crystal, padded_vocab, layout, cluster, global_batch, peak), fits))
    return sorted(plans, key=lambda p: (not p.fits, p.time.total, p.memory.total))


def flags(plan_: Plan, crystal: CrystalConfig) -> list[str]:
    """pretrain_crystal.py's layout flags for a plan (the overlap flags on wherever they apply)."""
    layout = plan_.layout
    out = ["--tensor-model-parallel-size", str(layout.tp), "--pipeline-model-parallel-size", str(layout.pp)]
    if layout.vp:
        out += ["--num-layers-per-virtual-pipeline-stage", str(crystal.num_layers // layout.pp // layout.vp)]
    out += ["--micro-batch-size", str(layout.micro_batch_size), "--bf16"]
    if layout.sequence_parallel:
        out.append("--sequence-parallel")
    if layout.distributed_optimizer:
        out += ["--use-distributed-optimizer", "--overlap-param-gather"]
    if layout.dp > 1:
        out.append("--overlap-grad-reduce")
    if layout.recompute_granularity == "selective":
        out.append("--recompute-activations")
    elif layout.recompute_granularity == "full":
        out += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    return out
