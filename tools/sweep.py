#!/usr/bin/env python
"""Data-mixture ablations in one command: a sweep of phases files derived from a base file (code share,
phase order, cooldown, FIM rate, seeds), run one after another here or as a SLURM job array, each run
evaluated, and one comparison report.

  python tools/sweep.py plan examples/sweeps/code_share.yaml [--estimate]
  python tools/sweep.py run examples/sweeps/code_share.yaml              # resumable: rerun to continue
  python tools/sweep.py run examples/sweeps/crystal_ablation.yaml --slurm [--dry-run]
  python tools/sweep.py report examples/sweeps/code_share.yaml
  python tools/sweep.py fit examples/sweeps/code_share_swarm.yaml [--objective "valid/code bpb"] [--model gbt]
  python tools/sweep.py fit --mixtures mix.csv --metrics metrics.csv [--test-mixtures ... --test-metrics ...]
  python tools/sweep.py verify examples/sweeps/code_share_swarm.yaml    # the optimum and the base, trained

A sweep's runs are a grid (`axes`), named runs (`variants`) or a swarm (`swarm`: mixtures drawn from a prior
around the base blends); `fit` regresses each metric on a swarm's mixture weights and writes the mixture
that minimises the objective as a phases file (megatron_ext/sweeps/optimum.py).

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
        mix = "  " + " ".join(f"{k}={w:.3f}" for k, w in variant.mixture.items()) if variant.mixture else ""
        print(f"  {variant.name:32s} {variant.tokens:>14,} tokens  {path}{mix}{eta}")
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
    p.add_argument("command", choices=("plan", "run", "report", "fit", "verify"))
    p.add_argument("sweep", nargs="?", help="the sweep file (YAML); fit takes --mixtures/--metrics instead")
    p.add_argument("--output", default="runs/sweeps", help="where sweeps live (default runs/sweeps)")
    p.add_argument("--estimate", action="store_true", help="plan: time a short run to estimate each run's time")
    p.add_argument("--slurm", action="store_true", help="run: write and submit one sbatch job array")
    p.add_argument("--dry-run", action="store_true", help="run --slurm: print the script and the sbatch command")
    fit = p.add_argument_group("fit (a swarm's runs, or RegMix's CSV files)")
    fit.add_argument("--metric", action="append", help="a metric to fit, as the report names it (default: every one)")
    fit.add_argument(
        "--model", default="log-linear", choices=("log-linear", "gbt"), help="the fit that picks the optimum"
    )
    fit.add_argument("--objective", action="append", help='METRIC[=WEIGHT], repeated: minimise the weighted sum '
                     "(default: every bpb metric, weight 1)")  # fmt: skip
    fit.add_argument(
        "--no-worse-than-base", action="append", help="METRIC: predicted no worse than at the base mixture"
    )
    fit.add_argument("--samples", type=int, default=100_000, help="mixtures drawn in the search (RegMix's 100,000)")
    fit.add_argument("--top", type=int, default=100, help="the optimum is the mean of the best this many")
    fit.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    fit.add_argument("--seed", type=int, default=0, help="of the folds and the search")
    fit.add_argument("--mixtures", help="RegMix's mixture CSV: index, then one column per domain weight")
    fit.add_argument("--metrics", help="RegMix's metrics CSV: index, then one column per metric")
    fit.add_argument("--test-mixtures", help="held-out runs' mixture CSV (reports the test Spearman)")
    fit.add_argument("--test-metrics", help="held-out runs' metrics CSV")
    fit.add_argument("--output-dir", help="where fit writes (default <sweep>/fit, or beside --metrics)")
    args = p.parse_intermixed_args(argv)  # the sweep file may follow the options
    if args.sweep is None and args.command != "fit":
        p.error(f"{args.command}: the sweep file is required")
    if bool(args.test_mixtures) != bool(args.test_metrics):
        p.error("--test-mixtures and --test-metrics go together")

    from megatron_ext.evaluation.report import ReportError
    from megatron_ext.sweeps import optimum, report, runner
    from megatron_ext.sweeps.mixture_fit import FitError
    from megatron_ext.sweeps.plan import SweepError, load_sweep, write_phases_files

    try:
        sweep = load_sweep(args.sweep, args.output) if args.sweep else None
        if args.command == "fit":
            result = optimum.fit_sweep(sweep, args)
            weights = ", ".join(f"{k} {w:.3f}" for k, w in result["optimum"].items())
            print(f"optimum ({args.model}): {weights}; {result['output']}/fit.md" +
                  (f", phases file {result['phases_file']}" if "phases_file" in result else ""))  # fmt: skip
        elif args.command == "verify":
            out = optimum.verify_sweep(sweep, _tokenizer(sweep))
            print(f"sweep {sweep.name}: predicted against measured in {out['report']}")
        elif args.command == "plan":
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
    except (SweepError, runner.SweepRunError, ReportError, FitError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
