#!/usr/bin/env python
"""Concatenate Megatron indexed datasets (shards) into one prefix, in the order given, with Megatron-Core's
IndexedDatasetBuilder. The output appears only when complete.

  python tools/merge_datasets.py --input out/shard0_text_document out/shard1_text_document \\
      --output-prefix out/all_text_document
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported

from megatron_ext.preprocessing import indexed_output  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx)")
    p.add_argument("--output-prefix", required=True)
    args = p.parse_args(argv)
    for prefix in args.input:
        for path in (indexed_output.bin_path(prefix), indexed_output.idx_path(prefix)):
            if not os.path.isfile(path):
                print(f"merge_datasets.py: error: --input {prefix}: {path} does not exist", file=sys.stderr)
                return 2
    try:
        indexed_output.check_writable(args.output_prefix)
    except OSError as e:
        print(f"merge_datasets.py: error: --output-prefix {args.output_prefix}: {e.strerror}", file=sys.stderr)
        return 2
    indexed_output.merge(args.input, args.output_prefix)
    print(f"wrote {args.output_prefix}.bin/.idx from {len(args.input)} datasets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
