#!/usr/bin/env python
"""Checkpoint I/O: what a save costs the training step, synchronous against --async-save, the bytes each
rank writes with and without --ckpt-fully-parallel-save, and the load time with and without
--ckpt-fully-parallel-load, at growing widths; the baseline, measured in the same run, is this machine's
write bandwidth (each rank writing and fsyncing as many bytes as its share of the checkpoint at once).

  torchrun --nproc-per-node 2 benchmarks/checkpoint_io.py --hidden-sizes 256 512 1024 --dir /tmp/ckpt_io

Each width: pretrain_crystal.py's Trainer (crystal-test's layers, the distributed optimizer) takes one step
so that the optimizer state exists, then CheckpointSaver writes: one save to warm up (Megatron-Core plans
and caches the write), then --repeats timed saves each way. Blocking time is what the step waits;
"async complete" is until the background write is finished and the checkpoint complete. "hashing" is the
slowest rank's SHA-256 of its files in a synchronous save (checkpoint_integrity.py: each rank its own
shards, rank 0 the rest); the load is timed verified (the default: each rank hashes a share first) and
unverified (--no-verify-integrity).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported

from megatron_ext import checkpoint_files, checkpointing  # noqa: E402
from megatron_ext.training import arguments, distributed  # noqa: E402
from megatron_ext.training.batches import feeds  # noqa: E402
from megatron_ext.training.loop import Trainer  # noqa: E402


def bytes_by_rank(path: str) -> dict[int, int]:
    """torch_dist's shard files are __<rank>_<n>.distcp."""
    written: dict[int, int] = {}
    for name in os.listdir(path):
        if name.startswith("__") and name.endswith(".distcp"):
            rank = int(name.split("_")[2])
            written[rank] = written.get(rank, 0) + os.path.getsize(os.path.join(path, name))
    return written


def write_bandwidth(directory: str, nbytes: int) -> float:
    """Bytes/s of every rank writing nbytes to its own file and fsyncing it, all at once (the slowest rank)."""
    path = os.path.join(directory, f"bandwidth_{torch.distributed.get_rank()}.bin")
    block = os.urandom(1 << 20)
    torch.distributed.barrier()
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = torch.tensor([time.perf_counter() - start])
    torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    os.remove(path)
    return max(1, nbytes >> 20) * (1 << 20) / seconds.item()


def slowest(seconds: float) -> float:
    figure = torch.tensor([seconds])
    torch.distributed.all_reduce(figure, op=torch.distributed.ReduceOp.MAX)
    return figure.item()


def timed(fn) -> float:
    torch.distributed.barrier()
    start = time.perf_counter()
    fn()
    return slowest(time.perf_counter() - start)


def measure(run, directory: str, repeats: int) -> dict:
    trainer = Trainer(run, torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda"))
    trainer.set_data(feeds.build(run))
    trainer.train_step(trainer.train_iterators(1))
    states = trainer.states()
    metadata = checkpointing.checkpoint_metadata(run.crystal, run.model.padded_vocab, None)
    figures: dict = {"parameters": run.crystal.num_parameters()}
    for name, fully_parallel, asynchronous in (("one", False, False), ("sync", True, False), ("async", True, True)):
        root = os.path.join(directory, name)
        saver = checkpointing.CheckpointSaver(
            root, keep_last=1, fully_parallel=fully_parallel, asynchronous=asynchronous
        )
        saver.save(1, states, metadata)
        saver.wait()
        blocking, complete, gather, hashing = [], [], [], []
        for iteration in range(2, 2 + repeats):
            start = time.perf_counter()
            blocking.append(timed(lambda i=iteration: saver.save(i, states, metadata)))
            gather.append(saver.gather_seconds)
            saver.wait()
            complete.append(time.perf_counter() - start)
            hashing.append(slowest(saver.hash_seconds))
        saver.close()
        figures[name] = (statistics.median(blocking), statistics.median(complete), statistics.median(gather))
        figures[name + "_hashing"] = statistics.median(hashing)
        figures[name + "_bytes"] = bytes_by_rank(checkpoint_files.iteration_dir(root, 1 + repeats))
    for name, fully_parallel, verify in (("load", False, True), ("load_parallel", True, True),
                                         ("load_unverified", False, False)):  # fmt: skip
        root = os.path.join(directory, "sync")
        crystal, padded = run.crystal, run.model.padded_vocab
        figures[name] = timed(
            lambda fp=fully_parallel, v=verify: checkpointing.load_checkpoint(
                root, states, crystal, padded, fully_parallel=fp, verify=v
            )
        )
    share = max(figures["sync_bytes"].values())
    figures["bandwidth"] = write_bandwidth(directory, share)
    return figures


def main() -> None:
    bench = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bench.add_argument("--hidden-sizes", type=int, nargs="+", default=[256, 512, 1024])
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--optimizers", nargs="+", choices=("distributed", "plain"), default=["distributed", "plain"])
    bench.add_argument("--dir", default="runs/checkpoint_io")
    own = bench.parse_args()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    runs = []
    for hidden in own.hidden_sizes:
        for kind in own.optimizers:
            argv = ["--model", "crystal-test", "--hidden-size", str(hidden), "--ffn-hidden-size", str(hidden * 8 // 3),
                    "--num-attention-heads", "4", "--mock-data", "--num-workers", "0", "--micro-batch-size", "1",
                    "--global-batch-size", str(world_size), "--train-iters", "1"]  # fmt: skip
            argv += ["--use-distributed-optimizer"] if kind == "distributed" else []
            runs.append((hidden, kind, arguments.validate(arguments.build_parser().parse_args(argv), world_size)))
    distributed.initialize(runs[0][2])
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        print(
            f"{world_size} ranks (data-parallel), crystal-test layers; medians of "
            f"{own.repeats} saves; seconds are the slowest rank's\n"
            "| hidden | optimizer | parameters | checkpoint MB | MB per rank, one writer | MB per rank, parallel | "
            "sync blocks s | async blocks s (gathering the state) | async complete s | sync / async blocking | "
            "load s | parallel load s | disk MB/s per rank | sync MB/s per rank | unverified load s | "
            "hashing at save s |\n" + "|---" * 16 + "|"
        )
    for hidden, kind, run in runs:
        directory = os.path.join(own.dir, f"hidden{hidden}_{kind}")
        if rank0:
            shutil.rmtree(directory, ignore_errors=True)
            os.makedirs(directory)
        torch.distributed.barrier()
        f = measure(run, directory, own.repeats)
        if rank0:
            total = sum(f["sync_bytes"].values())
            one = "/".join(f"{f['one_bytes'].get(r, 0) / 1e6:.1f}" for r in range(world_size))
            shared = "/".join(f"{f['sync_bytes'].get(r, 0) / 1e6:.1f}" for r in range(world_size))
            sync_block, async_block = f["sync"][0], f["async"][0]
            print(
                f"| {hidden} | {kind} | {f['parameters']:,} | {total / 1e6:.1f} | {one} | {shared} | "
                f"{sync_block:.3f} | {async_block:.3f} ({f['async'][2]:.3f}) | {f['async'][1]:.3f} | "
                f"{sync_block / async_block:.1f}x | {f['load']:.3f} | {f['load_parallel']:.3f} | "
                f"{f['bandwidth'] / 1e6:.0f} | {max(f['sync_bytes'].values()) / sync_block / 1e6:.0f} | "
                f"{f['load_unverified']:.3f} | {f['sync_hashing']:.3f} |",
                flush=True,
            )
    distributed.shutdown()


if __name__ == "__main__":
    main()
