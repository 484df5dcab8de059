#!/usr/bin/env python
"""Evaluate checkpoints: log-likelihood tasks (the in-loop figures, for the same weights), code generation
and infilling by execution, on an exported Hugging Face directory or a pretrain_crystal.py checkpoint
(converted in memory); with --watch, every new checkpoint of a running job as it appears.

  python tools/evaluate.py --checkpoint runs/demo/hf --tasks humaneval,mbpp,infill_single:200,arc_easy \\
      [--n-samples 20 --temperature 0.2] --allow-code-execution
  python tools/evaluate.py --checkpoint runs/demo/checkpoints --watch --tasks arc_easy,humaneval_gold ...

Figures are appended to eval_results.jsonl (one record each) and printed; generated programs and their
results go to <output-dir>/samples/<task>.jsonl, which --rescore scores again without generating. Running
model-written code needs --allow-code-execution (evaluation/sandbox.py says what contains it).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.atomic_files import write_text_atomically  # noqa: E402
from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported

from megatron_ext.tokenizer import add_tokenizer_type_argument  # noqa: E402
from megatron_ext.training.arguments import add_run_flags  # noqa: E402

PROG = "evaluate.py"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="exported Hugging Face directory, or a --save directory")
    p.add_argument("--ckpt-step", type=int, help="a Megatron checkpoint's iteration (default: the latest)")
    p.add_argument(
        "--no-verify-integrity",
        dest="verify_integrity",
        action="store_false",
        help="read a Megatron checkpoint without hashing its files against its integrity.json first",
    )
    p.add_argument(
        "--tasks",
        required=True,
        help="comma-separated, each with an optional cap after ':': generation tasks (humaneval, mbpp, "
        "infill_single, infill_multi) and log-likelihood tasks (evaluation/tasks.py: arc_easy, hellaswag, "
        "humaneval_gold, ...)",
    )
    p.add_argument("--n-samples", type=int, default=1, help="completions per problem (pass@k for k <= this)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward / generate call")
    add_run_flags(p, "eval_pack_requests")  # as in the training loop, whose figures these equal
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--allow-code-execution", action="store_true", help="run the generated programs (sandboxed)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per program")
    p.add_argument("--generate-only", action="store_true", help="write the samples; score later with --rescore")
    p.add_argument("--rescore", action="store_true", help="score the samples files again, without generating")
    p.add_argument("--output-dir", help="samples and results (default: <checkpoint>/eval)")
    p.add_argument("--results", help="the eval_results.jsonl to append to (default: in --output-dir)")
    p.add_argument("--run-name", help="the run's name in the records (default: the directory holding the checkpoint)")
    p.add_argument("--tokenizer-model", help="default: the checkpoint's (exported beside it, or recorded in it)")
    add_tokenizer_type_argument(p)
    p.add_argument("--watch", action="store_true", help="evaluate each new checkpoint of --checkpoint as it appears")
    p.add_argument("--poll-seconds", type=float, default=60.0)
    p.add_argument("--until-iteration", type=int, help="--watch: stop once this iteration is evaluated")
    return p.parse_args(argv)


class UsageError(ValueError):
    pass


def split_tasks(text: str) -> tuple[list[tuple[str, int | None]], list[tuple[str, int | None]]]:
    """(generation tasks, log-likelihood tasks), each (name, cap)."""
    from megatron_ext.evaluation.generation import GENERATION_TASKS
    from megatron_ext.evaluation.tasks import TASKS, TaskError, parse_task_caps

    try:
        chosen = parse_task_caps(text, "--tasks", GENERATION_TASKS + tuple(TASKS))
    except TaskError as e:
        raise UsageError(str(e)) from None
    return [t for t in chosen if t[0] in GENERATION_TASKS], [t for t in chosen if t[0] in TASKS]


def check(args) -> None:
    """Everything that can be refused before a model is loaded."""
    generation, _ = split_tasks(args.tasks)
    executes = [n for n, _ in generation if n in ("humaneval", "mbpp")]
    if executes and not (args.allow_code_execution or args.generate_only):
        raise UsageError(
            f"--tasks {','.join(executes)}: scoring runs the generated programs; pass --allow-code-execution "
            "(sandboxed, evaluation/sandbox.py) or --generate-only"
        )
    if args.n_samples < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise UsageError("--n-samples, --max-new-tokens and --batch-size must be >= 1")
    if args.n_samples > 1 and args.temperature <= 0:
        raise UsageError(
            f"--n-samples {args.n_samples} with greedy decoding gives one sample n times; set --temperature"
        )
    if not os.path.isdir(args.checkpoint):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such directory")


def checkpoint_context(loaded) -> dict:
    """phase and tokens of a Megatron checkpoint, from its data_state.json when the run had phases."""
    path = os.path.join(loaded.path, "data_state.json")
    if not os.path.isfile(path):
        return {"phase": None, "tokens": None}
    with open(path) as f:
        state = json.load(f)
    return {"phase": state.get("phase"), "tokens": state.get("consumed_samples", 0) * loaded.seq_length}


def evaluate_once(args, step: int | None, output_dir: str, results_path: str) -> list:
    from tqdm import tqdm

    from megatron_ext.evaluation import checkpoint_model, generation
    from megatron_ext.evaluation.records import append_records, figure_records
    from megatron_ext.evaluation.sandbox import Limits
    from megatron_ext.evaluation.tasks import build_task_set

    generation_tasks, loglikelihood_tasks = split_tasks(args.tasks)
    started = time.perf_counter()
    loaded = checkpoint_model.load(
        args.checkpoint, step, args.tokenizer_model, args.tokenizer_type, verify_integrity=args.verify_integrity
    )
    parameters = sum(p.numel() for p in loaded.model.parameters())
    seconds = time.perf_counter() - started
    print(f"{PROG}: {loaded.path} (iteration {loaded.iteration}), {parameters:,} parameters, loaded in {seconds:.1f} s")
    figures = []
    for name, cap in loglikelihood_tasks:
        task = build_task_set(name, cap, loaded.tokenizer, loaded.seq_length, args.batch_size, args.eval_pack_requests)
        with tqdm(total=len(task), desc=name, unit="row", file=sys.stderr) as bar:
            figures += task.figures(checkpoint_model.score(loaded, task, args.batch_size, bar))
    samples_dir = os.path.join(output_dir, "samples")
    os.makedirs(samples_dir, exist_ok=True)
    limits = Limits(timeout_s=args.timeout, cpu_s=max(int(args.timeout), 1))
    for name, cap in generation_tasks:
        path = os.path.join(samples_dir, f"{name}{'' if step is None else f'_iter_{loaded.iteration:07d}'}.jsonl")
        todo = generation.problems(name, loaded.tokenizer, cap)
        if args.rescore:
            if not os.path.isfile(path):
                raise UsageError(f"--rescore: {path} does not exist (generate first)")
            with open(path) as f:
                saved = [json.loads(line) for line in f]
            by_id = {p.task_id: p for p in todo}
            completions = {p.task_id: [] for p in todo}
            for record in saved:
                completions[record["task_id"]].append(record["completion"])
            todo = [by_id[task_id] for task_id in completions if completions[task_id]]
            samples = [completions[p.task_id] for p in todo]
        else:
            with tqdm(total=len(todo) * args.n_samples, desc=name, unit="sample", file=sys.stderr) as bar:
                samples = generation.generate(loaded, todo, args.n_samples, args.temperature, args.top_p,
                                              args.max_new_tokens, args.batch_size, args.seed, bar)  # fmt: skip
        records, task_figures = generation.score(todo, samples, args.allow_code_execution and not args.generate_only,
                                                 limits)  # fmt: skip
        write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in records))
        figures += task_figures
    context = checkpoint_context(loaded)
    run = args.run_name or os.path.basename(os.path.dirname(os.path.abspath(args.checkpoint)))
    records = figure_records(figures, run=run, iteration=loaded.iteration, checkpoint=loaded.path, **context)
    append_records(results_path, records)
    for fig in figures:
        stderr = f" ± {fig.stderr:.4f}" if fig.stderr is not None else ""
        print(f"{fig.task:>20s} {fig.metric:<12s} {fig.value:.4f}{stderr}  (n={fig.n})")
    print(f"{PROG}: {len(figures)} figures appended to {results_path} in {time.perf_counter() - started:.1f} s")
    return figures


def watch(args, output_dir: str, results_path: str) -> int:
    """Evaluate every saved checkpoint not yet evaluated, oldest first; the evaluated iterations are kept in
    <output-dir>/watch_state.json, so a restarted watcher (a requeued SLURM job) goes on where it was."""
    from megatron_ext.checkpoint_files import saved_iterations
    from megatron_ext.evaluation.checkpoint_model import CheckpointLoadError

    state_path = os.path.join(output_dir, "watch_state.json")
    done = set(json.load(open(state_path))["evaluated"]) if os.path.isfile(state_path) else set()
    while True:
        for iteration in saved_iterations(args.checkpoint):
            if iteration in done:
                continue
            try:
                evaluate_once(args, iteration, output_dir, results_path)
            except CheckpointLoadError as e:  # e.g. a file changed since it was written: the job goes on
                print(f"{PROG}: warning: iteration {iteration} not evaluated: {e}", flush=True)
            done.add(iteration)
            write_text_atomically(state_path, json.dumps({"evaluated": sorted(done)}))
        if args.until_iteration is not None and any(i >= args.until_iteration for i in done):
            return 0
        time.sleep(args.poll_seconds)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check(args)
        output_dir = args.output_dir or os.path.join(args.checkpoint, "eval")
        results_path = args.results or os.path.join(output_dir, "eval_results.jsonl")
        os.makedirs(output_dir, exist_ok=True)
        if args.watch:
            return watch(args, output_dir, results_path)
        evaluate_once(args, args.ckpt_step, output_dir, results_path)
    except Exception as e:  # a user's input problem ends as one line; a bug keeps its traceback
        from megatron_ext.evaluation.benchmark_data import BenchmarkDataMissing
        from megatron_ext.evaluation.checkpoint_model import CheckpointLoadError
        from megatron_ext.evaluation.sandbox import ExecutionNotAllowed
        from megatron_ext.tokenizer import TokenizerError

        if isinstance(e, (UsageError, BenchmarkDataMissing, CheckpointLoadError, ExecutionNotAllowed, TokenizerError)):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    code = main()
    # What is still alive goes with the process. Frozen, it is left out of the interpreter's last garbage
    # collections, which walk every object torch and transformers made: 0.7 s of each run on the demo's CPU.
    # (Every output is written and closed by now: the samples and results atomically.)
    gc.freeze()
    sys.exit(code)
