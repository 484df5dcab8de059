"""Launch pretrain_crystal.py under torchrun (real gloo process groups) and read its per-step metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TINY_RUN = [
    "--model", "crystal-test", "--mock-data", "--num-workers", "0",
    "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "5e-2", "--min-lr", "5e-3",
    "--lr-warmup-iters", "1", "--log-interval", "1", "--seed", "7",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int, args: list[str], env_extra: dict | None = None) -> tuple[list[str], dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **(env_extra or {}))
    if "TRITON_INTERPRET" not in (env_extra or {}):
        env.pop("TRITON_INTERPRET", None)  # set by conftest.py for in-process kernel tests only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port()), str(REPO / "pretrain_crystal.py"), *args]
    return cmd, env


def torchrun(nproc: int, args: list[str], timeout: float = 240, check: bool = True,
             env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run pretrain_crystal.py on nproc local processes; fail fast (timeout) rather than hang."""
    cmd, env = torchrun_command(nproc, args, env_extra)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def layout_flags(tp: int = 1, pp: int = 1, vp_layers: int | None = None, sp: bool = False,
                 dist_opt: bool = False) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if vp_layers:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(vp_layers)]
    if sp:
        flags.append("--sequence-parallel")
    if dist_opt:
        flags.append("--use-distributed-optimizer")
    return flags
