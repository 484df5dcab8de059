"""Run pretrain_crystal.py on local ranks (real gloo process groups) and read its per-step metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TINY_RUN = [
    "--model",
    "crystal-test",
    "--mock-data",
    "--num-workers",
    "0",
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "8",
    "--lr",
    "5e-2",
    "--min-lr",
    "5e-3",
    "--lr-warmup-iters",
    "1",
    "--log-interval",
    "1",
    "--seed",
    "7",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_environment(env_extra: dict | None = None) -> dict:
    """For a child process that runs the project: single-threaded ops, the repository importable, and
    Triton's interpreter off unless asked for (kernels compile, or the references run on CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **(env_extra or {}))
    if "TRITON_INTERPRET" not in (env_extra or {}):
        env.pop("TRITON_INTERPRET", None)  # set by conftest.py for in-process kernel tests only
    return env


def torchrun_command(nproc: int, args: list[str], env_extra: dict | None = None) -> tuple[list[str], dict]:
    """pretrain_crystal.py under torchrun itself: for the tests of launching, signals and interruptions."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        str(REPO / "pretrain_crystal.py"),
        *args,
    ]
    return cmd, subprocess_environment(env_extra)


def train(
    nproc: int, args: list[str], timeout: float = 240, check: bool = True, env_extra: dict | None = None
) -> subprocess.CompletedProcess:
    """Run pretrain_crystal.py on nproc local ranks (fork_launch.py: torchrun's environment, one
    import for all ranks); fail fast (timeout, the whole process group killed) rather than hang."""
    cmd = [sys.executable, str(REPO / "tests" / "helpers" / "fork_launch.py"), str(nproc), *args]
    env = subprocess_environment(dict(env_extra or {}, MASTER_PORT=str(free_port())))
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} hung past {timeout}s:\n{stdout[-4000:]}\n{stderr[-8000:]}")
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}")
    return done


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def layout_flags(
    tp: int = 1, pp: int = 1, vp_layers: int | None = None, sp: bool = False, dist_opt: bool = False
) -> list[str]:
    flags = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if vp_layers:
        flags += ["--num-layers-per-virtual-pipeline-stage", str(vp_layers)]
    if sp:
        flags.append("--sequence-parallel")
    if dist_opt:
        flags.append("--use-distributed-optimizer")
    return flags
