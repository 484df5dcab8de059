"""Resuming: 10 steps straight == 5 steps, save, resume for 5 (same layout: bitwise; other layout: 1e-5)."""

import math

import pytest

from distributed_run import TINY_RUN, layout_flags, read_metrics, train

STEPS = 10


def _train(nproc, layout, tmp, name, extra):
    metrics = tmp / f"{name}.jsonl"
    train(nproc, TINY_RUN + layout_flags(**layout) + ["--train-iters", str(STEPS), "--metrics-jsonl", str(metrics), *extra])
    return read_metrics(metrics)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return _train(2, dict(tp=2, dist_opt=True), tmp_path_factory.mktemp("straight"), "straight", [])


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """5 steps, saved, stopped: every variant resumes from (a read of) this one checkpoint."""
    tmp = tmp_path_factory.mktemp("first")
    ckpt = tmp / "ckpt"
    metrics = _train(2, dict(tp=2, dist_opt=True), tmp, "first", ["--save", str(ckpt), "--exit-interval", "5"])
    assert [r["iteration"] for r in metrics] == [1, 2, 3, 4, 5]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "5"
    return metrics, ckpt


@pytest.mark.timeout(400)
@pytest.mark.parametrize("resume_nproc,resume_layout,exact", [
    (2, dict(tp=2, dist_opt=True), True),
    (2, dict(pp=2, dist_opt=True), False),
    (1, dict(dist_opt=True), False),
], ids=["same_layout", "tp2_to_pp2", "tp2_to_single"])
def test_resume_continues_identically(straight, first, resume_nproc, resume_layout, exact, tmp_path):
    first, ckpt = first
    second = _train(resume_nproc, resume_layout, tmp_path, "second", ["--load", str(ckpt)])
    assert [r["iteration"] for r in second] == list(range(6, STEPS + 1))
    for ref, got in zip(straight, first + second):
        assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12), (ref, got)
        if exact:
            assert (got["lm_loss"], got["grad_norm"]) == (ref["lm_loss"], ref["grad_norm"]), (ref, got)
        else:
            assert math.isclose(got["lm_loss"], ref["lm_loss"], rel_tol=1e-5), (ref, got)
            assert math.isclose(got["grad_norm"], ref["grad_norm"], rel_tol=1e-5), (ref, got)


def test_resume_with_other_optimizer_kind_is_refused(first):
    with pytest.raises(AssertionError, match="was saved with --use-distributed-optimizer; resume the same way"):
        train(1, TINY_RUN + ["--train-iters", "8", "--load", str(first[1])])
