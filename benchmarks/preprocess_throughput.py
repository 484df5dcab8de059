#!/usr/bin/env python
"""Preprocessing throughput on one corpus, three ways, in one run:
  (a) raw tokenizer: SentencePiece batch encode of the documents' texts, one process, one thread;
  (b) tools/preprocess_data.py with 1 worker (reading, JSON, tokenising, EOD, writing .bin/.idx);
  (c) tools/preprocess_data.py with N workers (default: the core count).
Prints tokens/s for each and the ratios b/a (goal >= 0.8) and c/b (goal: near N).

  python benchmarks/preprocess_throughput.py --input data/demo/raw --tokenizer-model data/demo/crystal_demo.model
"""

from __future__ import annotations

from megatron_ext.upstream_warnings import silence

silence()  # before Megatron-Core is imported

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

from megatron_ext.preprocessing.corpus_reader import read_records, resolve_inputs  # noqa: E402
from megatron_ext.tokenizer import CrystalTokenizer  # noqa: E402


def tool_tokens_per_second(args, workers: int, out_dir: str) -> float:
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "tools", "preprocess_data.py"),
            "--input",
            args.input,
            "--tokenizer-model",
            args.tokenizer_model,
            "--output-prefix",
            os.path.join(out_dir, f"w{workers}"),
            "--append-eod",
            "--workers",
            str(workers),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(re.search(r"([\d,]+) tokens/s", proc.stdout).group(1).replace(",", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--tokenizer-model", required=True)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs for each figure")
    args = p.parse_args()

    texts = [json.loads(line)["text"] for path in resolve_inputs(args.input) for _, line in read_records(path)]
    tok = CrystalTokenizer(args.tokenizer_model)
    raw = 0.0
    for _ in range(args.repeats):
        start = time.perf_counter()
        n = sum(len(ids) + 1 for ids in tok.encode_batch(texts))
        raw = max(raw, n / (time.perf_counter() - start))
    with tempfile.TemporaryDirectory() as out_dir:
        one = max(tool_tokens_per_second(args, 1, out_dir) for _ in range(args.repeats))
        many = max(tool_tokens_per_second(args, args.workers, out_dir) for _ in range(args.repeats))
    mb = sum(len(t.encode()) for t in texts) / 2**20
    print(f"corpus: {len(texts):,} documents, {mb:.1f} MB, {n:,} tokens; {os.cpu_count()} cores")
    print(f"(a) raw SentencePiece batch encode, 1 process : {raw:12,.0f} tokens/s")
    print(f"(b) preprocess_data.py, 1 worker              : {one:12,.0f} tokens/s   b/a = {one / raw:.2f}")
    print(
        f"(c) preprocess_data.py, {args.workers} workers             : {many:12,.0f} tokens/s   c/b = {many / one:.2f}"
    )


if __name__ == "__main__":
    main()
