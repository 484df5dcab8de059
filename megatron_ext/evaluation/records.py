"""The eval_results.jsonl record: one per figure, written by the training loop's evaluation and by
tools/evaluate.py alike, read by the reports (evaluation/report.py, sweeps/report.py)."""

from __future__ import annotations

import json
import os


def figure_records(
    figures,
    *,
    run: str,
    phase: str | None,
    iteration: int,
    tokens: int | None,
    checkpoint: str | None,
    phase_start_tokens: int | None = None,
) -> list[dict]:
    """figures: evaluation figures (task, metric, value, n, stderr). checkpoint: None in the training loop
    (the weights in memory), the checkpoint's path offline; phase_start_tokens: the tokens read before the
    phase began (the report marks phase boundaries with it)."""
    context = dict(run=run, phase=phase, phase_start_tokens=phase_start_tokens, iteration=iteration, tokens=tokens)
    return [
        {**context, "checkpoint": checkpoint, "task": f.task, "metric": f.metric, "value": f.value, "n": f.n,
         "stderr": f.stderr}
        for f in figures
    ]  # fmt: skip


def append_records(path: str, records: list[dict]) -> None:
    """Append the records to path (made with its directory if missing), flushed at once: a reader of a
    running job's file sees whole evaluations."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
