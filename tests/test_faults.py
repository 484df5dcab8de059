"""Faults: a stop signal saves and exits 0, damaged or half-written checkpoints are passed over, old ones
pruned, non-finite updates and loss spikes skipped (and the run stopped after too many in a row)."""

import re
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers.distributed_run import (
    REPO,
    TINY_RUN,
    free_port,
    read_metrics,
    subprocess_environment,
    torchrun_command,
    train,
)

pytestmark = pytest.mark.launch  # every test here starts processes


STEPS = 12
RUN = TINY_RUN + ["--train-iters", str(STEPS), "--use-distributed-optimizer"]


def _metrics(path):
    return {r["iteration"]: r for r in read_metrics(path)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    train(2, RUN + ["--metrics-jsonl", str(tmp / "m.jsonl")])
    return _metrics(tmp / "m.jsonl")


def _same(got: dict, ref: dict, steps):
    for i in steps:
        assert (got[i]["lm_loss"], got[i]["grad_norm"], got[i]["lr"]) == (
            ref[i]["lm_loss"],
            ref[i]["grad_norm"],
            ref[i]["lr"],
        ), i


@pytest.mark.timeout(300)
def test_sigusr1_saves_exits_zero_and_resumes_identically(straight, tmp_path):
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "first.jsonl"
    cmd, env = torchrun_command(2, RUN + ["--save", str(ckpt), "--metrics-jsonl", str(metrics)])
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, "training did not get going"
        time.sleep(0.1)
    workers = [
        c for c in psutil.Process(proc.pid).children(recursive=True) if "pretrain_crystal.py" in " ".join(c.cmdline())
    ]
    workers[-1].send_signal(signal.SIGUSR1)  # one rank only: every rank must still stop together
    out, _ = proc.communicate(timeout=200)
    assert proc.returncode == 0, out[-3000:]
    assert "stop requested (SIGUSR1)" in out or "stop requested (by another rank)" in out
    stopped = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert (ckpt / "stopped_by_signal").read_text() == str(stopped)  # for the SLURM launch's requeue
    assert 3 <= stopped < STEPS and sorted(_metrics(metrics)) == list(range(1, stopped + 1))
    train(2, RUN + ["--load", str(ckpt), "--metrics-jsonl", str(tmp_path / "second.jsonl")])
    resumed = _metrics(tmp_path / "second.jsonl")
    assert sorted(resumed) == list(range(stopped + 1, STEPS + 1))
    _same({**_metrics(metrics), **resumed}, straight, range(1, STEPS + 1))


@pytest.mark.timeout(300)
def test_damaged_and_half_written_checkpoints_are_not_resumed_from(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    train(
        2, RUN + ["--save", str(ckpt), "--save-interval", "2", "--exit-interval", "6", "--keep-last-checkpoints", "2"]
    )
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000006"]  # 2 was pruned
    # Damage the latest after it was written, and leave a newer half-written one (as a kill -9 mid-save
    # does: files of iteration 8, no tracker update).
    next(iter(sorted((ckpt / "iter_0000006").glob("*.distcp")))).unlink()
    half = ckpt / "iter_0000008"
    shutil.copytree(ckpt / "iter_0000004", half)
    (half / ".metadata").unlink()
    proc = train(2, RUN + ["--load", str(ckpt), "--metrics-jsonl", str(tmp_path / "m.jsonl")])
    assert "skipping a damaged checkpoint" in proc.stdout and "iter_0000006" in proc.stdout
    resumed = _metrics(tmp_path / "m.jsonl")
    assert sorted(resumed) == list(range(5, STEPS + 1))  # from iteration 4, the newest complete one
    _same(resumed, straight, range(5, STEPS + 1))


@pytest.mark.timeout(300)
def test_non_finite_updates_are_skipped_then_the_run_stops(straight, tmp_path):
    metrics = tmp_path / "m.jsonl"
    proc = train(
        2,
        RUN + ["--metrics-jsonl", str(metrics), "--max-skipped-steps", "3"],
        check=False,
        env_extra={"CRYSTAL_TEST_NAN_ITERS": "3,6,7,8"},
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "iteration 3: non-finite gradients" in out and "update skipped (1 in a row, 1 in all)" in out
    assert "3 consecutive steps were skipped (last: non-finite gradients; --max-skipped-steps 3); stopping" in out
    got = _metrics(metrics)
    assert sorted(got) == list(range(1, 9))
    assert [i for i in got if got[i]["grad_norm"] is None] == [3, 6, 7, 8]  # skipped, logged
    _same(got, straight, [1, 2])
    assert got[3]["lm_loss"] == straight[3]["lm_loss"]  # step 3's loss was computed; its update not applied
    # Skipping step 3's update leaves the weights (and the lr schedule) as after step 2: the run goes on
    # finite, and its lr lags the uninterrupted run's by one step.
    assert all(got[i]["lm_loss"] == got[i]["lm_loss"] for i in got)
    assert got[4]["lr"] == straight[3]["lr"] and got[5]["lr"] == straight[4]["lr"]


@pytest.mark.timeout(300)
def test_a_rank_killed_during_a_save_leaves_the_previous_resume_point(straight, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = train(
        2,
        RUN + ["--save", str(ckpt), "--save-interval", "4"],
        check=False,
        env_extra={"CRYSTAL_TEST_KILL_IN_SAVE": "8"},
    )
    assert proc.returncode != 0
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    # Begun, never finished: removed by a rank that saw the save fail, or left incomplete if none lived to.
    partial = ckpt / "iter_0000008"
    from megatron_ext.checkpoint_files import incomplete_reason

    assert not partial.exists() or incomplete_reason(str(partial)) is not None
    train(2, RUN + ["--load", str(ckpt), "--metrics-jsonl", str(tmp_path / "m.jsonl")])
    resumed = _metrics(tmp_path / "m.jsonl")
    assert sorted(resumed) == list(range(5, STEPS + 1))
    _same(resumed, straight, range(5, STEPS + 1))


@pytest.mark.timeout(300)
def test_the_job_killed_during_an_async_write_resumes_from_the_previous_checkpoint(straight, tmp_path):
    """--async-save: the whole job SIGKILLed while iteration 8's background write is in flight (its files
    written, the checkpoint never completed): the tracker still names 4, iteration 8 has no metadata.json,
    and a resume from 4 continues exactly as the straight run."""
    ckpt = tmp_path / "ckpt"
    flags = RUN + ["--save", str(ckpt), "--save-interval", "4", "--async-save"]
    proc = train(2, flags, check=False, env_extra={"CRYSTAL_TEST_KILL_IN_ASYNC_WRITE": "8"})
    assert proc.returncode != 0
    assert "checkpoint " + str(ckpt / "iter_0000004") + " complete" in proc.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert (ckpt / "iter_0000008").is_dir() and not (ckpt / "iter_0000008" / "metadata.json").exists()
    train(2, RUN + ["--load", str(ckpt), "--metrics-jsonl", str(tmp_path / "m.jsonl")])
    resumed = _metrics(tmp_path / "m.jsonl")
    assert sorted(resumed) == list(range(5, STEPS + 1))
    _same(resumed, straight, range(5, STEPS + 1))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_stopped_rank_ends_the_job_within_the_timeout_in_one_line():
    """The last rank SIGSTOPs itself at step 3 (alive, never answering) under --distributed-timeout-minutes 0.5:
    rank 0, waiting in the step's gradient reduction, ends after the 30 s with one line naming the timeout
    and the collective (exit code 4), no traceback; the launcher then ends the stopped rank."""
    started = time.monotonic()
    flags = TINY_RUN + ["--train-iters", "6", "--distributed-timeout-minutes", "0.5"]
    proc = train(2, flags, check=False, env_extra={"CRYSTAL_TEST_STOP_AT": "3"}, timeout=240)
    elapsed = time.monotonic() - started
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # rank 0's line; the launcher then ends the stopped rank, which (continued to take its SIGTERM) may say
    # in one line of its own that it lost rank 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_crystal.py: error:")]
    assert len([e for e in errors if "waited longer" in e]) == 1, proc.stderr[-3000:]
    assert all(e.startswith("pretrain_crystal.py: error: rank 1 lost another rank in ") for e in errors[1:]), errors
    assert re.match(
        r"pretrain_crystal.py: error: rank 0 waited longer than --distributed-timeout-minutes 0.5 in "
        r"(all_reduce|coalesced collectives), called from \w+ \(megatron/core/[\w/]+\.py:\d+\): ",
        errors[0],
    ), errors[0]
    assert errors[0].endswith("another rank stopped answering (hung, stopped, or its node lost); the job ends; "
                              "resume from the last checkpoint")  # fmt: skip
    assert 30 <= elapsed < 90, elapsed


@pytest.mark.timeout(300)
def test_loss_spikes_are_skipped_and_the_window_survives_a_resume(straight, tmp_path):
    """The detector sees ten times the loss of iterations 6 and 10 (test hook): both updates are skipped,
    no other step is (training losses fall, none lies 6 sigma above its window), and a run resumed at
    iteration 8 still catches the spike at 10: the window of 3 losses came back with the checkpoint (a
    fresh window would hold only one loss at 10 and let it through)."""
    spiky = RUN + ["--loss-spike-window", "3", "--loss-spike-sigma", "6"]
    env = {"CRYSTAL_TEST_SPIKE_ITERS": "6,10"}
    ckpt = tmp_path / "ckpt"
    proc = train(
        2,
        spiky + ["--save", str(ckpt), "--save-interval", "8", "--metrics-jsonl", str(tmp_path / "a.jsonl")],
        env_extra=env,
    )
    assert "iteration 6: loss spike (" in proc.stdout and "mean + 6 sigma of the last 3 steps) (lm loss" in proc.stdout
    first = _metrics(tmp_path / "a.jsonl")
    assert [i for i in first if first[i]["grad_norm"] is None] == [6, 10]
    _same(first, straight, range(1, 6))  # the detector changed nothing before the spike
    assert first[6]["lm_loss"] == straight[6]["lm_loss"]  # the logged loss is the true one
    train(
        2,
        spiky + ["--load", str(ckpt), "--ckpt-step", "8", "--metrics-jsonl", str(tmp_path / "b.jsonl")],
        env_extra=env,
    )
    resumed = _metrics(tmp_path / "b.jsonl")
    assert sorted(resumed) == list(range(9, STEPS + 1)) and resumed[10]["grad_norm"] is None
    _same(resumed, first, range(9, STEPS + 1))


@pytest.mark.timeout(300)
def test_pruning_after_a_rollback_keeps_the_fallback(tmp_path):
    """Checkpoints 4, 6, 8 kept; roll back to 4 and save 5: 6 and 8 are abandoned (removed first, never
    counted), so the three newest at or before the tracker, 4 and 5, stay. Counting 6 and 8 removed 4."""
    ckpt = tmp_path / "ckpt"
    train(
        1,
        TINY_RUN + ["--train-iters", "8", "--save", str(ckpt), "--save-interval", "2", "--keep-last-checkpoints", "3"],
    )
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000006", "iter_0000008"]
    train(
        1,
        TINY_RUN
        + [
            "--train-iters",
            "8",
            "--load",
            str(ckpt),
            "--ckpt-step",
            "4",
            "--save",
            str(ckpt),
            "--save-interval",
            "1",
            "--exit-interval",
            "5",
            "--keep-last-checkpoints",
            "3",
        ],
    )
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "5"


def _guard_ranks():
    """On each of two ranks: one all-reduce per step carries the non-finite verdict, the loss and the stop
    request; the check allocates nothing near a gradient buffer's size (it was a boolean mask per buffer)."""
    from types import SimpleNamespace

    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_ext.training.faults import UpdateGuard

    rank = torch.distributed.get_rank()
    grads = torch.randn(2_000_000)  # 8 MB
    chunk = SimpleNamespace(buffers=[SimpleNamespace(grad_data=grads)], expert_parallel_buffers=[])
    guard = UpdateGuard(5, torch.device("cpu"), spike_window=2, spike_sigma=3.0)
    calls = []
    real = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    try:
        verdicts = []
        for step in range(1, 5):
            grads[7] = float("nan") if (rank, step) == (1, 2) else 0.0
            loss = 3.0 if rank == 1 else None  # only the last pipeline stage knows it
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                reason = guard.check([chunk], loss, stop_signalled=(rank, step) == (0, 3))
            largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
            assert largest < 4096, (step, largest)
            verdicts.append((reason, guard.stop_agreed))
    finally:
        torch.distributed.all_reduce = real
    assert len(calls) == 4  # one collective per step
    assert verdicts == [(None, False), ("non-finite gradients", False), (None, True), (None, False)], verdicts
    assert list(guard.recent) == [3.0, 3.0]  # every rank holds the last stage's losses


def test_the_guard_decides_from_sums_in_one_collective_per_step():
    from helpers.process_group import run_in_process_group

    run_in_process_group(_guard_ranks, world_size=2)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 5 MB filesystem (tmpfs): one crystal-test checkpoint fits, the next does not. Mounting needs root
    with CAP_SYS_ADMIN (as on these machines and CI); where it is refused, a file-size limit of 2.5 MB
    (RLIMIT_FSIZE) makes the same write fail, with EFBIG instead of ENOSPC."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)], capture_output=True).returncode
        == 0
    )
    yield mount, (None if mounted else 2_500_000)
    if mounted:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("write", [[], ["--async-save"]], ids=["sync", "async"])
def test_a_full_disk_during_a_save_ends_the_job_in_one_line(small_filesystem, write):
    """The same line and exit code whether the write fails in the step or in the background (--async-save,
    where the failure is known when the write is completed after a later step), one line for the job's 2
    ranks, naming the full disk whatever the writer said (torch's zip writer may say only "unexpected pos")."""
    import resource

    mount, file_limit = small_filesystem
    ckpt = mount / "ckpt"
    flags = TINY_RUN + ["--train-iters", "3", "--save", str(ckpt), "--save-interval", "1", *write]
    env = dict(subprocess_environment(), MASTER_PORT=str(free_port()))

    def limit():
        if file_limit:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "fork_launch.py"), "2", *flags],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=limit,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # One line for the job (Megatron-Core's writer's per-rank log of its processes' errors is dropped).
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"pretrain_crystal.py: error: --save {ckpt}: the save of iteration 2 failed (")
    if file_limit is None:  # a real full disk (the file-size limit leaves the disk's space free)
        assert re.search(r"failed \(no space left on device: [\d,]+ bytes free there, the last checkpoint took "
                         r"[\d,]+; the writer: ", errors[0]), errors[0]  # fmt: skip
    assert errors[0].endswith(
        f"its partial directory is removed; the last complete checkpoint: {ckpt / 'iter_0000001'}"
    )
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "iter_0000001",
        "latest_checkpointed_iteration.txt",
        "run_config.json",
    ]


@pytest.mark.timeout(300)
def test_a_diverged_replica_is_named_and_the_job_stops_before_saving(tmp_path):
    """--check-weight-hash-across-dp-replicas-interval 2 at DP 2 (Megatron-LM's flag, Megatron-Core's check): the
    replicas agree at step 2 and it is saved; after step 3 the last rank's first parameter is changed by 1e-3 (a
    bad GPU's memory, injected from outside), and at step 4 the job stops, exit code 5, with one line naming
    data-parallel rank 1 and the parameter, before step 4's save: the resume point stays step 2."""
    ckpt = tmp_path / "ckpt"
    flags = TINY_RUN + ["--train-iters", "6", "--save", str(ckpt), "--save-interval", "2",
                        "--check-weight-hash-across-dp-replicas-interval", "2"]  # fmt: skip
    proc = train(2, flags, check=False, env_extra={"CRYSTAL_TEST_CORRUPT_WEIGHT_AFTER": "3"})
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert "data-parallel replicas' parameters compared by hash every 2 steps" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_crystal.py: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(
        r"pretrain_crystal.py: error: step 4: the parameters differ across the data-parallel replicas "
        r"\(--check-weight-hash-across-dp-replicas-interval\): data-parallel rank 1 \(rank 1, \S+\) differs from "
        r"data-parallel rank 0 in module\.embedding\.word_embeddings\.weight in model chunk ?0; stopping without "
        r"saving: .*",
        errors[0],
    ), errors[0]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000002"]
