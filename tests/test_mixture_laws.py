"""Mixture laws: a swarm's mixtures follow its prior (moments, bounds, epoch caps, the seed); the fit recovers a
known response (held-out Spearman) and the search its known optimum; RegMix's CSV layout reads; a swarm
sweep's runs are fitted into a phases file; bad sweep files and CSVs give one line each."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from helpers.distributed_run import REPO

from megatron_ext.sweeps import mixture_fit
from megatron_ext.sweeps import swarm as swarms
from megatron_ext.sweeps.mixture_fit import Runs

BASE = {
    "sources": {"text": {"prefixes": ["t"]}, "code": {"prefixes": ["c"]}, "math": {"prefixes": ["m"]}},
    "phases": [{"iters": 10, "blend": {"text": 1.0}}, {"iters": 30, "blend": {"text": 0.5, "code": 0.3, "math": 0.2}}],
}


def _swarm(**overrides):
    raw = {"phases": [1], "sources": ["text", "code"], "concentration": 8, "runs": 4000, "seed": 3, **overrides}
    return swarms.parse(raw, BASE, "s.yaml: swarm")


def test_the_draws_follow_the_dirichlet_prior_and_the_seed():
    """Around phase 1's text 0.5 / code 0.3 (normalised over the varied sources: 0.625 / 0.375), alpha =
    8 x those: the means and variances of 4000 draws lie within sampling error of the Dirichlet's."""
    sw = _swarm()
    drawn = swarms.draw(sw, BASE)
    code = np.array([m["phases[1].code"] for m in drawn])
    alpha = 8 * np.array([0.625, 0.375])
    mean, var = alpha[1] / alpha.sum(), alpha[1] * alpha[0] / (alpha.sum() ** 2 * (alpha.sum() + 1))
    assert abs(code.mean() - mean) < 4 * np.sqrt(var / len(code))
    assert abs(code.var() - var) / var < 0.1
    assert all(abs(m["phases[1].text"] + m["phases[1].code"] - 1) < 1e-12 for m in drawn)
    assert swarms.draw(sw, BASE)[:5] == drawn[:5]  # the file's seed: the same mixtures
    assert swarms.draw(_swarm(seed=4), BASE)[:5] != drawn[:5]
    # The whole blend: math keeps its 0.2; text and code share the 0.8 they had together.
    blend = swarms.blend_of(sw, BASE, 1, drawn[0])
    assert blend["math"] == 0.2 and abs(blend["text"] + blend["code"] - 0.8) < 1e-5
    assert abs(blend["code"] - 0.8 * drawn[0]["phases[1].code"]) < 1e-5


def test_bounds_and_epoch_caps_are_honoured():
    sw = _swarm(bounds={"code": [0.2, 0.35]}, max_epochs={"code": 1.2}, runs=300)
    # Phase 1 reads 30 x 8 x 256 tokens, code at 0.8 x its weight w of them: 4 w epochs of this source.
    tokens = {"code": 30 * 8 * 256 * 0.2}

    def epochs_of(mixture):
        phases = {
            "phases": [dict(BASE["phases"][0]), {**BASE["phases"][1], "blend": swarms.blend_of(sw, BASE, 1, mixture)}]
        }
        return swarms.epochs(phases, tokens, 256, 8)

    drawn = swarms.draw(sw, BASE, epochs_of)
    code = np.array([m["phases[1].code"] for m in drawn])
    assert code.min() >= 0.2 and code.max() <= 0.35
    epochs = np.array([epochs_of(m)["code"] for m in drawn])
    assert epochs.max() <= 1.2 and code.max() <= 0.3 + 1e-5 and np.allclose(epochs, 4 * code, atol=1e-4)
    # Without the cap, part of the bounded region reads code more than 1.2 times.
    free = swarms.draw(_swarm(bounds={"code": [0.2, 0.35]}, runs=300), BASE)
    assert max(epochs_of(m)["code"] for m in free) > 1.2


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"colour": 1}, "s.yaml: swarm: unknown key 'colour'"),
        ({"sources": ["text", "prose"]}, "s.yaml: swarm.sources: 'prose' is not a source of the base file"),
        ({"phases": [2]}, "s.yaml: swarm.phases: phase indices of the base file (it has 2 phases)"),
        ({"bounds": {"code": [0.5, 0.4]}}, "s.yaml: swarm.bounds.code: [low, high] with 0 <= low < high <= 1"),
        ({"runs": 1}, "s.yaml: swarm.runs: an integer >= 2"),
        ({"phases": [0], "sources": ["code", "math"]}, "s.yaml: swarm: phases[0] gives the varied sources no weight"),
    ],
)
def test_a_bad_swarm_section_is_one_line(overrides, message):
    with pytest.raises(swarms.SwarmError) as e:
        _swarm(**overrides)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_bounds_that_leave_no_mixture_say_so():
    with pytest.raises(swarms.SwarmError, match=r"0 of 100,000 draws fell within the bounds"):
        swarms.draw(_swarm(bounds={"code": [0.9999, 1.0]}, concentration=200), BASE)


def _synthetic(n, seed, response):
    x = np.random.default_rng(seed).dirichlet([2, 2, 2], size=n)
    return x, response(x)


def _log_linear(x):
    return np.exp(0.5 + 1.2 * x[:, 0] - 0.8 * x[:, 1] + 0.3 * x[:, 2])


def _bowl(x):  # its minimum inside the simplex, at (0.3, 0.5, 0.2)
    return 1 + (x[:, 0] - 0.3) ** 2 + (x[:, 1] - 0.5) ** 2 + (x[:, 2] - 0.2) ** 2


@pytest.mark.parametrize(
    "model,response,runs,bounds,optimum",
    [
        # log y linear in the weights: the minimum at the bounded vertex b = 0.7 with c taking the rest
        ("log-linear", _log_linear, 24, {1: (0.0, 0.7)}, [0.0, 0.7, 0.3]),
        ("gbt", _bowl, 512, {}, [0.3, 0.5, 0.2]),  # RegMix's regime: trees on hundreds of runs
    ],
)
def test_the_fit_recovers_a_known_response_and_the_search_its_optimum(model, response, runs, bounds, optimum):
    x, y = _synthetic(runs, 1, response)
    y = y * (1 + np.random.default_rng(2).normal(0, 0.002, runs))  # a little noise, as seeds give
    data = Runs(["a", "b", "c"], [[0, 1, 2]], x, {"m": y})
    fitted = mixture_fit.fit(data, "m", model)
    xt, yt = _synthetic(300, 9, response)
    spearman, mae = mixture_fit.held_out(fitted, xt, yt)
    assert fitted.spearman >= 0.95 and spearman >= 0.95, (fitted.spearman, spearman)
    pool = mixture_fit.candidates(data, [np.ones(3)], bounds, 100_000, 0)
    best = mixture_fit.search({"m": fitted}, {"m": 1.0}, pool, 100)
    assert np.abs(best.weights - optimum).max() < 0.06, best.weights  # the stated tolerance
    assert best.predicted["m"][0] == pytest.approx(float(response(best.weights[None, :])[0]), rel=0.02)


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _fit_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "tools" / "sweep.py"), "fit", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)  # fmt: skip


@pytest.mark.slow
def test_regmix_csv_files_are_fitted_with_a_held_out_spearman(tmp_path):
    """RegMix's layout: index + one column per domain (weights in any scale: normalised), index + metrics."""
    for name, n, seed in (("train", 48, 1), ("test", 32, 2)):
        x, y = _synthetic(n, seed, _log_linear)
        _write_csv(tmp_path / f"{name}_mix.csv", ["index", "web", "code", "books"],
                   [[f"r{i}", *(10 * w)] for i, w in enumerate(x)])  # fmt: skip
        _write_csv(tmp_path / f"{name}_met.csv", ["index", "val_loss"], [[f"r{i}", v] for i, v in enumerate(y)])
    proc = _fit_cli("--mixtures", tmp_path / "train_mix.csv", "--metrics", tmp_path / "train_met.csv",
                    "--test-mixtures", tmp_path / "test_mix.csv", "--test-metrics", tmp_path / "test_met.csv",
                    "--objective", "val_loss", "--output-dir", tmp_path / "fit")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "fit" / "fit.json").read_text())
    rows = {(r["metric"], r["model"]): r for r in result["table"]}
    assert rows[("val_loss", "log-linear")]["test_spearman"] > 0.99
    assert rows[("val_loss", "gbt")]["runs"] == 48
    assert result["optimum"]["code"] > 0.9  # log y falls fastest with code here
    assert "| val_loss | log-linear | 48 |" in (tmp_path / "fit" / "fit.md").read_text()
    assert (tmp_path / "fit" / "plots" / "val_loss.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "mix_rows,met_rows,message",
    [
        ([["id", "web"], ["0", "1"]], [["index", "m"], ["0", "1"]], "mix.csv: no 'index' column"),
        ([["index", "web"], ["0", "x"]], [["index", "m"], ["0", "1"]], "mix.csv:2: a value that is not a number"),
        ([["index", "web"], ["0", "1"]], [["index", "m"], ["9", "1"]], "met.csv: no index in common with"),
    ],
)
def test_a_bad_csv_is_one_line(tmp_path, mix_rows, met_rows, message):
    _write_csv(tmp_path / "mix.csv", *[mix_rows[0], mix_rows[1:]])
    _write_csv(tmp_path / "met.csv", *[met_rows[0], met_rows[1:]])
    with pytest.raises(mixture_fit.FitError) as e:
        mixture_fit.read_regmix_csv(str(tmp_path / "mix.csv"), str(tmp_path / "met.csv"))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_swarm_sweep_is_planned_fitted_and_its_optimum_is_a_phases_file(tmp_path):
    """A swarm over the demo's second phase (text vs code), its runs' results written as the evaluation
    writes them (a known bits-per-byte response to the code share), then `tools/sweep.py fit`: the optimum
    phases file loads and its blend is the fitted optimum, near the response's minimum."""
    from megatron_ext.evaluation.records import append_records
    from megatron_ext.sweeps.plan import load_sweep

    sweep_file = tmp_path / "swarm.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": "swarm", "base": str(REPO / "examples" / "phases" / "demo.yaml"), "seq_length": 256,
        "train": ["--tokenizer-model", str(REPO / "data" / "demo" / "crystal_demo.model")],
        "swarm": {"phases": [1], "sources": ["text", "code"], "concentration": 2, "runs": 16, "seed": 5,
                  "bounds": {"code": [0.02, 0.98]}},
    }))  # fmt: skip
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "sweep.py"), "plan", str(sweep_file), "--output",
                           str(tmp_path / "runs")], capture_output=True, text=True, cwd=REPO, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "16 runs of" in proc.stdout and "mix015" in proc.stdout and "phases[1].code=" in proc.stdout
    sweep = load_sweep(str(sweep_file), str(tmp_path / "runs"))
    for v in sweep.variants:
        written = yaml.safe_load(open(sweep.phases_file(v)))
        assert written["phases"][1]["blend"]["code"] == pytest.approx(v.mixture["phases[1].code"], abs=1e-5)
        c = v.mixture["phases[1].code"]
        figures = [("heldout/code", 1.3 * np.exp(-c)), ("heldout/text", np.exp(0.5 * c))]
        append_records(
            str(tmp_path / "runs" / "swarm" / v.name / "eval_results.jsonl"),
            [{"run": v.name, "phase": "text+code", "iteration": 300, "tokens": 0, "checkpoint": None, "task": t,
              "metric": "bpb", "value": float(y), "n": 10, "stderr": 0.0} for t, y in figures],
        )  # fmt: skip
    proc = _fit_cli(sweep_file, "--output", tmp_path / "runs", "--model", "log-linear", "--samples", "20000")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "runs" / "swarm" / "fit" / "fit.json").read_text())
    assert result["objective"] == {"heldout/code bpb": 1.0, "heldout/text bpb": 1.0}  # every bpb, by default
    # Each bpb log-linear in the code share c; their sum 1.3 exp(-c) + exp(c / 2) is least at c = ln(2.6) / 1.5.
    assert abs(result["optimum"]["phases[1].code"] - np.log(2.6) / 1.5) < 0.05, result["optimum"]
    assert result["base"] == {"phases[1].text": 0.6, "phases[1].code": 0.4}
    from megatron_ext.data.phases_config import load_phases

    optimum = load_phases(result["phases_file"], 256, 8, 1234, True)
    blend = optimum.phases[1].blend
    assert blend["code"] == pytest.approx(result["optimum"]["phases[1].code"], abs=1e-4)
    md = (tmp_path / "runs" / "swarm" / "fit" / "fit.md").read_text()
    assert "| optimum |" in md and "| base | 0.600 | 0.400 |" in md
    # A constraint: text no worse than at the base (text rises with code): the optimum stays at or below 0.4.
    proc = _fit_cli(sweep_file, "--output", tmp_path / "runs", "--samples", "20000", "--objective", "heldout/code bpb",
                    "--no-worse-than-base", "heldout/text bpb", "--output-dir", tmp_path / "held")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    held = json.loads((tmp_path / "held" / "fit.json").read_text())
    limit = held["no_worse_than_base"]["heldout/text bpb"]
    assert limit == pytest.approx(np.exp(0.5 * 0.4), rel=1e-6)  # the fit's prediction at the base, exact here
    assert held["predicted"]["heldout/text bpb"]["value"] <= limit + 1e-9
    assert 0.3 < held["optimum"]["phases[1].code"] <= 0.4 + 1e-6, held["optimum"]
    # The response curve of each metric, and of the objective (their sum) with the runs' measured sums.
    assert [p.rsplit("/", 1)[1] for p in result["plots"]] == ["heldout_code_bpb.png", "heldout_text_bpb.png",
                                                             "objective.png"]  # fmt: skip


TINY_SWARM = """name: tiny_swarm
base: {base}
seq_length: 32
global_batch_size: 8
tokens: 1024                      # 4 steps of 8 x 32
swarm: {{phases: [1], sources: [text, code], concentration: 2, bounds: {{code: [0.1, 0.9]}}, runs: 4, seed: 1}}
train: [--model, crystal-test, --tokenizer-model, {tokenizer}, --micro-batch-size, "4", --num-workers, "0"]
nproc: 1
eval_interval: 4
"""


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_swarm_runs_is_fitted_and_its_optimum_verified_through_the_command_line(tmp_path):
    """run -> fit -> verify on 4 tiny mixtures: every step through tools/sweep.py, the optimum and the base
    trained with the swarm's budget, and the verification's table of predicted against measured."""
    from helpers.distributed_run import subprocess_environment

    sweep_file = tmp_path / "tiny.yaml"
    sweep_file.write_text(TINY_SWARM.format(base=REPO / "tests" / "data" / "phases_small.yaml",
                                            tokenizer=REPO / "data" / "demo" / "crystal_demo.model"))  # fmt: skip

    def sweep(*args):
        command = [sys.executable, "tools/sweep.py", *args, str(sweep_file), "--output", str(tmp_path)]
        proc = subprocess.run(command, cwd=REPO, env=subprocess_environment(), capture_output=True, text=True,
                              timeout=400)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc.stdout

    assert "4 run(s) trained now" in sweep("run")
    fitted = sweep("fit", "--objective", "valid/code bpb", "--samples", "5000")
    assert (
        "metric valid/code bpb  model log-linear  runs 4" in fitted and "optimum (log-linear): phases[1].text" in fitted
    )
    result = json.loads((tmp_path / "tiny_swarm" / "fit" / "fit.json").read_text())
    assert 0.1 <= result["optimum"]["phases[1].code"] <= 0.9  # within the swarm's bounds
    verified = sweep("verify")
    assert "predicted against measured in" in verified
    out = json.loads((tmp_path / "tiny_swarm" / "verify" / "verify.json").read_text())
    measured = out["measured"]["optimum"]["valid/code bpb"]
    assert measured is not None and out["measured"]["base"]["valid/code bpb"] is not None
    assert out["run"].startswith("optimum_log-linear_")  # a later fit's optimum would be a run of its own
    optimum_blend = yaml.safe_load(open(tmp_path / "tiny_swarm" / "verify" / out["run"] / "phases.yaml"))["phases"][1]
    assert optimum_blend["blend"]["code"] == pytest.approx(result["optimum"]["phases[1].code"], abs=1e-5)
    table = (tmp_path / "tiny_swarm" / "verify" / "verify.md").read_text()
    assert f"| valid/code bpb | {result['predicted']['valid/code bpb']['value']:.4f} ± " in table
    assert f"| {measured:.4g} |" in table
