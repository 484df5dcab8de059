"""tools/sweep.py: plan expansion (names, rescaled weights, equal token budgets, checked phases files),
a local two-run sweep interrupted and resumed without repeating the finished run, the SLURM array script,
and the comparison report from fixture results."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from helpers.distributed_run import REPO, subprocess_environment

from megatron_ext.sweeps import report, runner
from megatron_ext.sweeps.plan import SweepError, load_sweep, write_phases_files

CODE_SHARE = REPO / "examples" / "sweeps" / "code_share.yaml"
CRYSTAL = REPO / "examples" / "sweeps" / "crystal_ablation.yaml"
OBJECTIVES = REPO / "examples" / "sweeps" / "objectives.yaml"


def test_code_share_plan_rescales_the_blend_and_keeps_the_budget(tmp_path):
    sweep = load_sweep(str(CODE_SHARE), str(tmp_path))
    assert [v.name for v in sweep.variants] == ["code0", "code0.25", "code0.5", "code0.75", "code1"]
    for v, share in zip(sweep.variants, (0.0, 0.25, 0.5, 0.75, 1.0)):
        blend = v.phases["phases"][0]["blend"]
        assert blend == pytest.approx({"text": 1 - share, "code": share}) and sum(blend.values()) == pytest.approx(1)
        assert v.tokens == 307200 == v.phases["phases"][0]["iters"] * 8 * 256
    from megatron_ext.tokenizer import CrystalTokenizer

    paths = write_phases_files(sweep, CrystalTokenizer(str(REPO / "data" / "demo" / "crystal_demo.model")))
    assert [os.path.relpath(p, tmp_path) for p in paths] == [f"code_share/{v.name}/phases.yaml" for v in sweep.variants]
    derived = yaml.safe_load(open(paths[1]))
    assert all(os.path.isabs(p) for s in derived["sources"].values() for p in s["prefixes"])


def test_span_corruption_is_a_sweep_axis_checked_against_the_tokenizer(tmp_path):
    """phases[i].span_corruption.<source>.rate varies CodeGen2's causal / span-corruption mixture; each
    variant's phases file is checked with the tokenizer's sentinels (a FIM source refused in one line)."""
    from megatron_ext.tokenizer import CrystalTokenizer

    sweep_file = tmp_path / "spans.yaml"
    body = CODE_SHARE.read_text().replace("phases[0].blend.code: [0.0, 0.25, 0.5, 0.75, 1.0]",
                                          "phases[0].span_corruption.code.rate: [0.0, 0.5]")  # fmt: skip
    sweep_file.write_text(body.replace("base: examples/", f"base: {REPO}/examples/"))
    sweep = load_sweep(str(sweep_file), str(tmp_path))
    assert [v.name for v in sweep.variants] == ["rate0", "rate0.5"]
    tok = CrystalTokenizer(str(REPO / "data" / "demo" / "crystal_demo.model"))
    paths = write_phases_files(sweep, tok)
    assert yaml.safe_load(open(paths[1]))["phases"][0]["span_corruption"] == {"code": {"rate": 0.5}}
    both_axes = "phases[0].span_corruption.code.rate: [0.5]\n  phases[0].fim.code.fim_rate: [0.5]"
    with_fim = body.replace("phases[0].span_corruption.code.rate: [0.0, 0.5]", both_axes)
    sweep_file.write_text(with_fim.replace("base: examples/", f"base: {REPO}/examples/"))
    with pytest.raises(SweepError, match=r"^rate0.5_fim_rate0.5: .*span_corruption.code: source 'code' has FIM"):
        write_phases_files(load_sweep(str(sweep_file), str(tmp_path / "fim")), tok)


def test_the_objectives_sweep_plans_causal_fim_and_span_corruption_on_one_budget(tmp_path):
    from megatron_ext.tokenizer import CrystalTokenizer

    sweep = load_sweep(str(OBJECTIVES), str(tmp_path))
    paths = write_phases_files(sweep, CrystalTokenizer(str(REPO / "data" / "demo" / "crystal_demo.model")))
    phases = {v.name: yaml.safe_load(open(p))["phases"][0] for v, p in zip(sweep.variants, paths)}
    for seed in (1, 2):
        assert "fim" not in phases[f"causal_seed{seed}"] and "span_corruption" not in phases[f"causal_seed{seed}"]
        assert phases[f"fim0.5_seed{seed}"]["fim"] == {"code": {"fim_rate": 0.5}}
        assert phases[f"span0.5_seed{seed}"]["span_corruption"] == {"code": {"rate": 0.5}}
    assert {v.tokens for v in sweep.variants} == {307200} and {v.overrides["seed"] for v in sweep.variants} == {1, 2}


def test_crystal_ablation_plan_scales_three_phases_to_the_budget(tmp_path):
    sweep = load_sweep(str(CRYSTAL), str(tmp_path))
    assert len(sweep.variants) == 3 * 2 * 2
    assert len({v.name for v in sweep.variants}) == 12 and sweep.variants[0].name == "fim_rate0_starcoder0.5_seed1"
    step = 2112 * 2048
    base = yaml.safe_load(open(REPO / "examples" / "phases" / "crystal.yaml"))
    factor = 50e9 / sum(p["iters"] * step for p in base["phases"])
    for v in sweep.variants:
        assert abs(v.tokens - 50e9) <= step  # within one step of the budget
        phases = v.phases["phases"]
        assert phases[0]["iters"] == round(base["phases"][0]["iters"] * factor)
        assert phases[0]["lr"]["decay_iters"] == round(294423 * phases[0]["iters"] / base["phases"][0]["iters"])
        assert phases[1]["fim"]["starcoder"]["fim_rate"] == v.overrides["phases[1].fim.starcoder.fim_rate"]
        share = v.overrides["phases[1].blend.starcoder"]
        assert phases[1]["blend"] == pytest.approx({"sp_odd": 1 - share, "starcoder": share})
        assert v.phases["seed"] == v.overrides["seed"]
    assert len({v.tokens for v in sweep.variants}) == 1  # equal budgets: comparable runs


def test_a_share_rescales_the_other_sources_in_proportion(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(
        "sources: {a: {prefixes: [x]}, b: {prefixes: [y]}, c: {prefixes: [z]}}\n"
        "phases:\n  - {name: p, iters: 10, blend: {a: 0.6, b: 0.3, c: 0.1}, lr: {peak: 1.0}}\n"
    )
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(f"name: s\nbase: {base}\nseq_length: 8\naxes:\n  phases[0].blend.a: [0.5, 1.0]\n")
    half, whole = load_sweep(str(sweep_file), str(tmp_path)).variants
    assert half.phases["phases"][0]["blend"] == pytest.approx({"a": 0.5, "b": 0.375, "c": 0.125})
    assert whole.phases["phases"][0]["blend"] == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.0})


@pytest.mark.parametrize(
    "body, message",
    [
        ("axes:\n  phases[0].blend.a: [2.0]", "a2: phases[0].blend.a: a share must lie in [0, 1]"),
        ("axes:\n  phases[3].iters: [1]", "the base file has 1 phases"),
        ("axes:\n  phases[0].colour: [1]", "cannot override phases[0].colour"),
        ("axes: {seed: [1]}\nfoo: 1", "unknown key 'foo'"),
        ("variants: {a: {}}\naxes: {seed: [1]}", "give exactly one of 'axes'"),
    ],
)
def test_a_bad_sweep_is_one_line_naming_the_key(tmp_path, body, message):
    base = tmp_path / "base.yaml"
    base.write_text(
        "sources: {a: {prefixes: [x]}}\nphases:\n  - {name: p, iters: 10, blend: {a: 1.0}, lr: {peak: 1.0}}\n"
    )
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(f"name: s\nbase: {base}\nseq_length: 8\n{body}\n")
    with pytest.raises(SweepError) as e:
        load_sweep(str(sweep_file), str(tmp_path))
    assert message in str(e.value) and str(sweep_file) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.launch
def test_slurm_array_script_is_shellcheck_clean_and_runs_the_right_task(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/sweep.py", "run", str(CRYSTAL), "--slurm", "--dry-run", "--output", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=subprocess_environment(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / "crystal_ablation" / "sweep.sbatch"
    assert proc.stdout.strip().splitlines()[-1] == f"sbatch {script}"
    text = script.read_text()
    assert "#SBATCH --array=0-11" in text and "#SBATCH --requeue" in text
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    check = subprocess.run([shellcheck, "-x", "-P", str(REPO), str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    # Task 3 under a faked SLURM (launch.sh's dry run): the fourth run's phases file, seed and directory.
    from test_launch import _slurm_env

    env = _slurm_env(tmp_path, SLURM_ARRAY_TASK_ID="3", DRY_RUN="1")
    task = subprocess.run(["bash", str(script)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert task.returncode == 0, task.stderr
    run = tmp_path / "crystal_ablation" / "fim_rate0_starcoder0.628_seed2"
    node0 = next(line for line in task.stdout.splitlines() if line.startswith("node 0:"))
    for flag in (f"--phases {run}/phases.yaml", f"--save {run}/checkpoints", "--seed 2", "--model crystal-1b",
                 "--run-name fim_rate0_starcoder0.628_seed2", "--seq-length 2048"):  # fmt: skip
        assert flag in node0, flag


SMALL_SWEEP = """name: tiny
base: {base}
seq_length: 32
global_batch_size: 8
tokens: 1024                      # 4 steps of 8 x 32
axes:
  phases[1].blend.code: [0.2, 0.8]
train: [--model, crystal-test, --tokenizer-model, {tokenizer}, --micro-batch-size, "4", --num-workers, "0",
        --save-interval, "1"]
nproc: 1
eval_interval: 4
end_tasks: humaneval_gold:4
"""


def test_a_typo_in_the_sweeps_train_flags_is_one_line_before_any_run(tmp_path):
    """tools/sweep.py run checks every run's flags in its own process before the first torchrun."""
    sweep_file = tmp_path / "typo.yaml"
    body = SMALL_SWEEP.replace('--micro-batch-size, "4"', '--micro-batch-sise, "4"')
    sweep_file.write_text(body.format(base=REPO / "tests" / "data" / "phases_small.yaml",
                                      tokenizer=REPO / "data" / "demo" / "crystal_demo.model"))  # fmt: skip
    command = [sys.executable, "tools/sweep.py", "run", str(sweep_file), "--output", str(tmp_path)]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_environment(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        "sweep.py: error: code0.2: pretrain_crystal.py: unrecognized arguments: --micro-batch-sise 4\n"
    )
    assert not list(tmp_path.glob("typo/*/train.log"))  # no run started


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_sweep_interrupted_after_its_first_run_continues_without_repeating_it(tmp_path):
    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(SMALL_SWEEP.format(base=REPO / "tests" / "data" / "phases_small.yaml",
                                             tokenizer=REPO / "data" / "demo" / "crystal_demo.model"))  # fmt: skip
    command = [sys.executable, "tools/sweep.py", "plan", str(sweep_file), "--output", str(tmp_path), "--estimate"]
    planned = subprocess.run(command, cwd=REPO, env=subprocess_environment(), capture_output=True, text=True)
    assert planned.returncode == 0, planned.stderr
    estimate = re.search(r"estimated training time on this machine: ([\d.]+) s ", planned.stdout)
    assert estimate and 0 < float(estimate.group(1)) < 60, planned.stdout  # 2 runs x 4 steps of crystal-test
    command[2] = "run"
    command.remove("--estimate")
    first = subprocess.Popen(command, cwd=REPO, env=subprocess_environment(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    done = tmp_path / "tiny" / "code0.2" / "DONE"
    deadline = time.time() + 300
    while not done.exists():
        assert first.poll() is None, first.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # while the second run trains (or starts)
    first.wait()
    assert not (tmp_path / "tiny" / "code0.8" / "DONE").exists()
    second = subprocess.run(command, cwd=REPO, env=subprocess_environment(), capture_output=True, text=True,
                            timeout=400)  # fmt: skip
    assert second.returncode == 0, second.stdout + second.stderr
    assert "code0.2: done, skipped" in second.stdout and "code0.8: done in" in second.stdout
    metrics = [json.loads(line) for line in open(tmp_path / "tiny" / "code0.2" / "metrics.jsonl")]
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]  # trained once
    results = [json.loads(line) for line in open(tmp_path / "tiny" / "code0.8" / "eval_results.jsonl")]
    assert {(r["run"], r["task"]) for r in results} >= {("code0.8", "valid/code"), ("code0.8", "humaneval_gold")}
    command[2] = "report"
    out = subprocess.run(command, cwd=REPO, env=subprocess_environment(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "tiny" / "report" / "plots" / "bpb_vs_code.png").exists()


def test_the_report_compares_the_runs_against_the_varied_value(tmp_path):
    """Fixture results for the code-share sweep: two seeds per share, the table and the plots."""
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(
        f"name: s\nbase: {REPO / 'examples' / 'phases' / 'code_share_base.yaml'}\nseq_length: 256\n"
        "axes:\n  phases[0].blend.code: [0.0, 0.5, 1.0]\n  seed: [1, 2]\n"
    )
    sweep = load_sweep(str(sweep_file), str(tmp_path))
    for v in sweep.variants:
        share, seed = v.overrides["phases[0].blend.code"], v.overrides["seed"]
        run_dir = tmp_path / "s" / v.name
        run_dir.mkdir(parents=True)
        (run_dir / runner.DONE).write_text(json.dumps({"seconds": 60.0 + seed}))
        rows = []
        for it in (50, 100):
            for task, value in (
                ("valid/text", 2.0 + share - it / 1000),
                ("valid/code", 3.0 - share - it / 1000 + seed / 100),
            ):
                record = {"run": v.name, "phase": "pretraining", "iteration": it, "tokens": it * 2048}
                rows.append({**record, "task": task, "metric": "bpb", "value": value, "n": 32, "stderr": 0.05})
        (run_dir / "eval_results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, plots = report.write(sweep)
    text = open(path).read()
    assert "| code0.5_seed2 | 0.5 | 2 | 307,200 | 62 | 2.4000 ± 0.0500 | 2.4200 ± 0.0500 |" in text, text
    assert sorted(os.path.basename(p) for p in plots if "/plots/" in p) == ["bpb_vs_code.png", "bpb_vs_seed.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in plots)
    # Averaged over the two seeds at each share, the spread of the two as the error bar.
    finals = report.final_figures(report.sweep_records(sweep))
    code = [finals[f"code{s:g}_seed{k}"][("valid/code", "bpb")]["value"] for s in (0.0,) for k in (1, 2)]
    assert math.isclose(sum(code) / 2, 3.0 - 0.1 + 0.015)


def test_a_save_interval_among_the_train_flags_reaches_the_slurm_script(tmp_path):
    """It used to raise ValueError: the script looked for the interval among the flags it adds itself."""
    text = CRYSTAL.read_text().replace(
        "train: [--model, crystal-1b,", "train: [--save-interval, '500', --model, crystal-1b,"
    )
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(text)
    script = runner.slurm_script(load_sweep(str(sweep_file), str(tmp_path)))
    assert "SAVE_INTERVAL=1000" in script and "--save-interval 500" in script


def test_a_sweep_over_hdf5_sources_keeps_their_directories(tmp_path, monkeypatch):
    """A base phases file of HDF5 sources (Crystal's released data), relative directories: each derived
    file holds them, absolute, and loads (the Cerebras order and the new weights checked)."""
    from helpers.released_layout import write_samples

    from megatron_ext.data.phases_config import load_phases

    write_samples(tmp_path / "data" / "big" / "data-00000.h5", 100, 40)
    write_samples(tmp_path / "data" / "small" / "data-00000.h5", 200, 20)
    (tmp_path / "base.yaml").write_text(
        "sources:\n  big: {hdf5: [data/big]}\n  small: {hdf5: [data/small]}\nphases:\n"
        "  - {iters: 4, global_batch_size: 4, order: cerebras, blend: {big: 0.7, small: 0.3}, lr: {peak: 0.02}}\n"
    )
    (tmp_path / "sweep.yaml").write_text(
        "name: h5\nbase: base.yaml\nseq_length: 64\nglobal_batch_size: 4\ntokens: 1024\n"
        "axes:\n  phases[0].blend.small: [0.3, 0.6]\ntrain: [--model, crystal-test, --seq-length, '64']\n"
    )
    monkeypatch.chdir(tmp_path)
    sweep = load_sweep("sweep.yaml", str(tmp_path / "out"))
    paths = write_phases_files(sweep)
    for path, share in zip(paths, (0.3, 0.6)):
        derived = yaml.safe_load(open(path))
        assert derived["sources"]["big"] == {"hdf5": [str(tmp_path / "data" / "big")]}
        config = load_phases(path, 64, 4, 1, has_fim_tokens=False)
        assert config.phases[0].order == "cerebras" and config.phases[0].blend["small"] == pytest.approx(share)
