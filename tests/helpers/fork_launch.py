"""What torchrun does for one node, with the imports paid once: `python tests/helpers/fork_launch.py N ARGS...`
runs pretrain_crystal.py ARGS on N local ranks.

Each torchrun worker is a fresh interpreter that spends ~6 s of CPU importing torch and Megatron-Core
before its first step; on CI's 2 cores an 8-rank run pays ~25 s of that. This launcher imports the
training code once, then forks the ranks, which share those modules: the processes, their gloo group
and the training code are the real ones, only the interpreter start-up is shared. The tests of the
launch itself (torchrun across two "nodes", SIGUSR1 forwarding, an interrupted run) keep torchrun.

Like torchrun it sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, stops the other
ranks (and what they started) when one fails, and exits with the first failure's code (128 + signal
for a killed rank).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _rank(rank: int, world_size: int, args: list[str]) -> None:
    import fault_injection

    import pretrain_crystal

    fault_injection.install(os.environ)  # the faults a test asked for, from outside the training code
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        GROUP_RANK="0",
    )
    sys.argv = [str(REPO / "pretrain_crystal.py"), *args]
    sys.exit(pretrain_crystal.main())


def preload() -> None:
    """The imports every rank would otherwise repeat."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import pretrain_crystal  # noqa: F401  (first: it silences Megatron-Core's known warnings)

    # isort: split
    import megatron_ext.training.loop  # noqa: F401


def launch(world_size: int, args: list[str]) -> int:
    preload()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.getpgrp() != os.getpid():
        os.setpgrp()  # the group that the sweep below ends: the ranks and whatever they started
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_rank, args=(r, world_size, args)) for r in range(world_size)]
    for p in ranks:
        p.start()
    while True:
        codes = [p.exitcode for p in ranks]
        failed = [c for c in codes if c not in (None, 0)]
        if failed or all(c == 0 for c in codes):
            break
        time.sleep(0.05)
    # A failed rank leaves the others waiting in a collective, and a killed one orphans the helper
    # processes it started (which hold the output pipes open): end them all, as torchrun ends each
    # worker's process group. The ranks were forked with SIGTERM's default action; this process ignores it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    os.killpg(0, signal.SIGCONT)  # a stopped rank (SIGSTOP) acts on the pending SIGTERM only once continued
    for p in ranks:
        p.join()
    if not failed:
        return 0
    return failed[0] if failed[0] > 0 else 128 - failed[0]


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this file
    sys.exit(launch(int(sys.argv[1]), sys.argv[2:]))
