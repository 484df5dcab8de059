"""Run pretrain_crystal.py on local ranks (real gloo process groups) and read its per-step metrics."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def torchrun_command(
    nproc: int, args: list[str], env_extra: dict | None = None, torchrun_args: tuple[str, ...] = ()
) -> tuple[list[str], dict]:
    """pretrain_crystal.py under torchrun itself: for the tests of launching, signals and interruptions.
    With torchrun_args (e.g. --max-restarts), its workers install the faults env_extra names
    (tests/helpers/faulty_pretrain.py)."""
    script = REPO / ("tests/helpers/faulty_pretrain.py" if torchrun_args else "pretrain_crystal.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        *torchrun_args,
        str(script),
        *args,
    ]
    return cmd, subprocess_environment(env_extra)


class _LaunchServer:
    """launch_server.py, started on the first run and kept for the session (imports paid once)."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "helpers" / "launch_server.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=subprocess_environment(),
            cwd=REPO,
            start_new_session=True,
        )
        self.pending = b""
        atexit.register(self.proc.kill)

    def request(self, message: dict) -> None:
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        self.proc.stdin.flush()

    def reply(self, timeout: float | None) -> dict | None:
        """The next answer line, or None if none came within timeout seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            left = None if deadline is None else max(deadline - time.monotonic(), 0)
            if not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError("the tests' launch server died")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)


_server: _LaunchServer | None = None


def train(
    nproc: int, args: list[str], timeout: float = 240, check: bool = True, env_extra: dict | None = None
) -> subprocess.CompletedProcess:
    """Run pretrain_crystal.py on nproc local ranks (fork_launch.launch, through launch_server.py:
    torchrun's environment, the imports paid once per session); fail fast (timeout, the run's whole
    process group killed) rather than hang."""
    global _server
    if _server is None or _server.proc.poll() is not None:
        _server = _LaunchServer()
    cmd = ["fork_launch.py", str(nproc), *args]
    env = subprocess_environment(dict(env_extra or {}, MASTER_PORT=str(free_port())))
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        _server.request({"nproc": nproc, "args": args, "env": env, "cwd": str(REPO), "stdout": out, "stderr": err})
        pid = _server.reply(timeout=60)["pid"]
        done = _server.reply(timeout)
        if done is None:
            os.killpg(pid, signal.SIGKILL)
            _server.reply(None)
        stdout, stderr = (open(path, errors="replace").read() for path in (out, err))
    if done is None:
        raise AssertionError(f"{' '.join(cmd)} hung past {timeout}s:\n{stdout[-4000:]}\n{stderr[-8000:]}")
    result = subprocess.CompletedProcess(cmd, done["code"], stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{stdout[-4000:]}\n{stderr[-8000:]}")
    return result


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
