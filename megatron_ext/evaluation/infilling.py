"""HumanEval infilling, derived from HumanEval itself (the `human-eval-infilling` name on the package
index is an empty placeholder), in the two forms of Bavarian et al.'s benchmark:

- single-line: each non-blank line of each canonical solution is the middle to fill: 1,033 tasks;
- multi-line: each span from a non-blank line to a non-blank line at or after it: 5,815 tasks.

Prefix = the prompt and the solution's lines before the span, suffix = its lines after; a task passes
when prompt + completed solution passes the problem's tests. Labelled "derived" wherever shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class InfillingTask:
    task_id: str  # e.g. "HumanEval/0/single/3"
    problem: dict  # the HumanEval problem (test, entry_point)
    prefix: str
    middle: str
    suffix: str


def _lines(solution: str) -> list[str]:
    return solution.splitlines(keepends=True)


def derive(problems: list[dict], form: str) -> list[InfillingTask]:
    """form: "single" or "multi"."""
    if form not in ("single", "multi"):
        raise ValueError(f"infilling form {form!r}: single or multi")
    tasks = []
    for problem in problems:
        lines = _lines(problem["canonical_solution"])
        filled = [i for i, line in enumerate(lines) if line.strip()]
        spans = [(i, i) for i in filled] if form == "single" else [(i, j) for i in filled for j in filled if j >= i]
        for n, (first, last) in enumerate(spans):
            tasks.append(
                InfillingTask(
                    task_id=f"{problem['task_id']}/{form}/{n}",
                    problem=problem,
                    prefix=problem["prompt"] + "".join(lines[:first]),
                    middle="".join(lines[first : last + 1]),
                    suffix="".join(lines[last + 1 :]),
                )
            )
    return tasks


@dataclass(frozen=True)
class InfillingLayout:
    """How a model is prompted to fill a middle: prompt(prefix, suffix) -> ids, the special token the middle
    follows, and the one that ends it (None: the end-of-document id)."""

    prompt: Callable[[str, str], list[int]]
    after: int
    end: int | None = None


def layout(task: str, tokenizer) -> InfillingLayout:
    """The layout an infilling task (gold bits per byte or generation) prompts in: CodeGen2's span
    corruption for the `_codegen2` tasks (data/span_corruption.py), FIM's for the others (data/fim.py), as
    training laid its documents out; ValueError naming the task when the tokenizer lacks the tokens."""
    from functools import partial

    from megatron_ext.data import fim, span_corruption

    if task.endswith("_codegen2"):
        sentinels = span_corruption.SentinelIds.of(tokenizer)
        if sentinels is None:
            raise ValueError(f"{task}: the tokenizer has no CodeGen2 sentinels (<mask_1>, <sep>, <eom>)")
        return InfillingLayout(partial(span_corruption.infilling_prompt, tokenizer, sentinels), sentinels.masks[0],
                               sentinels.eom)  # fmt: skip
    fim_ids = fim.FimTokenIds.of(tokenizer)
    if fim_ids is None:
        raise ValueError(f"{task}: the tokenizer has no FIM tokens")
    return InfillingLayout(partial(fim.infilling_prompt, tokenizer, fim_ids), fim_ids.middle)
