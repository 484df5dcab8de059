"""The learning rate of a resumed run: the uninterrupted run's at every step (skipped updates included,
inside a phase and across a phase switch), and a schedule that differs from the checkpoint's is refused
unless the user says which one to keep."""

import pytest
from helpers.distributed_run import REPO, TINY_RUN, read_metrics, train

pytestmark = pytest.mark.launch  # every test here starts processes


SMALL = REPO / "tests" / "data" / "phases_small.yaml"  # phase 'text' steps 1-4, phase 'text+code' steps 5-10
TOKENIZER = REPO / "data" / "demo" / "crystal_demo.model"
PHASED = [
    "--model",
    "crystal-test",
    "--phases",
    str(SMALL),
    "--tokenizer-model",
    str(TOKENIZER),
    "--micro-batch-size",
    "4",
    "--global-batch-size",
    "8",
    "--num-workers",
    "0",
    "--log-interval",
    "1",
    "--seed",
    "7",
]
SKIPS = {"CRYSTAL_TEST_NAN_ITERS": "3,7"}  # one skipped update in each phase


def _run(tmp, name, flags, check=True):
    metrics = tmp / f"{name}.jsonl"
    done = train(1, flags + ["--metrics-jsonl", str(metrics)], env_extra=SKIPS, check=check)
    return ({r["iteration"]: r for r in read_metrics(metrics)} if metrics.exists() else {}), done


@pytest.mark.timeout(300)
def test_phased_resume_after_skipped_updates_keeps_the_lr(tmp_path):
    straight, _ = _run(tmp_path, "straight", PHASED + ["--data-cache-path", str(tmp_path / "cache")])
    assert straight[3]["grad_norm"] is None and straight[7]["grad_norm"] is None  # the skips happened
    ckpt = tmp_path / "ckpt"
    flags = PHASED + ["--data-cache-path", str(tmp_path / "cache"), "--save", str(ckpt), "--save-interval", "2"]
    _run(tmp_path, "first", flags + ["--exit-interval", "8"])
    for start in (2, 8):  # before the skip and the switch; inside phase 2 after its skip
        resumed, _ = _run(tmp_path, f"from{start}", flags + ["--load", str(ckpt), "--ckpt-step", str(start)])
        assert sorted(resumed) == list(range(start + 1, 11))
        for i, row in resumed.items():
            assert row["lr"] == straight[i]["lr"], (start, i, row, straight[i])
            assert (row["lm_loss"], row["grad_norm"]) == (straight[i]["lm_loss"], straight[i]["grad_norm"]), i


@pytest.mark.timeout(300)
def test_a_changed_schedule_is_refused_unless_chosen(tmp_path):
    """Extending a run (--train-iters 2 -> 4 moves the default --lr-decay-iters) used to train at lr 0."""
    ckpt = tmp_path / "ckpt"
    flags = TINY_RUN + ["--save", str(ckpt), "--save-interval", "100"]
    _run(tmp_path, "first", flags + ["--train-iters", "2"])
    longer = TINY_RUN + ["--train-iters", "4", "--load", str(ckpt)]
    _, refused = _run(tmp_path, "refused", longer, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0, refused.stderr  # the error alone: no upstream warnings
    assert refused.stderr.strip().splitlines()[-1] == (
        f"pretrain_crystal.py: error: --load {ckpt}: the lr schedule differs from the checkpoint's: --lr-decay-iters "
        "4 (checkpoint: 2). Pass --override-opt-param-scheduler to go on with the new one from its step 2, or "
        "--use-checkpoint-opt-param-scheduler to keep the saved one"
    )
    reference, _ = _run(tmp_path, "reference", TINY_RUN + ["--train-iters", "4"])
    new, _ = _run(tmp_path, "override", longer + ["--override-opt-param-scheduler"])
    assert [new[i]["lr"] for i in (3, 4)] == [reference[i]["lr"] for i in (3, 4)] and new[4]["lr"] > 5e-3
    kept, _ = _run(tmp_path, "kept", longer + ["--use-checkpoint-opt_param-scheduler"])  # Megatron-LM's spelling
    assert [kept[i]["lr"] for i in (3, 4)] == [5e-3, 5e-3]  # the saved decay ended at step 2: --min-lr


@pytest.mark.timeout(300)
def test_a_changed_phase_lr_is_refused_unless_chosen(tmp_path):
    ckpt = tmp_path / "ckpt"
    cache = ["--data-cache-path", str(tmp_path / "cache")]
    _run(tmp_path, "first", PHASED + cache + ["--save", str(ckpt), "--exit-interval", "6"])
    edited = tmp_path / "edited.yaml"
    edited.write_text(SMALL.read_text().replace("peak: 2.0e-2", "peak: 3.0e-2"))
    resume = PHASED[:3] + [str(edited)] + PHASED[4:] + cache + ["--load", str(ckpt), "--train-iters", "7"]
    _, refused = _run(tmp_path, "refused", resume, check=False)
    assert refused.returncode == 2
    assert f"{edited}: phases[1].lr.peak 0.03 (checkpoint: 0.02)" in refused.stderr.strip().splitlines()[-1]
    straight, _ = _run(tmp_path, "straight", PHASED + cache + ["--train-iters", "7"])
    new, _ = _run(tmp_path, "override", resume + ["--override-opt-param-scheduler"])
    floor = 2.0e-3  # the phase's min: the same decay between a peak of 0.03 instead of 0.02 and it
    assert new[7]["lr"] == pytest.approx(
        floor + (straight[7]["lr"] - floor) * (0.03 - floor) / (0.02 - floor), rel=1e-12
    )
    assert new[7]["lm_loss"] == straight[7]["lm_loss"]  # the same data: an lr edit keeps the stream
