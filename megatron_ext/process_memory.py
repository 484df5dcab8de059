"""What a process holds in memory, from Linux's /proc: for the data path's reports and its benchmark."""

from __future__ import annotations

import os


def private_memory_mb(pid: int | str = "self") -> float:
    """Anonymous memory resident in a process (RssAnon): what it holds that no file backs."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


def unshared_memory_mb(pid: int) -> float:
    """Written pages a process alone maps (Private_Dirty): for a forked DataLoader worker, what it allocated
    or copied since the fork, and pages the rank wrote since (copy-on-write leaves the old page to the
    worker); the pages it still shares with the rank are not counted (RssAnon would count the rank's
    whole heap again in every worker)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty")) / 1024


def child_processes(pid: int | None = None) -> list[int]:
    """This process's children (its DataLoader workers)."""
    pid = pid or os.getpid()
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            children.append(int(entry))
    return children
