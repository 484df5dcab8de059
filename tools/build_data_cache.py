#!/usr/bin/env python
"""Build every index a phases file's run will read, ahead of the job, so that a 512-GPU job does not spend
its first minutes on it: each source's document pools (training and held-out) and the orders of every
epoch the run reads, written under --data-cache-path as pretrain_crystal.py finds them (data/index_cache.py).

  python tools/build_data_cache.py --phases examples/phases/crystal.yaml --seq-length 2048 \\
      --data-cache-path /shared/cache [--global-batch-size 2112 --seed 1234 --train-iters N]

Give the values the job will run with: the indices depend on the sequence length and the seed (and the
epochs read on the batch sizes and iterations). A second run finds everything built and returns at once.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.training.arguments import add_run_flags  # noqa: E402
from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()

PROG = "build_data_cache.py"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", required=True)
    p.add_argument("--seq-length", type=int, required=True)
    p.add_argument("--data-cache-path", required=True, help="as given to pretrain_crystal.py")
    add_run_flags(p, "global_batch_size", "seed")  # as pretrain_crystal.py defines them
    p.add_argument("--train-iters", type=int, help="default: all the phases")
    args = p.parse_args(argv)

    from megatron_ext.data.index_cache import IndexCacheError
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.data.phases_config import PhasesConfigError, load_phases

    started = time.perf_counter()
    cache = os.path.join(args.data_cache_path, "phases")
    try:
        config = load_phases(args.phases, args.seq_length, args.global_batch_size, args.seed, has_fim_tokens=True)
        train = PhasedDataset(config, args.seq_length, cache_dir=cache)
        if config.validation_fraction:
            for stream in PhasedDataset(config, args.seq_length, split="valid", cache_dir=cache).streams:
                stream.prepare(0)  # the held-out samples every evaluation reads
        epochs = train.epochs_read(args.train_iters)
        for stream in train.streams:
            if stream.spec.is_hdf5:  # ready samples, read as stored: their file headers are all there is to read
                files = stream.spec.hdf5_files
                print(f"{PROG}: {stream.spec.name}: HDF5, {stream.samples_per_epoch:,} samples in {len(files.paths)} "
                      "file(s): nothing to build", flush=True)  # fmt: skip
                continue
            name, needed = stream.spec.name, max(1, math.ceil(epochs[stream.spec.name]))
            t = time.perf_counter()
            for epoch in range(needed):
                stream.prepare(epoch)
            print(f"{PROG}: {name}: {len(stream.doc_ids):,} documents, {needed} epoch(s) "
                  f"in {time.perf_counter() - t:.1f} s -> {stream.cache.dir}", flush=True)  # fmt: skip
    except (PhasesConfigError, IndexCacheError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(f"{PROG}: done in {time.perf_counter() - started:.1f} s; pass --data-cache-path {args.data_cache_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
