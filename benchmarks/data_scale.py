#!/usr/bin/env python
"""The data path at corpus scale: start-up time (cold and warm index cache), private memory (RssAnon) after
start-up, and samples/s of the phased dataset, side by side with Megatron-Core's BlendedDataset of
GPTDatasets on the same files, each in a fresh process, in one run; then the private memory of two
processes that start on the same sources at once (two ranks of a node), for both. Last, the data path of
real training runs on the same files and on files a tenth their size, as the runs report it themselves:
the ranks that read, set-up time, private memory added on reading and on other ranks (1 rank, TP2, PP2),
and the memory each DataLoader worker holds of its own (2 and 4 workers).

Two synthetic sources of --documents small documents each (8..56 tokens, 32 on average), written straight in
Megatron's .bin/.idx format (its index writer, with the byte offsets computed as one cumulative sum: a
Python loop per document is too slow at this size).

  python benchmarks/data_scale.py --documents 20000000 [--samples 20000 --seq-length 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def write_sources(directory: str, documents: int, seed: int = 0) -> list[str]:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import DType, _IndexWriter

    class VectorisedIndexWriter(_IndexWriter):
        def _sequence_pointers(self, sequence_lengths):
            size = np.int64(DType.size(self.dtype))
            return np.concatenate(([0], np.cumsum(np.asarray(sequence_lengths[:-1], dtype=np.int64) * size)))

    rng = np.random.default_rng(seed)
    prefixes = []
    for name in ("text", "code"):
        prefix = os.path.join(directory, name)
        lengths = rng.integers(8, 57, size=documents).astype(np.int32)
        tokens = rng.integers(3, 32000, size=int(lengths.sum()), dtype=np.uint16)
        tokens[np.cumsum(lengths) - 1] = 2  # every document ends with the end-of-document id
        tokens.tofile(prefix + ".bin")
        with VectorisedIndexWriter(prefix + ".idx", np.uint16) as writer:
            writer.write(lengths, None, np.arange(documents + 1, dtype=np.int64))
        prefixes.append(prefix)
    return prefixes


# One measurement, in a fresh process: start-up (first sample in hand), the RssAnon it added, samples/s.
_CHILD = r"""
import json, os, sys, time
sys.path.insert(0, REPO)
from megatron_ext.upstream_warnings import silence
silence()
import numpy as np, torch
from megatron_ext.process_memory import private_memory_mb
kind, prefixes, cache = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
samples, seq = int(sys.argv[4]), int(sys.argv[5])
if kind == "megatron":
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron_ext.training.batches.datasets import DatasetTokenizerInfo
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    before = private_memory_mb(); start = time.perf_counter()
    config = GPTDatasetConfig(random_seed=1234, sequence_length=seq, blend=(prefixes, [0.5, 0.5]), split="100,0,0",
        path_to_cache=cache, tokenizer=DatasetTokenizerInfo(vocab_size=32032), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False, mid_level_dataset_surplus=0.005)
    data, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()
    data[0]
    startup, memory = time.perf_counter() - start, private_memory_mb() - before
    start = time.perf_counter()
    for i in range(samples):
        data[i]
else:
    from megatron_ext.data.phase_schedule import PhaseSchedule
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.data.phases_config import LRSpec, PhasesConfig, PhaseSpec, SourceSpec
    import megatron.core.datasets.indexed_dataset  # imported before the clock starts, as on the other side
    sources = {n: SourceSpec(n, (p,)) for n, p in zip(("text", "code"), prefixes)}
    phase = PhaseSpec("bench", -(-samples // 8), 8, {"text": 0.5, "code": 0.5}, {}, LRSpec(peak=1e-3))
    config = PhasesConfig("benchmark", 1234, 0.0, sources, (phase,))
    before = private_memory_mb(); start = time.perf_counter()
    data = PhasedDataset(config, seq, cache_dir=None if cache == "-" else cache)
    data.open_epochs({})  # as the trainer does before its first batch
    startup, memory = time.perf_counter() - start, private_memory_mb() - before
    schedule = PhaseSchedule(config)
    start = time.perf_counter()
    for i in range(samples):
        data[schedule.next()]
print(json.dumps({"startup": startup, "memory": memory, "rate": samples / (time.perf_counter() - start)}))
"""


def measure(kind: str, prefixes: list[str], cache: str, samples: int, seq: int, together: int = 1) -> list[dict]:
    code = _CHILD.replace("REPO", repr(REPO), 1)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, kind, ",".join(prefixes), cache, str(samples), str(seq)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )  # fmt: skip
        for _ in range(together)
    ]
    out = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"data_scale.py: the {kind} measurement failed")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


_PHASES = """seed: 1234
sources:
  text: {{prefixes: [{text}]}}
  code: {{prefixes: [{code}]}}
phases:
  - name: bench
    iters: {iters}
    blend: {{text: 0.5, code: 0.5}}
    lr: {{peak: 1.0e-3, min: 1.0e-4, warmup_iters: 1}}
"""

# Lines of pretrain_crystal.py (training/readers.py) with the figures the table takes.
_SETUP = re.compile(
    r"data: read on (\d+) of (\d+) ranks .*set up in ([\d.]+) s; .*: (-?[\d.]+) MB at most on a reader"
    r"(?:, (-?[\d.]+) MB at most on the other ranks)?"
)
_WORKERS = re.compile(r"data: (\d+) DataLoader worker\(s\) per reading rank, (\d+) in all; .*: ([\d.]+) MB at most")


def measure_runs(work: str, sources: dict[str, list[str]], seq: int, iters: int = 3) -> None:
    """The data path of real training runs (pretrain_crystal.py, crystal-test, gloo on CPU) over the same
    files: what it reports of itself after set-up (per rank, readers and the others) and after the first
    step (per DataLoader worker), for one rank, TP2, PP2 and 2 or 4 workers; the index cache pre-built with
    tools/build_data_cache.py, as a job would find it."""
    import socket

    print(f"\nreal runs' data path (sequence {seq}, index cache pre-built):")
    print(f"{'':44s} {'readers':>8s} {'set-up s':>9s} {'reader MB':>10s} {'other MB':>9s} {'worker MB':>10s}")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    for label, prefixes in sources.items():
        phases = os.path.join(work, f"phases_{label}.yaml")
        with open(phases, "w") as f:
            f.write(_PHASES.format(text=prefixes[0], code=prefixes[1], iters=iters))
        cache = os.path.join(work, f"run_cache_{label}")
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, os.path.join(REPO, "tools", "build_data_cache.py"), "--phases", phases, "--seq-length",
             str(seq), "--data-cache-path", cache], check=True, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        print(f"  {label}: tools/build_data_cache.py built the indices in {time.perf_counter() - started:.1f} s")
        layouts = [("1 rank", 1, []), ("TP2, 2 ranks", 2, ["--tensor-model-parallel-size", "2"]),
                   ("PP2, 2 ranks", 2, ["--pipeline-model-parallel-size", "2"])]  # fmt: skip
        layouts += [(f"1 rank, {n} workers", 1, ["--num-workers", str(n)]) for n in (2, 4)]
        for name, nproc, flags in layouts:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                   str(port), os.path.join(REPO, "pretrain_crystal.py"), "--model", "crystal-test", "--vocab-size",
                   "32032", "--seq-length", str(seq), "--phases", phases, "--data-cache-path", cache,
                   "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", str(iters),
                   "--log-interval", str(iters), "--num-workers", "0", *flags]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            setup = _SETUP.search(done.stdout)
            if done.returncode or not setup:
                raise SystemExit(f"data_scale.py: {label} {name} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
            workers = _WORKERS.search(done.stdout)
            other = setup.group(5) or "-"
            worker = f"{workers.group(3)}" if workers else "-"
            print(
                f"  {label + ': ' + name:42s} {setup.group(1) + '/' + setup.group(2):>8s} {float(setup.group(3)):9.2f} "
                f"{setup.group(4):>10s} {other:>9s} {worker:>10s}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--documents", type=int, default=20_000_000, help="per source")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--workdir", help="default: a temporary directory (about 3 GB at 2 x 10^7 documents)")
    p.add_argument("--run-seq-length", type=int, default=256, help="of the real training runs")
    p.add_argument("--runs-only", action="store_true", help="only the real runs' data path")
    args = p.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="data_scale_")
    started = time.perf_counter()
    prefixes = write_sources(work, args.documents)
    print(f"wrote 2 sources x {args.documents:,} documents in {time.perf_counter() - started:.0f} s under {work}")
    if not args.runs_only:
        compare_datasets(work, prefixes, args.samples, args.seq_length)
    small_dir = os.path.join(work, "tenth")
    os.makedirs(small_dir, exist_ok=True)
    small = write_sources(small_dir, args.documents // 10)
    sizes = {f"2 x {args.documents:,} docs": prefixes, f"2 x {args.documents // 10:,} docs": small}
    measure_runs(work, sizes, args.run_seq_length)
    if not args.workdir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def compare_datasets(work: str, prefixes: list[str], n: int, seq: int) -> None:
    megatron_cache, ours_cache = os.path.join(work, "megatron_cache"), os.path.join(work, "ours_cache")
    rows = {
        "Megatron-Core BlendedDataset, cold cache": measure("megatron", prefixes, megatron_cache, n, seq)[0],
        "Megatron-Core BlendedDataset, warm cache": measure("megatron", prefixes, megatron_cache, n, seq)[0],
        "phased dataset, no cache (built in memory)": measure("phased", prefixes, "-", n, seq)[0],
        "phased dataset, cold cache": measure("phased", prefixes, ours_cache, n, seq)[0],
        "phased dataset, warm cache": measure("phased", prefixes, ours_cache, n, seq)[0],
    }
    two_megatron = measure("megatron", prefixes, megatron_cache, 100, seq, together=2)
    two_ours = measure("phased", prefixes, ours_cache, 100, seq, together=2)
    print(f"{'':45s} {'start-up s':>10s} {'RssAnon MB':>11s} {'samples/s':>10s}")
    for name, r in rows.items():
        print(f"{name:45s} {r['startup']:10.2f} {r['memory']:11.0f} {r['rate']:10,.0f}")
    mc, mw = rows["Megatron-Core BlendedDataset, cold cache"], rows["Megatron-Core BlendedDataset, warm cache"]
    oc, ow = rows["phased dataset, cold cache"], rows["phased dataset, warm cache"]
    print(
        f"warm start-up ours/Megatron {ow['startup'] / mw['startup']:.2f} (goal <= 1); warm memory "
        f"{ow['memory'] / max(mw['memory'], 1):.2f} (goal <= 1); cold start-up {oc['startup'] / mc['startup']:.2f} "
        f"(goal <= 1.5); samples/s {ow['rate'] / mw['rate']:.2f} (goal >= 0.9)"
    )
    print(
        "two processes at once (warm), RssAnon MB each: Megatron-Core "
        + ", ".join(f"{r['memory']:.0f}" for r in two_megatron)
        + "; phased "
        + ", ".join(f"{r['memory']:.0f}" for r in two_ours)
    )


if __name__ == "__main__":
    main()
