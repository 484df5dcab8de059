#!/usr/bin/env python
"""Pretrain Crystal on Megatron-Core. Launch with torchrun; see README.md.

`pretrain_crystal.py --check-args ...` (WORLD_SIZE as torchrun will set it) only checks the flags, in one
process, and exits: the launch scripts run it once before torchrun, so that a typo is one line per job
instead of one line per rank followed by torchrun's traceback per node.
"""

import os
import sys

from megatron_ext.upstream_warnings import silence

silence()  # before Megatron-Core is imported

from megatron_ext.training.arguments import ArgumentError, check_command_line  # noqa: E402

CHECK_ARGS = "--check-args"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check_only = CHECK_ARGS in argv
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        # Before Megatron-Core is imported or a process group exists: a bad layout costs a second.
        run = check_command_line([a for a in argv if a != CHECK_ARGS], world_size)
    except ArgumentError as e:
        print(f"pretrain_crystal.py: error: {e}", file=sys.stderr)
        return 2
    if check_only:
        layout = run.layout
        print(
            f"pretrain_crystal.py: the flags are valid for {world_size} ranks (TP {layout.tensor_model_parallel_size}"
            f" x PP {layout.pipeline_model_parallel_size} x DP {layout.data_parallel_size})"
        )
        return 0
    from megatron_ext.training.loop import pretrain

    return pretrain(run)


# The guard matters: dist_checkpointing's writers spawn processes that re-import this file.
if __name__ == "__main__":
    sys.exit(main())
