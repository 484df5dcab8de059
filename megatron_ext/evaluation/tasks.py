"""Downstream tasks scored by log-likelihood, the same way in the training loop and on checkpoints.

- Multiple choice (accuracy, and accuracy normalised by the length of each choice in UTF-8 bytes): ARC
  Easy / Challenge, HellaSwag, PIQA, Winogrande, SciQ, BoolQ, CommonsenseQA, Social IQa, OpenBookQA, from
  OLMo's zero-shot request files ("rc": each choice scored as the continuation of the question).
- Bits per byte of a gold continuation: LAMBADA; HumanEval's and MBPP's canonical solutions given their
  prompts (OLMo's "gold bpb" requests); and the derived HumanEval infilling middles given prefix and
  suffix in the FIM layout training used (data/fim.py's infilling_prompt, shared with the data path), or
  in CodeGen2's span-corruption layout (`_codegen2`: data/span_corruption.py's infilling_prompt), so that
  a model is scored in the format it learned.

Each task is an evaluation set (eval_set.py): one slot per (question, choice), packed into rows of the
model's sequence length (a context longer than that loses its start), unless packing is turned off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from megatron_ext.evaluation import benchmark_data
from megatron_ext.evaluation.eval_set import LOSS, Figure, Piece, mean_and_stderr, pack, packed_row


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str  # "choice" or "bpb"
    request_file: tuple[str, str] | None  # OLMo's (task, variant); None: derived here
    licence: str


TASKS = {
    spec.name: spec
    for spec in (
        TaskSpec("arc_easy", "choice", ("arc_easy", "rc_0shot"), "CC BY-SA 4.0"),
        TaskSpec("arc_challenge", "choice", ("arc_challenge", "rc_0shot"), "CC BY-SA 4.0"),
        TaskSpec("hellaswag", "choice", ("hellaswag", "rc_0shot"), "MIT"),
        TaskSpec("piqa", "choice", ("piqa", "rc_0shot"), "AFL 3.0"),
        TaskSpec("winogrande", "choice", ("winogrande", "rc_0shot"), "CC BY 4.0"),
        TaskSpec("sciq", "choice", ("sciq", "rc_0shot"), "CC BY-NC 3.0"),
        TaskSpec("boolq", "choice", ("boolq", "rc_0shot"), "CC BY-SA 3.0"),
        TaskSpec("csqa", "choice", ("csqa", "rc_0shot"), "MIT"),
        TaskSpec("socialiqa", "choice", ("socialiqa", "rc_0shot"), "CC BY 4.0"),
        TaskSpec("openbookqa", "choice", ("openbookqa", "rc_0shot"), "Apache 2.0"),
        TaskSpec("mmlu", "choice", None, "MIT"),  # 57 subjects' test questions, from the Arrow copy
        TaskSpec("lambada", "bpb", ("lambada", "bpb_0shot"), "CC BY 4.0"),
        TaskSpec("humaneval_gold", "bpb", ("codex_humaneval", "gold_bpb_0shot"), "MIT"),
        TaskSpec("mbpp_gold", "bpb", ("codex_mbpp", "gold_bpb_0shot"), "CC BY 4.0"),
        TaskSpec("infill_single_gold", "bpb", None, "MIT (derived from HumanEval)"),
        TaskSpec("infill_multi_gold", "bpb", None, "MIT (derived from HumanEval)"),
        # The same middles in CodeGen2's span-corruption layout, for models trained with that objective.
        TaskSpec("infill_single_gold_codegen2", "bpb", None, "MIT (derived from HumanEval)"),
        TaskSpec("infill_multi_gold_codegen2", "bpb", None, "MIT (derived from HumanEval)"),
    )
}
UNCONDITIONAL_DOC_IDS = 1_000_000  # OLMo's request files also hold answer-only requests from this doc id on


class TaskError(ValueError):
    """A bad task list; one line naming the task."""


def parse_task_caps(text: str, flag: str, known) -> tuple[tuple[str, int | None], ...]:
    """ "arc_easy,piqa,hellaswag:1000" -> (("arc_easy", None), ("piqa", None), ("hellaswag", 1000)): names
    from `known`, each with an optional cap on its questions; every command line's task list."""
    out = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, cap = item.partition(":")
        if name not in known:
            raise TaskError(f"{flag} {text}: unknown task {name!r}; choose from {', '.join(known)}")
        if cap and (not cap.isdigit() or int(cap) < 1):
            raise TaskError(f"{flag} {text}: {item}: the sample cap after ':' must be a positive integer")
        out.append((name, int(cap) if cap else None))
    return tuple(out)


def parse_tasks(text: str, flag: str = "--eval-tasks") -> tuple[tuple[str, int | None], ...]:
    """The log-likelihood tasks of this module, as parse_task_caps reads them."""
    return parse_task_caps(text, flag, TASKS)


@dataclass(frozen=True)
class Request:
    doc: int  # question index within the task
    choice: int
    gold: int | None  # the right choice (None for bpb tasks)
    context: list[int]  # token ids, the document start (end-of-document id) first
    continuation: list[int]
    continuation_bytes: int


def _text_requests(spec: TaskSpec, tokenizer, cap: int | None) -> list[Request]:
    records = [r for r in benchmark_data.olmo_requests(*spec.request_file) if r["doc_id"] < UNCONDITIONAL_DOC_IDS]
    docs: dict[int, int] = {}
    out = []
    for r in records:
        index = docs.setdefault(r["doc_id"], len(docs))
        if cap is not None and index >= cap:
            continue
        gold = r.get("label") if spec.kind == "choice" else None
        request = r["request"]
        out.append(_request(tokenizer, index, r.get("idx", 0), gold, request["context"], request["continuation"]))
    return out


def _request(tokenizer, doc: int, choice: int, gold, context: str, continuation: str) -> Request:
    context_ids = tokenizer.encode(context)
    # As lm-evaluation-harness splits them: the whole text's tokens after the context's count.
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids) :] or tokenizer.encode(continuation)
    return Request(doc, choice, gold, [tokenizer.eod, *context_ids], continuation_ids, len(continuation.encode()))


def _mmlu_requests(tokenizer, cap: int | None) -> list[Request]:
    """OLMo's zero-shot "rc" form: each choice scored as the answer to "Question: ...\\nAnswer:"."""
    questions = benchmark_data.mmlu_questions()[:cap]
    return [
        _request(tokenizer, i, c, q["answer"], f"Question: {q['question']}\nAnswer:", f" {choice}")
        for i, q in enumerate(questions)
        for c, choice in enumerate(q["choices"])
    ]


def _infilling_requests(name: str, tokenizer, cap: int | None) -> list[Request]:
    """infill_<form>_gold[_codegen2]: each derived middle given its prefix and suffix, in the layout the
    objective trained: FIM's (data/fim.py) or CodeGen2's span corruption (data/span_corruption.py)."""
    from megatron_ext.data.fim import encode_part
    from megatron_ext.evaluation.infilling import derive, layout

    try:
        prompt = layout(name, tokenizer).prompt
    except ValueError as e:
        raise TaskError(str(e)) from None
    tasks = derive(benchmark_data.humaneval_problems(), name.split("_")[1])[:cap]
    return [
        Request(i, 0, None, [tokenizer.eod, *prompt(t.prefix, t.suffix)], encode_part(tokenizer, t.middle),
                len(t.middle.encode()))
        for i, t in enumerate(tasks)
    ]  # fmt: skip


class LoglikelihoodSet(torch.utils.data.Dataset):
    def __init__(
        self, spec: TaskSpec, requests: list[Request], seq_length: int, batch_size: int, pad_id: int, packed: bool
    ):
        self.spec, self.requests, self.seq_length, self.pad_id = spec, requests, seq_length, pad_id
        self.name, self.num_slots, self.batch_size, self.packed = spec.name, len(requests), batch_size, packed
        self.rows = pack([len(r.context) + len(r.continuation) for r in requests], seq_length, together=packed)
        self.steps = -(-len(self.rows) // batch_size)
        self.docs = len({r.doc for r in requests})
        # Continuations longer than a row: scored on the part that fits (the bits per byte come out low).
        self.truncated = sum(len(r.continuation) > seq_length for r in requests)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __getitem__(self, i: int) -> dict:
        pieces = [
            Piece(r.context + r.continuation, len(r.context) - 1, j)
            for j in self.rows[min(i, len(self.rows) - 1)]
            for r in (self.requests[j],)
        ]
        out = packed_row(pieces, self.seq_length, self.pad_id)
        if i >= len(self.rows):  # padding to a whole batch
            out["loss_mask"].zero_()
        return out

    def figures(self, slots: np.ndarray) -> list[Figure]:
        slots = np.asarray(slots, dtype=np.float64)
        if self.spec.kind == "bpb":
            nbytes = np.array([r.continuation_bytes for r in self.requests], dtype=np.float64)
            _, stderr = mean_and_stderr(slots[:, LOSS] / math.log(2) / np.maximum(nbytes, 1))
            return [Figure(self.name, "bpb", slots[:, LOSS].sum() / math.log(2) / nbytes.sum(), len(nbytes), stderr)]
        return choice_figures(self.name, self.requests, -slots[:, LOSS])


def choice_figures(name: str, requests: list[Request], loglikelihoods: np.ndarray) -> list[Figure]:
    """Accuracy (the most likely choice is the gold one) and length-normalised accuracy (likelihood per
    UTF-8 byte of the choice), with binomial standard errors; ties go to the first choice."""
    by_doc: dict[int, list[tuple[int, float, int, int]]] = {}
    for request, ll in zip(requests, loglikelihoods):
        by_doc.setdefault(request.doc, []).append((request.choice, float(ll), request.continuation_bytes, request.gold))
    right, right_norm = [], []
    for choices in by_doc.values():
        choices.sort()
        gold = choices[0][3]
        lls = np.array([c[1] for c in choices])
        per_byte = lls / np.maximum([c[2] for c in choices], 1)
        right.append(choices[int(np.argmax(lls))][0] == gold)
        right_norm.append(choices[int(np.argmax(per_byte))][0] == gold)
    out = []
    for metric, hits in (("acc", right), ("acc_norm", right_norm)):
        p, n = float(np.mean(hits)), len(hits)
        out.append(Figure(name, metric, p, n, math.sqrt(p * (1 - p) / max(n - 1, 1))))
    return out


def build_task_set(
    name: str, cap: int | None, tokenizer, seq_length: int, batch_size: int, packed: bool = True
) -> LoglikelihoodSet:
    spec = TASKS[name]
    if spec.request_file is not None:
        requests = _text_requests(spec, tokenizer, cap)
    elif name == "mmlu":
        requests = _mmlu_requests(tokenizer, cap)
    else:
        requests = _infilling_requests(name, tokenizer, cap)
    return LoglikelihoodSet(spec, requests, seq_length, batch_size, tokenizer.eod, packed)
