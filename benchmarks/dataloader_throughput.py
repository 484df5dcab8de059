#!/usr/bin/env python
"""Sample throughput and start-up time of the phased dataset against Megatron-Core's BlendedDataset over
the same prefixes and weights, in one run, one process (the per-sample work a DataLoader worker does):
  (a) Megatron-Core: BlendedMegatronDatasetBuilder -> BlendedDataset of GPTDatasets (index building from
      an empty cache, then dataset[i] for i in order);
  (b) this project: PhasedDataset over one phase with the same blend, no FIM (schedule + dataset[ref]);
  (c) the same with FIM on the code source (rate 0.9, SPM 0.5, Crystal's phase 2).
Prints samples/s and start-up seconds for each, and the ratios b/a (goal >= 0.9) and start-up b/a
(goal <= 1).

  python benchmarks/dataloader_throughput.py --samples 20000 --seq-length 2048
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

from megatron_ext.data.phase_schedule import PhaseSchedule  # noqa: E402
from megatron_ext.data.phased_dataset import PhasedDataset  # noqa: E402
from megatron_ext.data.phases_config import FimSpec, LRSpec, PhasesConfig, PhaseSpec, SourceSpec  # noqa: E402
from megatron_ext.tokenizer import CrystalTokenizer  # noqa: E402


def synthetic_corpus(directory: str, documents: int, seed: int = 0) -> list[str]:
    """Two indexed datasets of random documents (lengths 50..1500 tokens), for start-up at scale."""
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    prefixes = []
    for name in ("text", "code"):
        prefix = os.path.join(directory, name)
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        lengths = rng.integers(50, 1500, size=documents)
        tokens = rng.integers(3, 32000, size=int(lengths.sum()), dtype=np.uint16)
        for doc in np.split(tokens, np.cumsum(lengths)[:-1]):
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        builder.finalize(prefix + ".idx")
        prefixes.append(prefix)
    return prefixes


def megatron_blend(args, cache: str):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_ext.training.batches.datasets import DatasetTokenizerInfo

    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=args.seq_length,
        blend=(args.prefixes, args.weights),
        split="100,0,0",
        path_to_cache=cache,
        tokenizer=DatasetTokenizerInfo(vocab_size=32032),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    start = time.perf_counter()
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [args.samples, 0, 0], lambda: True, config).build()
    train[0]  # start-up ends with the first sample in hand
    return train, time.perf_counter() - start


def phased(args, fim: bool, tokenizer):
    names = [f"source{i}" for i in range(len(args.prefixes))]
    sources = {n: SourceSpec(n, (p,)) for n, p in zip(names, args.prefixes)}
    fims = {names[-1]: FimSpec(0.9, 0.5)} if fim else {}
    phase = PhaseSpec("bench", -(-args.samples // 8), 8, dict(zip(names, args.weights)), fims, LRSpec(peak=1e-3))
    config = PhasesConfig("benchmark", 1234, 0.0, sources, (phase,))
    start = time.perf_counter()
    dataset = PhasedDataset(config, args.seq_length, tokenizer)
    schedule = PhaseSchedule(config)
    dataset.open_epochs({})  # every source's first epoch's order is built, as the trainer does
    return dataset, schedule, time.perf_counter() - start


def rate(fn, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--prefixes",
        nargs="+",
        default=[
            os.path.join(REPO, "data/demo/text_text_document"),
            os.path.join(REPO, "data/demo/code_text_document"),
        ],
    )
    p.add_argument("--weights", nargs="+", type=float, default=[0.6, 0.4])
    p.add_argument("--tokenizer-model", default=os.path.join(REPO, "data/demo/crystal_demo.model"))
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--fim-samples", type=int, default=2000, help="FIM re-tokenises: fewer samples suffice")
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument(
        "--synthetic-documents",
        type=int,
        default=0,
        help="instead of --prefixes: two generated sources of this many random documents each",
    )
    args = p.parse_args()
    workdir = tempfile.TemporaryDirectory()
    if args.synthetic_documents:
        args.prefixes = synthetic_corpus(workdir.name, args.synthetic_documents)

    import torch

    # Megatron-Core's index builders coordinate through a process group, even alone.
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    with tempfile.TemporaryDirectory() as cache:
        megatron, megatron_start = megatron_blend(args, cache)
        megatron_rate = rate(lambda i: megatron[i], args.samples)
    tokenizer = CrystalTokenizer(args.tokenizer_model)
    ours, schedule, ours_start = phased(args, False, tokenizer)
    ours_rate = rate(lambda i: ours[schedule.next()], args.samples)
    fim, fim_schedule, _ = phased(args, True, tokenizer)
    fim_rate = rate(lambda i: fim[fim_schedule.next()], args.fim_samples)

    workdir.cleanup()
    print(f"{args.samples:,} samples of {args.seq_length} tokens, weights {args.weights}, sources {args.prefixes}")
    print(f"(a) Megatron-Core BlendedDataset  {megatron_rate:9,.0f} samples/s   start-up {megatron_start:6.2f}s")
    print(f"(b) phased dataset, no FIM        {ours_rate:9,.0f} samples/s   start-up {ours_start:6.2f}s")
    print(f"(c) phased dataset, FIM on code   {fim_rate:9,.0f} samples/s")
    print(
        f"ratio b/a {ours_rate / megatron_rate:.2f} (goal >= 0.9); start-up b/a {ours_start / megatron_start:.2f} "
        f"(goal <= 1); FIM c/b {fim_rate / ours_rate:.2f}"
    )


if __name__ == "__main__":
    main()
