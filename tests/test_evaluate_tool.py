"""tools/evaluate.py on checkpoints: the log-likelihood figures equal the training loop's for the same
weights (a Megatron checkpoint converted in memory, and its Hugging Face export), generation is batched
without changing greedy output, samples can be rescored, the watch mode evaluates each checkpoint once,
and the export works with lm-evaluation-harness."""

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest
from helpers.distributed_run import REPO, subprocess_environment, train

pytestmark = pytest.mark.launch  # every test here starts processes


TOKENIZER = REPO / "data" / "demo" / "crystal_demo.model"
TASKS = "arc_easy:10,humaneval_gold:4,infill_single_gold:4"


def _tool():
    """tools/evaluate.py as a module ("evaluate" alone is Hugging Face's package of that name), run in this
    process: one import of torch and transformers for every call."""
    spec = importlib.util.spec_from_file_location("evaluate_tool", REPO / "tools" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TOOL = _tool()


def evaluate(*args, check=True):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = TOOL.main([str(a) for a in args])
    if check:
        assert code == 0, err.getvalue()[-3000:]
    return code, err.getvalue()


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of the small phases file with the tasks evaluated in the loop, a checkpoint each step,
    and the last one exported."""
    tmp = tmp_path_factory.mktemp("evaluate")
    ckpt = tmp / "ckpt"
    train(
        1,
        ["--model", "crystal-test", "--phases", str(REPO / "tests" / "data" / "phases_small.yaml")]
        + ["--tokenizer-model", str(TOKENIZER), "--micro-batch-size", "2", "--num-workers", "0"]
        + ["--train-iters", "2", "--eval-interval", "2", "--eval-samples-per-source", "4", "--eval-tasks", TASKS]
        + ["--save", str(ckpt), "--save-interval", "1", "--data-cache-path", str(tmp / "cache")],
    )
    export = subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_to_hf.py"), "--load", str(ckpt), "--output", str(tmp / "hf")]
        + ["--dtype", "fp32", "--no-verify"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env=subprocess_environment(),
    )
    assert export.returncode == 0, export.stderr[-2000:]
    return tmp


def _figures(rows):
    return {(r["task"], r["metric"]): r["value"] for r in rows if not r["task"].startswith("valid")}


@pytest.mark.parametrize("source", ["megatron", "hf"])
def test_offline_loglikelihood_figures_equal_the_training_loops(run, source):
    in_loop = _figures(records(run / "ckpt" / "eval_results.jsonl"))
    assert set(in_loop) == {("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("humaneval_gold", "bpb"),
                            ("infill_single_gold", "bpb")}  # fmt: skip
    out = run / f"offline_{source}"
    checkpoint = run / "ckpt" if source == "megatron" else run / "hf"
    evaluate("--checkpoint", checkpoint, "--tasks", TASKS, "--output-dir", out)
    rows = records(out / "eval_results.jsonl")
    offline = _figures(rows)
    assert set(offline) == set(in_loop)
    for key, value in in_loop.items():
        assert offline[key] == pytest.approx(value, abs=1e-5), key
    if source == "hf":  # requests packed (the default, as in the loop) or one per row: the same figures
        evaluate("--checkpoint", checkpoint, "--tasks", TASKS, "--output-dir", out / "one_per_row",
                 "--no-eval-pack-requests")  # fmt: skip
        alone = _figures(records(out / "one_per_row" / "eval_results.jsonl"))
        assert alone == pytest.approx(offline, abs=1e-5)
    if source == "megatron":  # the records say which checkpoint, iteration, phase and tokens
        assert {(r["iteration"], r["phase"], r["tokens"], r["run"]) for r in rows} == {
            (2, "text", 2 * 8 * 32, run.name)
        }
        assert rows[0]["checkpoint"].endswith("iter_0000002")


def test_generation_is_batched_greedy_and_rescored(run):
    """Greedy completions are the same one problem at a time and four to a left-padded batch; the samples
    file rescored gives the same figures; humaneval without --allow-code-execution is refused up front."""
    common = ["--checkpoint", run / "hf", "--tasks", "infill_single:3,humaneval:2,mbpp:2", "--max-new-tokens", "12"]
    common += ["--allow-code-execution", "--timeout", "5"]
    evaluate(*common, "--batch-size", "1", "--output-dir", run / "gen1")
    evaluate(*common, "--batch-size", "4", "--output-dir", run / "gen4")
    for task in ("infill_single", "humaneval", "mbpp"):
        one, four = (records(run / d / "samples" / f"{task}.jsonl") for d in ("gen1", "gen4"))
        assert [r["completion"] for r in one] == [r["completion"] for r in four], task
        assert all("passed" in r and r["status"] in ("passed", "failed", "timeout") for r in one)
    assert all("exact_match" in r for r in records(run / "gen1" / "samples" / "infill_single.jsonl"))
    first = _figures(records(run / "gen4" / "eval_results.jsonl"))
    assert set(first) == {("infill_single", "pass@1"), ("infill_single", "exact_match"), ("humaneval", "pass@1"),
                          ("mbpp", "pass@1")}  # fmt: skip
    evaluate(*common, "--rescore", "--output-dir", run / "gen4")
    rows = records(run / "gen4" / "eval_results.jsonl")
    assert _figures(rows[len(first) :]) == first
    code, stderr = evaluate("--checkpoint", run / "hf", "--tasks", "humaneval", check=False)
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("evaluate.py: error: ")
    assert "pass --allow-code-execution" in stderr


def test_batches_hold_prompts_of_similar_length_and_each_completion_is_its_problems(run):
    """generate() batches the longest prompts first; every completion comes back to its own problem: the
    same as that problem generated alone."""
    import torch

    from megatron_ext.evaluation import checkpoint_model, generation

    loaded = checkpoint_model.load(str(run / "hf"))
    torch.manual_seed(0)
    with torch.no_grad():  # two steps of training predict one token everywhere: random weights let context decide
        for parameter in loaded.model.parameters():
            parameter.normal_(0.0, 0.5)
    todo = generation.problems("infill_single", loaded.tokenizer, 7)
    lengths = [len(p.prompt_ids) for p in todo]
    assert lengths != sorted(lengths, reverse=True)  # the batches' order is not the problems' order
    together = generation.generate(loaded, todo, max_new_tokens=8, batch_size=3)
    alone = [generation.generate(loaded, [p], max_new_tokens=8, batch_size=1)[0] for p in todo]
    assert together == alone
    assert len({c[0] for c in alone}) > 1  # different completions: a mix-up would show


def test_evaluation_never_imports_megatron_core(run):
    """tools/evaluate.py reads a Megatron checkpoint without Megatron-Core (checkpoint_files.py, the
    reader), which costs 1.5 s of every start."""
    probe = (
        "import runpy, sys\n"
        f"sys.argv = ['evaluate.py', '--checkpoint', {str(run / 'ckpt')!r}, '--tasks', 'arc_easy:2,infill_single:2',"
        f" '--max-new-tokens', '4', '--output-dir', {str(run / 'no_megatron')!r}]\n"
        "try:\n"
        "    runpy.run_path('tools/evaluate.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, sorted(m for m in sys.modules if m.startswith('megatron.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=subprocess_environment())  # fmt: skip
    assert out.stdout.splitlines()[-1] == "exit 0 []", out.stderr[-2000:]


def test_codegen2_infilling_generates_to_eom_and_the_reference_spans_score_one(run):
    """The derived infilling sets in CodeGen2's layout (prefix <mask_1> suffix <eod> <sep> <mask_1>, the
    completion ending at <eom>): greedy generation runs; samples holding the reference middles, rescored,
    match exactly and pass the problems' tests (prefix + middle + suffix is the canonical program)."""
    from megatron_ext.evaluation.generation import problems
    from megatron_ext.tokenizer import CrystalTokenizer

    evaluate("--checkpoint", run / "hf", "--tasks", "infill_single_codegen2:2", "--max-new-tokens", "6",
             "--output-dir", run / "cg2_gen")  # fmt: skip
    generated = records(run / "cg2_gen" / "samples" / "infill_single_codegen2.jsonl")
    assert len(generated) == 2 and all(isinstance(r["completion"], str) and "exact_match" in r for r in generated)
    tok = CrystalTokenizer(str(TOKENIZER))
    out = run / "cg2_ref"
    (out / "samples").mkdir(parents=True)
    for task in ("infill_single_codegen2", "infill_multi_codegen2"):
        reference = [{"task": task, "task_id": p.task_id, "sample": 0, "completion": p.reference}
                     for p in problems(task, tok, 12)]  # fmt: skip
        (out / "samples" / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference))
    evaluate("--checkpoint", run / "hf", "--tasks", "infill_single_codegen2:12,infill_multi_codegen2:12", "--rescore",
             "--allow-code-execution", "--timeout", "10", "--output-dir", out)  # fmt: skip
    figures = {(r["task"], r["metric"]): (r["value"], r["n"]) for r in records(out / "eval_results.jsonl")}
    for task in ("infill_single_codegen2", "infill_multi_codegen2"):
        assert figures[task, "exact_match"] == (1.0, 12) and figures[task, "pass@1"] == (1.0, 12), figures


def test_sampling_gives_n_samples_per_problem_reproducibly(run):
    common = ["--checkpoint", run / "hf", "--tasks", "humaneval:2", "--n-samples", "3", "--temperature", "0.8"]
    common += ["--max-new-tokens", "8", "--allow-code-execution", "--timeout", "5", "--seed", "3"]
    for out in ("sample_a", "sample_b"):
        evaluate(*common, "--output-dir", run / out)
    a, b = (records(run / out / "samples" / "humaneval.jsonl") for out in ("sample_a", "sample_b"))
    assert [(r["task_id"], r["sample"]) for r in a] == [
        (t, s) for t in ("HumanEval/0", "HumanEval/1") for s in range(3)
    ]
    assert [r["completion"] for r in a] == [r["completion"] for r in b]  # the seed decides the samples
    assert set(_figures(records(run / "sample_a" / "eval_results.jsonl"))) == {("humaneval", "pass@1")}  # k <= n


def test_watch_evaluates_each_checkpoint_once(run):
    out = run / "watch"
    args = ["--checkpoint", run / "ckpt", "--tasks", "arc_easy:4", "--watch", "--until-iteration", "2"]
    args += ["--poll-seconds", "0.1", "--output-dir", out]
    evaluate(*args)
    rows = records(out / "eval_results.jsonl")
    assert sorted({r["iteration"] for r in rows}) == [1, 2] and len(rows) == 4
    assert json.loads((out / "watch_state.json").read_text()) == {"evaluated": [1, 2]}
    evaluate(*args)  # restarted (a requeued job): nothing is evaluated again
    assert len(records(out / "eval_results.jsonl")) == 4


@pytest.mark.timeout(300)
def test_the_export_works_with_lm_evaluation_harness(run):
    out = run / "lm_eval"
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "lm_eval"), "--model", "hf", "--model_args",
         f"pretrained={run / 'hf'},trust_remote_code=True,dtype=float32", "--include_path", "examples/eval",
         "--tasks", "crystal_smoke", "--device", "cpu", "--batch_size", "4", "--output_path", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=280,
        env=subprocess_environment({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = list(out.rglob("results_*.json"))
    result = json.loads(result_file.read_text())["results"]["crystal_smoke"]
    # The same questions scored here with transformers directly, as lm-eval scores them (context without a
    # start token, a space before the choice, the choice's tokens from the whole text's, acc_norm per
    # character of the choice): the same accuracies.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(run / "hf", trust_remote_code=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(run / "hf", trust_remote_code=True)
    hits, hits_norm = [], []
    for line in (REPO / "examples" / "eval" / "crystal_smoke.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = f"Question: {doc['question']}\nAnswer:"
        n_context = len(tok(context, add_special_tokens=False).input_ids)
        scores = []
        for choice in doc["choices"]:
            ids = tok(context + " " + choice, add_special_tokens=False).input_ids  # lm-eval's target delimiter
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(n_context, len(ids))))
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
        norm = [s / len(c) for s, c in zip(scores, doc["choices"])]
        hits_norm.append(max(range(len(norm)), key=norm.__getitem__) == doc["answer"])
    assert result["acc,none"] == pytest.approx(sum(hits) / 8)
    assert result["acc_norm,none"] == pytest.approx(sum(hits_norm) / 8)
