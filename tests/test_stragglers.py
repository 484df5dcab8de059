"""Stragglers named (--log-straggler, training/stragglers.py): a rank slowed by a test hook (it sleeps in each
step's forward and backward) is named with its host within two log intervals, and its spread reaches the
metrics and TensorBoard; a balanced run names nobody; the rule's arithmetic on known numbers."""

import json
import socket

import pytest
from helpers.distributed_run import TINY_RUN, train

from megatron_ext.training.stragglers import spread

RUN = TINY_RUN + ["--train-iters", "10", "--log-interval", "5", "--log-straggler"]


def test_the_slowest_ranks_over_the_threshold_are_named_against_the_others_median():
    metrics, named = spread([0.1, 0.12, 0.5, 0.1], count=1, threshold=1.5)
    assert named == [(2, pytest.approx(5.0))]  # 0.5 against the median of 0.1, 0.12, 0.1
    assert metrics == {
        "straggler/fastest-s": 0.1,
        "straggler/median-s": pytest.approx(0.11),
        "straggler/slowest-s": 0.5,
        "straggler/slowest-rank": 2.0,
        "straggler/slowest-over-median": pytest.approx(5.0),
    }
    _, named = spread([0.4, 0.1, 0.5, 0.1, 0.1], count=2, threshold=1.5)
    assert [r for r, _ in named] == [2, 0]  # slowest first, up to count
    assert spread([0.1, 0.13, 0.11, 0.1], count=4, threshold=1.5)[1] == []  # within 1.5x: nobody
    assert spread([0.2, 0.1], count=1, threshold=1.5)[1] == [(0, pytest.approx(2.0))]  # two ranks: the other one


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_a_slowed_rank_is_named_with_its_host_and_a_balanced_run_names_none(tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = train(
        2,
        RUN + ["--metrics-jsonl", str(metrics), "--tensorboard-dir", str(tmp_path / "tb")],
        env_extra={"CRYSTAL_TEST_SLOW_RANK": "1:0.3"},
    )
    named = [line for line in proc.stdout.splitlines() if line.startswith("straggler: ")]
    host = socket.gethostname()
    assert len(named) == 2, proc.stdout[-3000:]  # each of the two log intervals, once for the job
    for line, window in zip(named, ("steps 1-5", "steps 6-10")):
        assert line.startswith(f"straggler: rank 1 (host {host}) took ") and line.endswith(f"over {window}")
    records = {r["iteration"]: r for r in map(json.loads, metrics.read_text().splitlines())}
    for it in (5, 10):
        spread_at = records[it]["straggler"]
        assert spread_at["slowest-rank"] == 1.0
        assert spread_at["slowest-s"] >= 0.3  # its sleep is part of its own work
        assert spread_at["slowest-over-median"] > 1.5
        assert spread_at["fastest-s"] < spread_at["slowest-s"] - 0.25
    assert "straggler" not in records[4]  # gathered at log steps only
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [e.step for e in events.Scalars("straggler/slowest-over-median")] == [5, 10]

    balanced = train(2, RUN)
    assert not [line for line in balanced.stdout.splitlines() if line.startswith("straggler: ")]
    assert "--log-straggler: each rank's own work a step" in balanced.stdout
