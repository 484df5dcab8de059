"""Megatron-LM's memory and communication flags change how a step is computed, never what: activation
recomputation (full uniform / block, selective) and the overlapped gradient reduction and parameter gather
give the losses of the same run without them, at (1,1,1), DP 2 and TP2 x PP2 x DP2, and across a resume."""

import pytest
from helpers.distributed_run import TINY_RUN, layout_flags, read_metrics, train

pytestmark = pytest.mark.launch  # every test here starts processes

STEPS = 4


def _losses(tmp_path, name, nproc, flags):
    metrics = tmp_path / f"{name}.jsonl"
    out = train(nproc, TINY_RUN + ["--train-iters", str(STEPS), "--metrics-jsonl", str(metrics), *flags])
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == list(range(1, STEPS + 1)), out.stdout[-2000:]
    return [(r["lm_loss"], r["grad_norm"]) for r in rows]


RECOMPUTE = {
    "full_uniform": ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"],
    "full_block": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
    "selective": ["--recompute-activations"],
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_recomputation_gives_bitwise_equal_losses_and_grad_norms(tmp_path):
    """Each recomputation against none, at (1,1,1) with SDPA attention and with Megatron's unfused one (the
    CPU layer covers the forward redone in backward), and full uniform at TP2 x PP2 x DP2."""
    for attention in ("auto", "unfused"):
        base = _losses(tmp_path, f"none_{attention}", 1, ["--attention-backend", attention])
        for name, flags in RECOMPUTE.items():
            assert _losses(tmp_path, f"{name}_{attention}", 1, flags + ["--attention-backend", attention]) == base, name
    layout = layout_flags(tp=2, pp=2, dist_opt=True)
    base = _losses(tmp_path, "none_222", 8, layout)
    assert _losses(tmp_path, "full_uniform_222", 8, layout + RECOMPUTE["full_uniform"]) == base


OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]
SMALL_BUCKETS = ["--ddp-bucket-size", "20000"]  # several buckets of crystal-test's gradients (one by default)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_overlapped_communication_gives_the_same_losses_and_resumes(tmp_path):
    """--overlap-grad-reduce and --overlap-param-gather against neither: bitwise equal losses and grad norms
    with the plain optimizer in several buckets and with the distributed optimizer at DP 2 and TP2 x PP2 x
    DP2; with the distributed optimizer in several buckets, within 1e-5 (its shards follow the buckets, so
    the grad norm is summed in another order). An overlapped run saved at step 2 (the parameter gather
    forced before the save) and resumed gives the straight overlapped run's steps 3-4 exactly."""
    plain = _losses(tmp_path, "plain", 2, [])
    assert _losses(tmp_path, "plain_overlap", 2, OVERLAP[:1] + SMALL_BUCKETS) == plain
    dp2 = layout_flags(dist_opt=True)
    base = _losses(tmp_path, "dp2", 2, dp2)
    assert _losses(tmp_path, "dp2_overlap", 2, dp2 + OVERLAP) == base
    layout = layout_flags(tp=2, pp=2, dist_opt=True)
    assert _losses(tmp_path, "overlap_222", 8, layout + OVERLAP) == _losses(tmp_path, "base_222", 8, layout)
    buckets = _losses(tmp_path, "dp2_overlap_buckets", 2, dp2 + OVERLAP + SMALL_BUCKETS)
    for (loss, norm), (ref_loss, ref_norm) in zip(buckets, base):
        assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5)
    ckpt, resumed = tmp_path / "ckpt", tmp_path / "resumed.jsonl"
    flags = TINY_RUN + dp2 + OVERLAP + SMALL_BUCKETS + ["--train-iters", str(STEPS)]
    train(2, flags + ["--exit-interval", "2", "--save", str(ckpt)])
    train(2, flags + ["--load", str(ckpt), "--metrics-jsonl", str(resumed)])
    rows = read_metrics(resumed)
    assert [r["iteration"] for r in rows] == [3, 4]
    assert [(r["lm_loss"], r["grad_norm"]) for r in rows] == buckets[2:]


def test_timers_say_where_a_step_goes_and_change_nothing(tmp_path):
    """--timing-log-level 2: after each log line, Megatron-Core's timers (fastest-slowest rank, ms per step):
    forward-backward within the step time, the gradient sync, the parameter gather and the optimizer apart,
    each micro-batch's compute and data wait; TensorBoard gets them with --log-timers-to-tensorboard; the
    losses are those of the run without timers. With --wandb-project (offline) the logging rank alone writes
    W&B, the same losses."""
    import re

    from helpers.wandb_records import scalar_series
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dp2 = layout_flags(dist_opt=True) + ["--log-interval", "2"]
    base = _losses(tmp_path, "untimed", 2, dp2)
    tb = tmp_path / "tb"
    timed = dp2 + ["--timing-log-level", "2", "--tensorboard-dir", str(tb), "--log-timers-to-tensorboard"]
    assert _losses(tmp_path, "timed", 2, timed) == base
    # The same run writes W&B offline from the logging rank only (one run directory): the losses logged.
    wandb = ["--wandb-project", "crystal-test", "--wandb-save-dir", str(tmp_path / "wb")]
    offline = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = train(2, TINY_RUN + ["--train-iters", "2", *timed[:-3], *wandb], env_extra=offline).stdout
    assert [v for _, v in scalar_series(str(tmp_path / "wb"))["lm loss"]] == pytest.approx([x for x, _ in base[:2]])
    # The start-up memory report (CPU, fp32; DP 2, distributed optimizer): every rank's parts.
    parts = r"weights [\d.]+ MiB \| gradients [\d.]+ MiB \| optimizer [\d.]+ MiB \| activations [\d.]+ MiB \("
    assert re.search(
        rf"^memory predicted per rank \(every rank\): {parts}.* in flight\) \| total [\d.]+ MiB$", out, re.M
    )
    step_ms = float(re.search(r"step time ([\d.]+) ms", out).group(1))
    line = next(x for x in out.splitlines() if x.startswith("time per step (ms, fastest-slowest rank) | "))
    times = {name: (float(a), float(b)) for name, a, b in re.findall(r"([\w-]+) ([\d.]+)-([\d.]+)", line)}
    for name in ("forward-backward", "all-grads-sync", "params-all-gather", "optimizer", "forward-compute",
                 "backward-compute", "batch-generator"):  # fmt: skip
        assert name in times and 0 <= times[name][0] <= times[name][1], (name, line)
    assert times["forward-backward"][1] <= step_ms * 1.05 and times["forward-compute"][1] < times["forward-backward"][1]
    events = EventAccumulator(str(tb)).Reload()
    assert {"time/forward-backward", "time/optimizer"} <= set(events.Tags()["scalars"])
    assert not [t for t in events.Tags()["scalars"] if t.startswith("time-min/")]
