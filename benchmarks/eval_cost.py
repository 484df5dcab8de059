#!/usr/bin/env python
"""What evaluating a checkpoint costs, packed against one request per row, and the demo's end-of-run
evaluation before and after its log-likelihood tasks moved into the training loop; all in one run.

    python benchmarks/eval_cost.py --checkpoint runs/demo/checkpoints

In the loop: `make demo`'s training (crystal-tiny, sequence 256, 2 ranks) for 20 steps with one evaluation
of its log-likelihood tasks at the end, requests packed and one per row; the seconds the evaluation took,
as its log line prints them. On a checkpoint, the wall time of one `tools/evaluate.py` process (start,
model load and scoring, as `make demo` pays it):
- the demo's log-likelihood tasks at 25, 50 and 100 questions each, requests packed several to a row
  (the default) and one per row (--no-eval-pack-requests): how the cost grows, and what packing saves
  where the rows are already cut to their batch's longest request;
- the demo's end-of-run evaluation before and now, each with its own code: before is commit 9e88b28 (the
  tree when the evaluation-cost issue was taken up), exported with `git archive`, running its demo's end
  pass (the log-likelihood tasks at 100 questions, HumanEval's 164 and 200 infillings, one request per row,
  then 100 single-line infillings generated); now is this tree running today's (the generations alone: the
  loop's last evaluation scored the rest on the final weights).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("arc_easy", "piqa", "hellaswag", "lambada", "humaneval_gold", "infill_single_gold")
CODE_TASKS = ("humaneval_gold", "infill_single_gold")
# The demo's end pass, before (commit BEFORE's examples/demo.sh: END_TASKS then GENERATION) and now (today's
# examples/demo.sh; tests/test_benchmarks.py checks that the two agree).
BEFORE = "9e88b28"
BEFORE_END_PASS = ("--tasks", "arc_easy:100,piqa:100,hellaswag:100,lambada:100,humaneval_gold,infill_single_gold:200,"
                   "infill_single:100")  # fmt: skip
NOW_END_PASS = ("--tasks", "infill_single:100", "--batch-size", "32")


def timed_evaluation(checkpoint: str, *flags: str, tree: str = REPO) -> float:
    """Seconds of one run of tree's tools/evaluate.py (its output in a temporary directory)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.join(tree, "tools", "evaluate.py"), "--checkpoint", checkpoint,
                   "--output-dir", out, "--max-new-tokens", "64", *flags]  # fmt: skip
        started = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"eval_cost.py: {' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    return seconds


def loop_evaluation_seconds(tasks: str, *flags: str) -> float:
    """The seconds of the evaluation after 20 demo training steps, from its log line."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29431",
                   os.path.join(REPO, "pretrain_crystal.py"), "--model", "crystal-tiny", "--seq-length", "256",
                   "--tokenizer-model", "data/demo/crystal_demo.model", "--phases", "examples/phases/demo.yaml",
                   "--num-workers", "1", "--micro-batch-size", "4", "--global-batch-size", "8",
                   "--use-distributed-optimizer", "--train-iters", "20", "--eval-interval", "20", "--log-interval",
                   "20", "--eval-tasks", tasks, "--data-cache-path", out, *flags]  # fmt: skip
        proc = subprocess.run(
            command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1")
        )
    found = re.search(r"^validation at iteration 20 .*\| ([\d.]+) s \(", proc.stdout, re.M)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"eval_cost.py: the training run failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return float(found.group(1))


def exported_tree(commit: str, into: str) -> str:
    """The files of commit (this repository's), written under into: its tools/evaluate.py imports its own
    megatron_ext (the script puts its tree first on sys.path)."""
    archive = subprocess.run(["git", "-C", REPO, "archive", commit], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"eval_cost.py: error: cannot export commit {commit} (a git clone is needed): "
                         f"{archive.stderr.decode().strip()}")  # fmt: skip
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)
    return into


def loglikelihood_tasks(cap: int) -> str:
    """The tasks at `cap` questions, the code ones at about a third (the old demo's 100 and 32)."""
    code_cap = max(cap * 32 // 100, 1)
    return ",".join(f"{name}:{code_cap if name in CODE_TASKS else cap}" for name in TASKS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="runs/demo/checkpoints", help="a --save directory or an exported one")
    p.add_argument("--caps", type=int, nargs="*", default=[25, 50, 100], help="questions per task (evaluate.py)")
    p.add_argument("--loop-caps", type=int, nargs="*", default=[32, 100], help="questions per task (the loop)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.checkpoint):
        print(f"eval_cost.py: error: --checkpoint {args.checkpoint}: no such directory (make demo)", file=sys.stderr)
        return 2
    print("| where | questions per task | tasks | one per row s | packed s | one per row / packed |")
    print("|---|---|---|---|---|---|")
    for cap in args.loop_caps:
        tasks = loglikelihood_tasks(cap)
        alone = loop_evaluation_seconds(tasks, "--no-eval-pack-requests")
        packed = loop_evaluation_seconds(tasks)
        print(f"| in the loop | {cap} | {tasks} | {alone:.1f} | {packed:.1f} | {alone / packed:.2f}x |", flush=True)
    for cap in args.caps:
        tasks = loglikelihood_tasks(cap)
        alone = timed_evaluation(args.checkpoint, "--tasks", tasks, "--no-eval-pack-requests")
        packed = timed_evaluation(args.checkpoint, "--tasks", tasks)
        print(f"| evaluate.py | {cap} | {tasks} | {alone:.1f} | {packed:.1f} | {alone / packed:.2f}x |", flush=True)
    with tempfile.TemporaryDirectory() as tree:
        before = timed_evaluation(args.checkpoint, *BEFORE_END_PASS, tree=exported_tree(BEFORE, tree))
    now = timed_evaluation(args.checkpoint, *NOW_END_PASS)
    print(f"\nthe demo's end-of-run evaluation: before {before:.1f} s (commit {BEFORE}: {' '.join(BEFORE_END_PASS)}); "
          f"now {now:.1f} s ({' '.join(NOW_END_PASS)}): {before / now:.1f}x faster")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
