"""The tests' warm launcher: torch and Megatron-Core imported once per test session, not once per run.

Each training run of a test (distributed_run.train) used to start fork_launch.py in a fresh interpreter,
which spends ~4.5 s of CPU importing torch and Megatron-Core before it forks the ranks; a session starts
about a hundred runs. This server imports them once and then, per request (a JSON line on stdin: ranks,
arguments, environment, working directory, output files), forks a child from its untouched post-import
state; the child takes the request's environment and output files and runs fork_launch.launch exactly as
fork_launch.py would (its own process group, the ranks forked from it). The server answers the child's
pid at once (so that a test can kill the run's process group) and its exit status when it ends.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run_child(request: dict) -> int:
    os.setpgrp()  # the run's own group: a test's kill, and fork_launch's sweep of its ranks, end there
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    import fork_launch

    return fork_launch.launch(request["nproc"], request["args"])


def serve() -> None:
    sys.path.insert(0, str(HERE))
    import fork_launch

    fork_launch.preload()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _run_child(request)
            except BaseException:  # noqa: BLE001 - the run's failure, reported on its stderr
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":  # processes that Megatron-Core spawns re-import this file
    serve()
