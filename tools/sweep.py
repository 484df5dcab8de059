#!/usr/bin/env python
"""Data-mixture ablations in one command: a sweep of phases files derived from a base file (code share,
phase order, cooldown, FIM rate, seeds), run one after another here or as a SLURM job array, each run
evaluated, and one comparison report.

  python tools/sweep.py plan examples/sweeps/code_share.yaml [--estimate]
  python tools/sweep.py run examples/sweeps/code_share.yaml              # resumable: rerun to continue
  python tools/sweep.py run examples/sweeps/crystal_ablation.yaml --slurm [--dry-run]
  python tools/sweep.py report examples/sweeps/code_share.yaml

Runs live under <output>/<name>/<variant>/ (default output runs/sweeps): the derived phases.yaml, its
checkpoints, metrics, eval_results.jsonl and a DONE file once trained and evaluated.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()

PROG = "sweep.py"


def _tokenizer(sweep):
    train = sweep.train
    if "--tokenizer-model" not in train:
        return None
    from megatron_ext.tokenizer import build_tokenizer
    from megatron_ext.tokenizer.crystal_tokenizer import DEFAULT_TOKENIZER_TYPE

    kind = train[train.index("--tokenizer-type") + 1] if "--tokenizer-type" in train else DEFAULT_TOKENIZER_TYPE
    return build_tokenizer(kind, train[train.index("--tokenizer-model") + 1])


def plan(sweep, estimate: bool) -> None:
    from megatron_ext.sweeps.plan import write_phases_files

    paths = write_phases_files(sweep, _tokenizer(sweep))
    per_token = _seconds_per_token(sweep) if estimate else None
    print(f"sweep {sweep.name}: {len(sweep.variants)} runs of {sweep.base} under {sweep.directory}")
    for variant, path in zip(sweep.variants, paths):
        eta = f"  ~{_duration(variant.tokens * per_token)} here" if per_token else ""
        print(f"  {variant.name:32s} {variant.tokens:>14,} tokens  {path}{eta}")
    if per_token:
        total = sum(v.tokens for v in sweep.variants) * per_token
        print(f"estimated training time on this machine: {_duration(total)} (from a measured short run)")


def _duration(seconds: float) -> str:
    return (
        f"{seconds:.1f} s"
        if seconds < 120
        else f"{seconds / 60:.1f} min"
        if seconds < 7200
        else f"{seconds / 3600:.1f} h"
    )


def _seconds_per_token(sweep) -> float:
    """Six steps of the first run (no evaluation); the step time its log line reports for steps 4-6."""
    import re
    import tempfile

    from megatron_ext.sweeps.runner import REPO, train_flags

    with tempfile.TemporaryDirectory() as tmp:
        flags = train_flags(sweep, sweep.variants[0])
        for flag in ("--save", "--load", "--save-interval", "--eval-interval", "--eval-tasks"):  # no side work
            if flag in flags:
                del flags[flags.index(flag) : flags.index(flag) + 2]
        for flag in ("--metrics-jsonl", "--eval-results-jsonl"):
            flags[flags.index(flag) + 1] = os.path.join(tmp, flag.strip("-"))
        total = sum(int(p["iters"]) for p in sweep.variants[0].phases["phases"])
        steps = min(6, total)  # the step time of the log line for its last half
        flags += ["--train-iters", str(steps), "--log-interval", str(max(steps // 2, 1))]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(sweep.nproc)]
        command += [os.path.join(REPO, "pretrain_crystal.py"), *flags]
        out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    times = re.findall(r"step time ([\d.]+) ms", out.stdout)
    if out.returncode != 0 or not times:
        from megatron_ext.sweeps.runner import SweepRunError

        errors = [line for line in (out.stderr + out.stdout).splitlines() if "error:" in line]
        raise SweepRunError(f"--estimate: the short run failed: {errors[-1] if errors else out.returncode}")
    return float(times[-1]) / 1000 / (sweep.global_batch_size * sweep.seq_length)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("plan", "run", "report"))
    p.add_argument("sweep", help="the sweep file (YAML)")
    p.add_argument("--output", default="runs/sweeps", help="where sweeps live (default runs/sweeps)")
    p.add_argument("--estimate", action="store_true", help="plan: time a short run to estimate each run's time")
    p.add_argument("--slurm", action="store_true", help="run: write and submit one sbatch job array")
    p.add_argument("--dry-run", action="store_true", help="run --slurm: print the script and the sbatch command")
    args = p.parse_args(argv)

    from megatron_ext.evaluation.report import ReportError
    from megatron_ext.sweeps import report, runner
    from megatron_ext.sweeps.plan import SweepError, load_sweep, write_phases_files

    try:
        sweep = load_sweep(args.sweep, args.output)
        if args.command == "plan":
            plan(sweep, args.estimate)
        elif args.command == "run":
            preview = args.slurm and args.dry_run  # the cluster's corpus and tokenizer need not be here
            write_phases_files(sweep, None if preview else _tokenizer(sweep), check=not preview)
            if args.slurm:
                script = runner.slurm_script(sweep)
                path = os.path.join(sweep.directory, "sweep.sbatch")
                with open(path, "w") as f:
                    f.write(script)
                submit = ["sbatch", path]
                if args.dry_run:
                    print(script)
                    print(" ".join(submit))
                    return 0
                if shutil.which("sbatch") is None:
                    raise SweepError("--slurm: no sbatch here; run on a SLURM login node, or add --dry-run")
                subprocess.run(submit, check=True)
            else:
                ran = runner.run_local(sweep)
                print(f"sweep {sweep.name}: {len(ran)} run(s) trained now; report: tools/sweep.py report {args.sweep}")
        else:
            path, plots = report.write(sweep)
            print(f"sweep {sweep.name}: {path} and {len(plots)} plots")
    except (SweepError, runner.SweepRunError, ReportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
