"""In-job restarts under torchrun --max-restarts (torchrun's own elastic agent restarts the workers): a
killed rank and a stopped one heal by themselves and the job's losses equal an uninterrupted run's; a
failure that repeats before the next checkpoint stops the job after --max-restarts-from-one-checkpoint."""

import json
import re
import subprocess
import time

import psutil
import pytest
from helpers.distributed_run import REPO, TINY_RUN, read_metrics, torchrun_command, train

STEPS = 12
RUN = TINY_RUN + ["--train-iters", str(STEPS)]


def _torchrun(tmp_path, max_restarts: int, faults: dict, extra=()):
    ckpt = tmp_path / "ckpt"
    flags = RUN + ["--save", str(ckpt), "--load", str(ckpt), "--save-interval", "2", *extra]
    flags += ["--metrics-jsonl", str(tmp_path / "m.jsonl")]
    marker = {"CRYSTAL_TEST_JOB": str(tmp_path)}  # finds what the job's processes leave behind
    cmd, env = torchrun_command(
        2, flags, env_extra={**faults, **marker}, torchrun_args=("--max-restarts", str(max_restarts))
    )
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:  # a file, not a pipe: read on a timeout too
        try:
            code = subprocess.run(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=480).returncode
        except subprocess.TimeoutExpired:
            pytest.fail("torchrun did not finish in 480 s:\n" + log.read_text()[-6000:])
    # A killed rank's helpers (Megatron-Core's checkpoint results Manager) end with it: nothing outlives the job.
    deadline = time.time() + 10
    while (left := _processes_with(marker)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [" ".join(p.cmdline())[:200] for p in left]
    return code, log.read_text(), ckpt, {r["iteration"]: r for r in read_metrics(tmp_path / "m.jsonl")}


def _processes_with(marker: dict) -> list:
    ((name, value),) = marker.items()
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(name) == value:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.launch
@pytest.mark.timeout(600)
def test_a_killed_rank_then_a_stopped_rank_heal_without_a_resubmission(tmp_path):
    """Attempt 0: the last rank is SIGKILLed as it begins step 5 (the checkpoint of 4 is the resume point);
    attempt 1: it is SIGSTOPped at step 9 and rank 0 gives up on it after --distributed-timeout-minutes 1
    (resume point 8); attempt 2 finishes. Every step's loss, gradient norm and lr (the last record of each
    iteration) equal an uninterrupted run's."""
    code, out, ckpt, got = _torchrun(
        tmp_path, 2, {"CRYSTAL_TEST_KILL_AT": "5@0", "CRYSTAL_TEST_STOP_AT": "9@1"},
        extra=["--distributed-timeout-minutes", "1"],
    )  # fmt: skip
    assert code == 0, out[-4000:]
    first = re.search(r"restart 1 of at most 2 \(torchrun --max-restarts\): attempt 0 ended: (.*); resuming at "
                      r"iteration 4 \(restart 1 from it, of --max-restarts-from-one-checkpoint 2\)", out)  # fmt: skip
    assert first, out[-4000:]
    # Rank 0 reports the lost peer, or is stopped by torchrun before it can: rank 1 never has a word.
    assert "rank 1 left no line (killed by a signal" in first[1] or "ranks 0, 1 left no line" in first[1], first[1]
    second = re.search(r"restart 2 of at most 2 \(torchrun --max-restarts\): attempt 1 ended: (.*); resuming at "
                       r"iteration 8 \(restart 1 from it", out)  # fmt: skip
    assert second, out[-4000:]
    assert "rank 0 waited longer than --distributed-timeout-minutes 1" in second[1], second[1]
    assert sorted(got) == list(range(1, STEPS + 1))
    straight = tmp_path / "straight.jsonl"
    train(2, RUN + ["--metrics-jsonl", str(straight)])
    for record in read_metrics(straight):
        i = record["iteration"]
        assert (got[i]["lm_loss"], got[i]["grad_norm"], got[i]["lr"]) == (
            record["lm_loss"], record["grad_norm"], record["lr"]), i  # fmt: skip
    records = sorted(p.name for p in (ckpt / "restarts").glob("attempt_*.json"))
    assert records == ["attempt_0.json", "attempt_1.json", "attempt_2.json"]
    assert [json.loads((ckpt / "restarts" / r).read_text())["resumed_at"] for r in records] == [0, 4, 8]
    assert not (ckpt / "restarts" / "stopped").exists()


@pytest.mark.launch
@pytest.mark.timeout(600)
def test_a_failure_that_repeats_stops_the_job_after_the_bound(tmp_path):
    """The last rank is killed at step 7 in every attempt: attempt 0 saved 6, restart 1 resumes at 6 and
    fails again; restart 2 would be the second in a row from 6 (--max-restarts-from-one-checkpoint 1), so the
    job stops there, in one line, though torchrun had 5 restarts left to spend."""
    code, out, ckpt, got = _torchrun(
        tmp_path, 5, {"CRYSTAL_TEST_KILL_AT": "7"}, extra=["--max-restarts-from-one-checkpoint", "1"]
    )
    assert code == 0, out[-4000:]  # every rank exits 0: the one end torchrun does not restart
    errors = [line for line in out.splitlines() if "error: restart" in line]
    assert len(errors) == 1, out[-4000:]
    assert errors[0].startswith(
        "pretrain_crystal.py: error: restart 2: the last 1 restart resumed at iteration 6 too and failed before the "
        "next checkpoint (--max-restarts-from-one-checkpoint 1): the failure repeats; the job stops instead of "
        "restarting again (attempt 1 ended: "
    ), errors[0]
    assert re.search(r"ranks? (0, )?1 left no line", errors[0]), errors[0]  # rank 0 too, if torchrun stopped it first
    assert (ckpt / "restarts" / "stopped").read_text().strip() == errors[0].removeprefix("pretrain_crystal.py: error: ")
    assert sorted(p.name for p in (ckpt / "restarts").glob("attempt_*.json")) == [
        "attempt_0.json", "attempt_1.json", "attempt_2.json"]  # fmt: skip
    assert max(got) == 6 and (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"


def test_a_new_job_starts_its_record_afresh_and_the_bound_counts_restarts_in_a_row(tmp_path):
    """In one process group of one rank: attempt 0 clears an earlier job's record; a restart resumed further
    on resets the count; lines of ranks and silent ranks are both reported."""
    from helpers.process_group import run_in_process_group

    run_in_process_group(_record_ranks, str(tmp_path), world_size=1)


def _record_ranks(save):
    import os

    from megatron_ext.training.restarts import Attempt

    def attempt(n, bound=2):
        return Attempt.under_torchrun(
            save, bound, {"TORCHELASTIC_MAX_RESTARTS": "9", "TORCHELASTIC_RESTART_COUNT": str(n)}
        )

    os.makedirs(os.path.join(save, "restarts"))
    open(os.path.join(save, "restarts", "attempt_7.json"), "w").write('{"resumed_at": 3}')  # an older job's
    a0 = attempt(0)
    a0.begin()
    assert sorted(os.listdir(os.path.join(save, "restarts"))) == ["attempt_0.json"]
    assert a0.resumed(0) is None
    a0.ended("pretrain_crystal.py: error: rank 0 lost another rank in x; the job ends; resume from the last checkpoint")
    a1 = attempt(1)
    a1.begin()
    assert a1.how_the_last_ended() == "rank 0 lost another rank in x"
    assert a1.resumed(4) is None  # restart 1 from 4
    a2 = attempt(2)
    a2.begin()
    assert a2.how_the_last_ended() == "rank 0 left no line (killed by a signal or the out-of-memory killer, or " \
        "crashed: torchrun's log above names the exit code)"  # fmt: skip
    assert a2.resumed(4) is None  # restart 2 from 4: the bound is 2
    a3 = attempt(3)
    a3.begin()
    assert a3.resumed(4).startswith("restart 3: the last 2 restarts resumed at iteration 4 too")
    a4 = attempt(4, bound=1)  # had it resumed further on, the count starts again
    a4.begin()
    assert a4.resumed(6) is None
    assert attempt(5, bound=1).resumed(6) is not None
    assert Attempt.under_torchrun(save, 2, {"TORCHELASTIC_RESTART_COUNT": "0"}) is None  # torchrun won't restart
    assert Attempt.under_torchrun(None, 2, {"TORCHELASTIC_MAX_RESTARTS": "3"}) is None  # nowhere to keep it
