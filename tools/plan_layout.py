#!/usr/bin/env python
"""Which layouts fit a cluster, fastest first, with every number explained by part.

  python tools/plan_layout.py --model crystal-7b --gpus 64 --gpu-memory-gib 80 --global-batch-size 1024

For each layout the model allows (TP, PP, VP, DP, micro-batch, recomputation, distributed optimizer,
sequence parallelism): the predicted memory of the most loaded GPU by part (weights, gradients, optimizer
state, activations in flight; megatron_ext/model/memory.py, checked against real tensors in
tests/test_memory.py) and a predicted step time by part (compute at --mfu of --peak-tflops, pipeline bubble,
tensor-, pipeline- and data-parallel communication at the stated link bandwidths; the formulas are in
megatron_ext/model/layout_plan.py). Then the pretrain_crystal.py flags of the best one. The times are
predictions, not measurements: compare the best few on the cluster.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported

from megatron_ext.model import layout_plan, memory  # noqa: E402
from megatron_ext.model.crystal_gpt import padded_vocab_size  # noqa: E402
from megatron_ext.training.arguments import add_run_flags, model_config  # noqa: E402

PROG = "plan_layout.py"
GIB = memory.GIB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    add_run_flags(p, "preset", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
                  "vocab_size", "make_vocab_size_divisible_by", "global_batch_size")  # fmt: skip
    cluster = layout_plan.Cluster(gpus=1)
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the job")
    p.add_argument("--gpu-memory-gib", type=float, default=cluster.gpu_memory_gib, help="memory of one GPU")
    p.add_argument("--gpus-per-node", type=int, default=cluster.gpus_per_node)
    p.add_argument("--peak-tflops", type=float, default=cluster.peak_tflops, help="dense bf16 peak of one GPU")
    p.add_argument("--mfu", type=float, default=cluster.mfu, help="the compute part's fraction of the peak")
    p.add_argument("--intra-node-gbps", type=float, default=cluster.intra_node_gbps, help="GB/s per GPU in a node")
    p.add_argument("--inter-node-gbps", type=float, default=cluster.inter_node_gbps, help="GB/s per GPU across nodes")
    p.add_argument("--headroom-gib", type=float, default=cluster.headroom_gib,
                   help="left free on each GPU (CUDA context, NCCL buffers, fragmentation)")  # fmt: skip
    p.add_argument("--top", type=int, default=12, help="layouts listed")
    return p


def describe(plan: layout_plan.Plan) -> str:
    layout, mem, time = plan.layout, plan.memory, plan.time
    recompute = layout.recompute_granularity or "-"
    return (
        f"| {layout.tp} | {layout.pp} | {layout.vp or '-'} | {layout.dp} | {layout.micro_batch_size} | {recompute} | "
        f"{'yes' if layout.distributed_optimizer else 'no'} | {'yes' if layout.sequence_parallel else 'no'} | "
        f"{mem.weights / GIB:.1f} | {mem.gradients / GIB:.1f} | {mem.optimizer / GIB:.1f} | "
        f"{mem.activations / GIB:.1f} | {mem.total / GIB:.1f} | {time.compute:.2f} | {time.bubble:.2f} | "
        f"{time.tp_comm:.2f} | {time.pp_comm:.2f} | {time.dp_comm:.2f} ({time.dp_comm_total:.2f}) | {time.total:.2f} |"
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.gpus < 1:
        print(f"{PROG}: error: --gpus must be >= 1", file=sys.stderr)
        return 2
    crystal = model_config(vars(args))
    padded = padded_vocab_size(crystal.vocab_size, args.make_vocab_size_divisible_by)
    cluster = layout_plan.Cluster(
        args.gpus, args.gpu_memory_gib, args.gpus_per_node, args.peak_tflops, args.mfu, args.intra_node_gbps,
        args.inter_node_gbps, args.headroom_gib,
    )  # fmt: skip
    plans = layout_plan.plan(crystal, padded, cluster, args.global_batch_size)
    fitting = [p for p in plans if p.fits]
    budget = args.gpu_memory_gib - args.headroom_gib
    print(
        f"{args.preset}: {crystal.num_parameters():,} parameters, sequence {crystal.seq_length}, global batch "
        f"{args.global_batch_size} | {args.gpus} GPUs of {args.gpu_memory_gib:g} GiB ({budget:g} GiB usable), "
        f"{args.gpus_per_node} a node | {len(fitting)} of {len(plans)} layouts fit\n"
        f"memory (GiB) of the most loaded GPU; time (s a step) at {100 * args.mfu:g}% MFU of {args.peak_tflops:g} "
        f"TFLOP/s, {args.intra_node_gbps:g} GB/s in a node, {args.inter_node_gbps:g} GB/s across; DP: exposed (total)"
    )
    print(
        "| TP | PP | VP | DP | MBS | recompute | dist-opt | SP | weights | grads | optimizer | activations | total | "
        "compute | bubble | TP comm | PP comm | DP comm | step |\n" + "|---" * 19 + "|"
    )
    for plan in fitting[: args.top]:
        print(describe(plan))
    if not fitting:
        smallest = min(plans, key=lambda p: p.memory.total) if plans else None
        why = f"the smallest needs {smallest.memory.total / GIB:.1f} GiB" if smallest else "no layout is allowed"
        print(f"{PROG}: error: no layout fits {budget:g} GiB a GPU ({why}); add GPUs", file=sys.stderr)
        return 2
    best = fitting[0]
    tokens = args.global_batch_size * crystal.seq_length / best.time.total / args.gpus
    print(
        f"best: {best.time.total:.2f} s a step, {tokens:,.0f} tokens/s/GPU predicted, {best.memory.total / GIB:.1f} "
        f"GiB a GPU\nflags: {' '.join(layout_plan.flags(best, crystal))} --global-batch-size {args.global_batch_size}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
