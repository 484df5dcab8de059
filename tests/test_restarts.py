"""In-job restarts under torchrun --max-restarts (torchrun's own elastic agent restarts the workers): the
unattended battery (a killed rank, a stopped one, a changed shard, a full disk) heals by itself and the
job's losses equal an uninterrupted run's; a failure that repeats before the next checkpoint stops the job
after --max-restarts-from-one-checkpoint."""

import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest
from helpers.distributed_run import REPO, TINY_RUN, read_metrics, torchrun_command

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
def test_the_unattended_battery_finishes_by_itself_with_the_uninterrupted_losses(tmp_path):
    """benchmarks/unattended.py (seed 0): one 60-step job under torchrun --max-restarts 4, saving every 5
    steps: a rank SIGKILLed at step 17, a rank SIGSTOPped at step 32 under --distributed-timeout-minutes 1, the
    latest checkpoint's (30) largest shard changed by a byte before the restart reads it, the disk full in
    the save of 55. The job ends with exit 0 by itself; every step's loss, gradient norm and lr equal an
    uninterrupted run's; each fault redoes at most a save interval of steps, and each restart says why the
    last attempt ended and where it resumes."""
    report = tmp_path / "report.json"
    marker = {"CRYSTAL_TEST_JOB": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "unattended.py"), "--seed", "0", "--json", str(report)],
        env=dict(os.environ, **marker), cwd=REPO, capture_output=True, text=True, timeout=580,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(report.read_text())
    assert got["finished_by_itself"] and got["losses_equal_uninterrupted"]
    assert got["resumed_at"] == [0, 15, 25, 50]  # 30 was changed: its predecessor 25 is the resume point
    faults = {f["fault"]: f for f in got["faults"]}
    assert [f["at"] for f in got["faults"]] == [17, 32, 30, 55]
    assert all(0 <= f["steps_redone"] <= 5 for f in got["faults"]), got["faults"]
    assert faults["latest shard changed by a byte"]["steps_redone"] == 5
    assert faults["rank SIGSTOPped (timeout 1 min)"]["wall_lost_s"] >= 60  # the timeout itself
    lines = "\n".join(got["lines"])
    restarts = [line for line in got["lines"] if line.startswith("restart ")]
    assert [re.match(r"restart (\d) of at most 4 \(torchrun --max-restarts\): attempt (\d) ended: ", r).groups()
            for r in restarts] == [("1", "0"), ("2", "1"), ("3", "2")], restarts  # fmt: skip
    # Rank 0 reports the lost peer, or is stopped by torchrun before it can: rank 1 never has a word.
    assert re.search(r"ranks? (0, )?1 left no line \(killed by a signal", restarts[0]), restarts[0]
    assert restarts[0].endswith("resuming at iteration 15 (restart 1 from it, of --max-restarts-from-one-checkpoint 2)")
    assert "rank 0 waited longer than --distributed-timeout-minutes 1" in restarts[1]
    assert re.search(r"warning: skipping a damaged checkpoint: \S+/iter_0000030/__\d_\d\.distcp has changed since it "
                     r"was written", lines), lines  # fmt: skip
    assert re.search(r"attempt 2 ended: ranks 0, 1: --save \S+: the save of iteration 55 failed \(\[Errno 28\] No "
                     r"space left on device", restarts[2]), restarts[2]  # fmt: skip
    assert not _processes_with(marker)


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
    a0.ended(
        "pretrain_crystal.py: error: rank 0 lost another rank in x; the job ends; resume from the last checkpoint", 4
    )
    a1 = attempt(1)
    a1.begin()
    assert a1.how_the_last_ended() == "rank 0 lost another rank in x (exit 4)"
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
    # One line for many ranks: alike but for their figures (each rank's free bytes), or each naming itself.
    record = os.path.join(save, "restarts")
    with open(os.path.join(record, "attempt_5.json"), "w") as f:
        f.write('{"world_size": 5, "resumed_at": 6}')
    texts = ["--save d: failed (1,000 bytes free) (exit 2)", "--save d: failed (1,004 bytes free) (exit 2)",
             "rank 2 lost another rank in x (exit 4)", "rank 3 lost another rank in x (exit 4)"]  # fmt: skip
    for r, text in enumerate(texts):
        with open(os.path.join(record, f"attempt_5.rank_{r}.txt"), "w") as f:
            f.write(text)
    assert attempt(6).how_the_last_ended() == (
        "ranks 0, 1: --save d: failed (1,000 bytes free) (exit 2) (rank 0's figures); ranks 2, 3 lost another rank "
        "in x (exit 4); rank 4 left no line (killed by a signal or the out-of-memory killer, or crashed: torchrun's "
        "log above names the exit code)"
    )
    assert Attempt.under_torchrun(save, 2, {"TORCHELASTIC_RESTART_COUNT": "0"}) is None  # torchrun won't restart
    assert Attempt.under_torchrun(None, 2, {"TORCHELASTIC_MAX_RESTARTS": "3"}) is None  # nowhere to keep it
