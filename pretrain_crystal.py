#!/usr/bin/env python
"""Pretrain Crystal on Megatron-Core. Launch with torchrun; see README.md."""

import os
import sys

from megatron_ext.upstream_warnings import silence

silence()  # before Megatron-Core is imported

from megatron_ext.training.arguments import ArgumentError, build_parser, validate  # noqa: E402


def main() -> int:
    args = build_parser().parse_args()
    try:
        # Before Megatron-Core is imported or a process group exists: a bad layout costs a second.
        run = validate(args, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ArgumentError as e:
        print(f"pretrain_crystal.py: error: {e}", file=sys.stderr)
        return 2
    from megatron_ext.training.loop import pretrain

    return pretrain(run)


# The guard matters: dist_checkpointing's writers spawn processes that re-import this file.
if __name__ == "__main__":
    sys.exit(main())
