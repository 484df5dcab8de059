#!/usr/bin/env python
"""The unattended battery: one job under torchrun --max-restarts (2 gloo ranks, crystal-test, --steps steps,
a checkpoint every --save-interval), four faults at steps drawn from --seed, and nobody touching it:

  1. attempt 0: the last rank is SIGKILLed as it begins step k1 (as the out-of-memory killer would);
  2. attempt 1: the last rank is SIGSTOPped at step k2 (hung): rank 0 gives up after
     --distributed-timeout-minutes 1 and torchrun kills the stopped one;
  3. before attempt 2 reads it: one byte of the latest checkpoint's largest shard is changed;
  4. attempt 2: the disk is full (ENOSPC on every rank) in the save of iteration s.

It checks that the job finishes by itself, with exit 0, and that every step's loss, gradient norm and lr (the
last record of each iteration) equal those of an uninterrupted run of the same flags, measured first in the
same run (the baseline, also for the wall time). Per fault it reports the steps redone and the wall time lost:
from the time the job logged the last step before the fault until it logs that step again (for the changed
shard, from the line naming it until the job is back at that checkpoint's iteration; the stop's own figure
excludes that part). The faults come from tests/helpers/fault_injection.py, installed in each worker by
tests/helpers/faulty_pretrain.py.

  python benchmarks/unattended.py [--seed 0] [--steps 60] [--save-interval 5] [--json report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERATION = re.compile(r"^iteration\s+(\d+)/")
RUN = ["--model", "crystal-test", "--mock-data", "--num-workers", "0", "--micro-batch-size", "1",
       "--global-batch-size", "8", "--lr", "5e-2", "--min-lr", "5e-3", "--lr-warmup-iters", "1",
       "--log-interval", "1", "--seed", "7"]  # fmt: skip


def fault_steps(seed: int, steps: int, interval: int) -> dict:
    """k1, k2, s: each fault after the previous attempt's resume point, with a checkpoint to fall back to."""
    if steps < 12 * interval:
        raise SystemExit(f"--steps {steps}: the four faults need at least 12 x --save-interval ({12 * interval})")
    rng = random.Random(seed)
    kill = rng.randint(2 * interval + 1, 4 * interval)
    stop = rng.randint(kill + 3, kill + 3 * interval)
    changed = (stop - 1) // interval * interval  # the latest checkpoint when the stop ends attempt 1
    full = rng.choice(range(changed + 2 * interval, steps - interval + 1, interval))
    return {"kill": kill, "stop": stop, "changed_checkpoint": changed, "full_disk_save": full}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(directory: str, flags: list[str], faults: dict, max_restarts: int, timeout: float):
    """torchrun with its log lines timestamped as they arrive: (exit code, [(seconds, line)], wall seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **faults)
    worker = os.path.join(REPO, "tests", "helpers", "faulty_pretrain.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port())]
    cmd = [*torchrun, "--max-restarts", str(max_restarts), worker, *flags]
    started, lines = time.monotonic(), []
    with open(os.path.join(directory, "torchrun.log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:  # the pipe ends when torchrun and its workers are gone
            lines.append((time.monotonic() - started, line.rstrip("\n")))
            log.write(line)
            if time.monotonic() - started > timeout:
                proc.kill()
                raise SystemExit(f"the job did not finish in {timeout:.0f} s: {log.name}")
        code = proc.wait()
    return code, lines, time.monotonic() - started


def attempts(lines: list[tuple[float, str]]) -> list[dict]:
    """The log split at each attempt's start line: its logged iterations (first time each) and its lines."""
    found = []
    for t, line in lines:
        if line.startswith("model crystal-test:"):
            found.append({"start": t, "steps": {}, "lines": []})
        elif found:
            found[-1]["lines"].append((t, line))
            m = ITERATION.match(line)
            if m:
                found[-1]["steps"].setdefault(int(m[1]), t)
    return found


def _resumed_at(attempt: dict) -> int:
    for _, line in attempt["lines"]:
        m = re.search(r"resumed from .* at iteration (\d+)$", line)
        if m:
            return int(m[1])
    return 0


def _time_of(attempt: dict, text: str) -> float:
    return next(t for t, line in attempt["lines"] if text in line)


def _back_at(attempt: dict, step: int) -> float:
    """When an attempt is back at a step: it logs it, or (the step is its resume point) it has resumed there."""
    return attempt["steps"][step] if step in attempt["steps"] else _time_of(attempt, "resumed from")


def report(args) -> dict:
    at = fault_steps(args.seed, args.steps, args.save_interval)
    work = tempfile.mkdtemp(prefix="unattended_")
    flags = RUN + ["--train-iters", str(args.steps), "--distributed-timeout-minutes", "1"]
    print(f"faults at: kill step {at['kill']}, stop step {at['stop']}, change the checkpoint of "
          f"{at['changed_checkpoint']} before attempt 2, full disk in the save of {at['full_disk_save']} "
          f"(--seed {args.seed}); work directory {work}", flush=True)  # fmt: skip
    results = {}
    battery_faults = {
        "CRYSTAL_TEST_KILL_AT": f"{at['kill']}@0",
        "CRYSTAL_TEST_STOP_AT": f"{at['stop']}@1",
        "CRYSTAL_TEST_CHANGE_LATEST_SHARD": "1@2",
        "CRYSTAL_TEST_FULL_DISK_AT": f"{at['full_disk_save']}@2",
    }
    for name, faults in (("uninterrupted", {}), ("battery", battery_faults)):
        d = os.path.join(work, name)
        os.makedirs(d)
        ckpt = os.path.join(d, "ckpt")
        job = flags + ["--save", ckpt, "--load", ckpt, "--save-interval", str(args.save_interval),
                       "--metrics-jsonl", os.path.join(d, "m.jsonl")]  # fmt: skip
        code, lines, wall = run_job(d, job, faults, max_restarts=4, timeout=args.timeout)
        with open(os.path.join(d, "m.jsonl")) as f:
            records = {r["iteration"]: (r["lm_loss"], r["grad_norm"], r["lr"]) for r in map(json.loads, f)}
        results[name] = {"code": code, "lines": lines, "wall": wall, "records": records, "dir": d}
        print(f"{name}: exit {code} in {wall:.1f} s", flush=True)
    battery, straight = results["battery"], results["uninterrupted"]
    runs = attempts(battery["lines"])
    if battery["code"] != 0 or len(runs) != 4:
        raise SystemExit(f"the battery ended with exit {battery['code']} after {len(runs)} attempts (4 expected): "
                         f"{battery['dir']}/torchrun.log")  # fmt: skip
    last = [max(r["steps"]) for r in runs]
    resumed = [_resumed_at(r) for r in runs]
    changed_line = _time_of(runs[2], "skipping a damaged checkpoint")
    changed = at["changed_checkpoint"]
    changed_lost = _back_at(runs[2], changed) - changed_line

    def lost(n: int) -> float:  # from attempt n's last logged step until attempt n + 1 is back there
        return _back_at(runs[n + 1], last[n]) - runs[n]["steps"][last[n]]

    faults = [  # (fault, its step, steps redone, wall seconds lost)
        ("rank SIGKILLed", at["kill"], last[0] - resumed[1], lost(0)),
        ("rank SIGSTOPped (timeout 1 min)", at["stop"], last[1] - changed, lost(1) - changed_lost),
        ("latest shard changed by a byte", changed, changed - resumed[2], changed_lost),
        ("disk full during a save", at["full_disk_save"], last[2] - resumed[3], lost(2)),
    ]
    equal = battery["records"] == straight["records"] and sorted(straight["records"]) == list(range(1, args.steps + 1))
    out = {
        "seed": args.seed,
        "steps": args.steps,
        "save_interval": args.save_interval,
        "finished_by_itself": battery["code"] == 0 and max(battery["records"]) == args.steps,
        "losses_equal_uninterrupted": equal,
        "resumed_at": resumed,
        "uninterrupted_wall_s": round(straight["wall"], 1),
        "battery_wall_s": round(battery["wall"], 1),
        "faults": [{"fault": f, "at": a, "steps_redone": r, "wall_lost_s": round(t, 1)} for f, a, r, t in faults],
        "lines": [
            line
            for _, line in battery["lines"]
            if line.startswith(("restart ", "warning: skipping", "pretrain_crystal.py: error:"))
        ],  # fmt: skip
    }
    print("\nfault                              at step  steps redone  wall time lost (s)")
    for row in out["faults"]:
        print(f"{row['fault']:<35}{row['at']:>7}{row['steps_redone']:>14}{row['wall_lost_s']:>20.1f}")
    print(f"\nfinished by itself: {out['finished_by_itself']}; every step's loss, gradient norm and lr equal the "
          f"uninterrupted run's: {equal}; wall {out['battery_wall_s']} s against {out['uninterrupted_wall_s']} s "
          f"uninterrupted ({out['battery_wall_s'] / out['uninterrupted_wall_s']:.2f}x)")  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--seed", type=int, default=0, help="draws the faults' steps")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--save-interval", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=540, help="seconds each job may take")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    out = report(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0 if out["finished_by_itself"] and out["losses_equal_uninterrupted"] else 1


if __name__ == "__main__":
    sys.exit(main())
