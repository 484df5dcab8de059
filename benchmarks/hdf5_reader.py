#!/usr/bin/env python
"""The HDF5 path (LLM360's released Crystal layout, data/hdf5_source.py, read in Cerebras's order) against
the indexed path (Megatron-Core's .bin/.idx, this project's blending) on the same tokens, in one run, at
sizes that show how each grows:
  (a) indexed: the N x W tokens as one indexed dataset of documents (lengths 50..1500), one source;
  (b) HDF5: the same tokens as N samples (ids, mask, labels) of width W in F gzip files (chunks (1, 3, W),
      as released), one source in Cerebras's order.
For each: start-up (the phases file loaded, the dataset built, the first sample in hand), samples/s of one
reader over the first K samples of the stream (the per-sample work of a DataLoader worker), and the memory
each of 2 DataLoader workers holds of its own after reading (Private_Dirty). Then the HDF5 start-up with
10x the files for the same samples (it reads headers only: it should not grow with the files beyond them),
and the margin against what a 7B reader must serve at 10,000 tokens/s per GPU.

  python benchmarks/hdf5_reader.py --sizes 10000,100000 --width 2048
"""

from __future__ import annotations

from megatron_ext.upstream_warnings import silence

silence()  # before Megatron-Core is imported

import argparse
import os
import sys
import tempfile
import time
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

TOKENS_PER_GPU = 10_000  # a 7B's training speed per GPU (tokens/s), the reader's load to compare with


def write_tokens(directory: str, samples: int, width: int, file_counts: tuple[int, ...], seed: int = 0):
    """The same token stream as an indexed dataset (its prefix) and as HDF5 files, once per file count
    (their directories)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    stream = rng.integers(3, 32000, size=samples * width + 1, dtype=np.int32)
    prefix = os.path.join(directory, "tokens")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    lengths = rng.integers(50, 1500, size=samples * width // 50)
    ends = np.cumsum(lengths)
    ends = np.append(ends[ends < len(stream)], len(stream))
    for doc in np.split(stream, ends[:-1]):
        builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
    builder.finalize(prefix + ".idx")
    directories = []
    for files in file_counts:
        directories.append(os.path.join(directory, f"h5_{files}"))
        write_hdf5(directories[-1], stream, samples, width, files)
    return prefix, directories


def write_hdf5(directory: str, stream: np.ndarray, samples: int, width: int, files: int) -> None:
    import h5py

    os.makedirs(directory, exist_ok=True)
    per_file = -(-samples // files)
    for n, first in enumerate(range(0, samples, per_file)):
        count = min(per_file, samples - first)
        start = first * width
        ids = stream[start : start + count * width].reshape(count, width)
        labels = stream[start + 1 : start + count * width + 1].reshape(count, width)
        data = np.stack([ids, np.ones_like(ids), labels], axis=1)
        with h5py.File(os.path.join(directory, f"data-{n:05d}.h5"), "w") as f:
            f.attrs["n_examples"] = count
            f.create_dataset("data", data=data, dtype="i4", chunks=(1, 3, width), compression="gzip")


def phases_file(directory: str, name: str, source: str, samples: int, batch: int) -> str:
    path = os.path.join(directory, f"{name}.yaml")
    order = ", order: cerebras" if source.startswith("{hdf5") else ""
    with open(path, "w") as f:
        f.write(
            f"sources:\n  s: {source}\nphases:\n"
            f"  - {{iters: {samples // batch}, global_batch_size: {batch}, blend: {{s: 1.0}}{order},\n"
            "     lr: {peak: 1.0}}\n"
        )
    return path


def start(path: str, width: int, batch: int):
    """(dataset, schedule, seconds to the first sample)."""
    from megatron_ext.data.phase_schedule import PhaseSchedule
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.data.phases_config import load_phases

    began = time.perf_counter()
    config = load_phases(path, width, batch, 1234, has_fim_tokens=False)
    dataset, schedule = PhasedDataset(config, width), PhaseSchedule(config)
    dataset.open_epochs({})
    dataset[schedule.next()]
    return dataset, schedule, time.perf_counter() - began


def read_rate(dataset, schedule, k: int) -> float:
    refs = schedule.take(k)
    began = time.perf_counter()
    for ref in refs:
        dataset[ref]
    return k / (time.perf_counter() - began)


def worker_memory(dataset, schedule, k: int) -> float:
    """Private_Dirty MB of each of 2 DataLoader workers (the largest) after they read k samples."""
    import torch

    from megatron_ext.process_memory import child_processes, unshared_memory_mb

    refs = schedule.take(k)
    loader = torch.utils.data.DataLoader(
        refs, batch_size=8, num_workers=2, collate_fn=lambda b: [dataset[r] for r in b], persistent_workers=True
    )
    iterator = iter(loader)
    for _ in range(len(loader) - 2):
        next(iterator)
    memory = max(unshared_memory_mb(pid) for pid in child_processes())
    del iterator, loader
    return memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000", help="samples per size, comma-separated")
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--files", type=int, default=10, help="HDF5 files per size (and 10x that for the start-up check)")
    p.add_argument("--read", type=int, default=2000, help="samples read per measurement")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    rows = []
    for samples in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            prefix, (h5, many) = write_tokens(tmp, samples, args.width, (args.files, 10 * args.files))
            print(f"{samples:,} samples of {args.width}: written in {time.perf_counter() - began:.0f} s "
                  f"(HDF5 {sum(os.path.getsize(os.path.join(h5, f)) for f in os.listdir(h5)) / 2**30:.2f} GiB)",
                  flush=True)  # fmt: skip
            indexed = phases_file(tmp, "indexed", f"{{prefixes: [{prefix}]}}", samples, args.batch)
            hdf5 = phases_file(tmp, "hdf5", f"{{hdf5: [{h5}]}}", samples, args.batch)
            hdf5_many = phases_file(tmp, "hdf5_many", f"{{hdf5: [{many}]}}", samples, args.batch)
            row = {"samples": samples}
            for name, path in (("indexed", indexed), ("hdf5", hdf5)):
                dataset, schedule, row[f"{name}_start"] = start(path, args.width, args.batch)
                row[f"{name}_rate"] = read_rate(dataset, schedule, args.read)
                row[f"{name}_worker_mb"] = worker_memory(dataset, schedule, args.read)
            row["hdf5_many_start"] = start(hdf5_many, args.width, args.batch)[2]
            rows.append(row)
    print("\n| samples | start-up indexed / HDF5 / HDF5 x10 files (s) | samples/s indexed / HDF5 (ratio) | "
          "worker MB indexed / HDF5 |")  # fmt: skip
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['samples']:,} | {r['indexed_start']:.2f} / {r['hdf5_start']:.2f} / {r['hdf5_many_start']:.2f} | "
            f"{r['indexed_rate']:,.0f} / {r['hdf5_rate']:,.0f} ({r['hdf5_rate'] / r['indexed_rate']:.2f}) | "
            f"{r['indexed_worker_mb']:.1f} / {r['hdf5_worker_mb']:.1f} |"
        )
    need = TOKENS_PER_GPU / args.width
    worst = min(r["hdf5_rate"] for r in rows)
    print(
        f"\na 7B at {TOKENS_PER_GPU:,} tokens/s per GPU reads {need:.1f} samples/s per GPU; a reader serves its "
        f"TP x PP GPUs (2 for Crystal at TP 2): {2 * need:.1f} samples/s. One HDF5 reader process, no workers: "
        f"{worst:,.0f} samples/s, {worst / (2 * need):.0f}x that"
    )


if __name__ == "__main__":
    main()
