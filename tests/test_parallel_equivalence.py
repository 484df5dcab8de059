"""The same 5 training steps, from one saved checkpoint, at every parallel layout: equal loss and
grad norm at every step (relative 1e-5)."""

import math

import pytest
from helpers.distributed_run import TINY_RUN, layout_flags, read_metrics, train

pytestmark = pytest.mark.launch  # every test here starts processes


LAYOUTS = {
    "tp1_pp1_dp1": (1, dict()),
    "tp2": (2, dict(tp=2)),
    "tp2_sp": (2, dict(tp=2, sp=True)),
    "pp2": (2, dict(pp=2)),
    "dp2": (2, dict()),
    "pp2_vp2": (2, dict(pp=2, vp_layers=1)),
    "tp2_pp2_dp2_distopt": (8, dict(tp=2, pp=2, dist_opt=True)),
}
STEPS = 5


@pytest.fixture(scope="module")
def initial_checkpoint(tmp_path_factory):
    """The initialised weights (one step at lr 0), saved: the common starting point of every layout."""
    ckpt = tmp_path_factory.mktemp("initial")
    train(
        1,
        TINY_RUN + ["--train-iters", "1", "--lr-warmup-iters", "0", "--lr", "0", "--min-lr", "0", "--save", str(ckpt)],
    )
    return ckpt


@pytest.fixture(scope="module")
def baseline(initial_checkpoint, tmp_path_factory):
    return _run("tp1_pp1_dp1", initial_checkpoint, tmp_path_factory)


def _run(name, ckpt, tmp_path_factory):
    nproc, layout = LAYOUTS[name]
    metrics = tmp_path_factory.mktemp(name) / "metrics.jsonl"
    train(
        nproc,
        TINY_RUN
        + layout_flags(**layout)
        + ["--train-iters", str(STEPS), "--load", str(ckpt), "--finetune", "--metrics-jsonl", str(metrics)],
    )
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == list(range(1, STEPS + 1))
    return rows


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "tp1_pp1_dp1"])
def test_layout_matches_single_process(name, baseline, initial_checkpoint, tmp_path_factory):
    rows = _run(name, initial_checkpoint, tmp_path_factory)
    for ref, got in zip(baseline, rows):
        assert math.isclose(got["lm_loss"], ref["lm_loss"], rel_tol=1e-5), (name, ref, got)
        assert math.isclose(got["grad_norm"], ref["grad_norm"], rel_tol=1e-5), (name, ref, got)
    # The model learns: equal losses that did not move would prove nothing.
    assert rows[-1]["lm_loss"] < rows[0]["lm_loss"]
