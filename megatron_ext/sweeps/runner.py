"""Running a sweep: one run after another on this machine (each resumable; a finished one is not run
again), or one SLURM job array over examples/slurm/launch.sh, with the evaluation after each run."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time

from megatron_ext.sweeps.plan import Sweep, Variant

DONE = "DONE"  # in a run's directory once it trained and was evaluated; holds its wall time
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class SweepRunError(RuntimeError):
    pass


def train_flags(sweep: Sweep, variant: Variant) -> list[str]:
    """pretrain_crystal.py's flags for one run (resumable: --load is its own --save)."""
    run_dir = os.path.abspath(sweep.variant_dir(variant))
    ckpt = os.path.join(run_dir, "checkpoints")
    flags = [*sweep.train, "--phases", os.path.join(run_dir, "phases.yaml"), "--seq-length", str(sweep.seq_length),
             "--save", ckpt, "--load", ckpt]  # fmt: skip
    return flags + run_flags(sweep, run_dir, variant.name, str(seed_of(sweep, variant)))


def seed_of(sweep: Sweep, variant: Variant) -> int:
    """A seed axis varies the data order (the phases file's seed) and the initialisation (--seed) alike."""
    return int(variant.overrides.get("seed", sweep.seed))


def run_flags(sweep: Sweep, run_dir: str, name: str, seed: str) -> list[str]:
    """The flags every run of the sweep shares besides where it lives (here, and in the SLURM script)."""
    flags = ["--global-batch-size", str(sweep.global_batch_size), "--seed", seed, "--run-name", name]
    flags += ["--metrics-jsonl", f"{run_dir}/metrics.jsonl", "--eval-results-jsonl", f"{run_dir}/eval_results.jsonl"]
    if "--save-interval" not in sweep.train:
        flags += ["--save-interval", str(max(sweep.eval_interval or 100, 1))]
    if sweep.eval_interval:
        flags += ["--eval-interval", str(sweep.eval_interval)]
    if sweep.eval_tasks:
        flags += ["--eval-tasks", sweep.eval_tasks]
    return flags


def evaluate_flags(sweep: Sweep, variant: Variant) -> list[str]:
    run_dir = os.path.abspath(sweep.variant_dir(variant))
    return ["--checkpoint", os.path.join(run_dir, "checkpoints"), "--tasks", sweep.end_tasks, "--run-name",
            variant.name, "--output-dir", os.path.join(run_dir, "eval"),
            "--results", os.path.join(run_dir, "eval_results.jsonl")]  # fmt: skip


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_runs(sweep: Sweep) -> None:
    """Every run's pretrain_crystal.py flags validated here, before the first run starts (no process group):
    a mistake in the sweep's train flags is one line naming the run, not a failed run's log to read."""
    from megatron_ext.training.arguments import ArgumentError, check_command_line

    for variant in sweep.variants:
        try:
            check_command_line(train_flags(sweep, variant), sweep.nproc)
        except ArgumentError as e:
            raise SweepRunError(f"{variant.name}: pretrain_crystal.py: {e}") from None


def run_local(sweep: Sweep, log=print) -> list[str]:
    """Every run not yet done, in order, its flags checked first; returns the names run now. A failed run
    stops the sweep with its log's path (rerun to continue where it stopped: the run resumes from its last
    checkpoint)."""
    check_runs(sweep)
    ran = []
    for variant in sweep.variants:
        run_dir = sweep.variant_dir(variant)
        if os.path.isfile(os.path.join(run_dir, DONE)):
            log(f"sweep {sweep.name}: {variant.name}: done, skipped")
            continue
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)  # --load of an empty directory: fresh
        started = time.perf_counter()
        log(f"sweep {sweep.name}: {variant.name}: training ({variant.tokens:,} tokens), log {run_dir}/train.log")
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(sweep.nproc),
                   "--master-port", str(_port()), os.path.join(REPO, "pretrain_crystal.py"),
                   *train_flags(sweep, variant)]  # fmt: skip
        _run(command, os.path.join(run_dir, "train.log"), f"{variant.name}: training")
        if sweep.end_tasks:
            log(f"sweep {sweep.name}: {variant.name}: evaluating the final checkpoint ({sweep.end_tasks})")
            command = [sys.executable, os.path.join(REPO, "tools", "evaluate.py"), *evaluate_flags(sweep, variant)]
            _run(command, os.path.join(run_dir, "evaluate.log"), f"{variant.name}: evaluation")
        seconds = time.perf_counter() - started
        with open(os.path.join(run_dir, DONE), "w") as f:
            json.dump({"seconds": seconds, "tokens": variant.tokens}, f)
        log(f"sweep {sweep.name}: {variant.name}: done in {seconds:.0f} s")
        ran.append(variant.name)
    return ran


def _run(command: list[str], log_path: str, what: str) -> None:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log_path, "a") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SweepRunError(f"{what} exited {proc.returncode}; see {log_path}")


def slurm_script(sweep: Sweep) -> str:
    """An sbatch script for one job array over the runs: task i trains run i through examples/slurm/launch.sh
    (requeue on preemption included) and, once its training ended, evaluates it and marks it done."""
    s = {"nodes": 1, "gpus_per_node": 8, "time": "24:00:00", "model": "crystal-1b", "tp": 1, "pp": 1,
         "micro_batch": 4, **sweep.slurm}  # fmt: skip
    names = " ".join(shlex.quote(v.name) for v in sweep.variants)
    directory = os.path.abspath(sweep.directory)
    # launch.sh sets the model, tokenizer, phases, sequence length and checkpoint directory itself.
    own = {"--model", "--tokenizer-model", "--seq-length", "--phases", "--save", "--load", "--micro-batch-size"}
    shared, skip_value = [], False
    for arg in sweep.train:
        if skip_value and not arg.startswith("--"):
            skip_value = False
            continue
        skip_value = arg in own
        if not skip_value:
            shared.append(shlex.quote(arg))
    flags = run_flags(sweep, "@RUN_DIR@", "@VARIANT@", "@SEED@")
    save_interval = sweep.slurm.get("save_interval", 1000)
    if "--save-interval" in flags:  # not there when the sweep's train flags give it (then passed as given)
        save = flags.index("--save-interval")
        save_interval = sweep.slurm.get("save_interval", flags[save + 1])
        del flags[save : save + 2]  # launch.sh's SAVE_INTERVAL
    per_run = [
        shlex.quote(a).replace("@RUN_DIR@", "$RUN_DIR").replace("@VARIANT@", "$VARIANT").replace("@SEED@", "$SEED")
        for a in flags
    ]
    seeds = " ".join(str(seed_of(sweep, v)) for v in sweep.variants)
    extra_args = " ".join(shared + per_run)
    tokenizer = next((sweep.train[i + 1] for i, a in enumerate(sweep.train[:-1]) if a == "--tokenizer-model"), None)
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=sweep-{sweep.name}",
        f"#SBATCH --array=0-{len(sweep.variants) - 1}",
        f"#SBATCH --nodes={s['nodes']}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={s['gpus_per_node']}",
        "#SBATCH --exclusive",
        f"#SBATCH --time={s['time']}",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@300",
        f"#SBATCH --output={directory}/%x-%a-%j.out",
        f"# {sweep.path}: {len(sweep.variants)} runs of {sweep.base}; written by tools/sweep.py run --slurm",
        "set -euo pipefail",
        f"VARIANTS=({names})",
        "VARIANT=${VARIANTS[$SLURM_ARRAY_TASK_ID]}",
        f"SEEDS=({seeds})",
        "SEED=${SEEDS[$SLURM_ARRAY_TASK_ID]}",
        f"RUN_DIR={shlex.quote(directory)}/$VARIANT",
        'if [ -f "$RUN_DIR/DONE" ]; then echo "sweep: $VARIANT is done"; exit 0; fi',
        "PHASES=$RUN_DIR/phases.yaml",
        "CKPT_DIR=$RUN_DIR/checkpoints",
        f"MODEL={shlex.quote(str(s['model']))}",
        f"TP={s['tp']}",
        f"PP={s['pp']}",
        f"MICRO_BATCH={s['micro_batch']}",
        f"SEQ_LENGTH={sweep.seq_length}",
        f"SAVE_INTERVAL={save_interval}",
        f"NODES={s['nodes']}",
        f"GPUS_PER_NODE={s['gpus_per_node']}",
    ]
    if tokenizer:
        lines.append(f"TOKENIZER={shlex.quote(os.path.abspath(tokenizer))}")
    lines += [
        f'EXTRA_ARGS="{extra_args}"',
        "# shellcheck source=examples/slurm/launch.sh",
        'source "${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}/examples/slurm/launch.sh"',
        "# Reached when the training ended without a requeue (launch.sh requeues a preempted run).",
        'if [ ! -f "$CKPT_DIR/stopped_by_signal" ]; then',
    ]
    if sweep.end_tasks:
        lines.append(
            f'  python "$REPO/tools/evaluate.py" --checkpoint "$CKPT_DIR" --tasks {shlex.quote(sweep.end_tasks)} '
            '--run-name "$VARIANT" --output-dir "$RUN_DIR/eval" --results "$RUN_DIR/eval_results.jsonl"'
        )
    lines += ['  echo "{}" > "$RUN_DIR/DONE"', "fi", ""]
    return "\n".join(lines)
