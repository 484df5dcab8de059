"""Faults that the tests inject into training ranks, through the real code paths they exercise;
tests/helpers/fork_launch.py installs them in each rank from these environment variables:

- CRYSTAL_TEST_NAN_ITERS="3,5,6": a NaN in the first gradient buffer before the update guard judges
  those iterations;
- CRYSTAL_TEST_SPIKE_ITERS="7": the guard is shown ten times those iterations' loss (the logged loss
  stays the true one);
- CRYSTAL_TEST_KILL_IN_SAVE=N: the last rank SIGKILLs itself as the save of iteration N begins to write,
  after the other ranks have started writing;
- CRYSTAL_TEST_KILL_IN_ASYNC_WRITE=N: with --async-save, each rank's background writer of iteration N,
  having written its files, SIGKILLs its rank and then itself: the whole job dies with the write begun and
  never completed (no metadata.json, tracker not moved) while the ranks train on;
- CRYSTAL_TEST_STOP_AT=N: the last rank SIGSTOPs itself as it begins step N: alive, silent, never answering;
- CRYSTAL_TEST_KILL_AT=N: the last rank SIGKILLs itself as it begins step N (as the out-of-memory killer would);
- CRYSTAL_TEST_FULL_DISK_AT=N: the save of iteration N fails on every rank with ENOSPC, as its first write
  onto a full disk would;
- CRYSTAL_TEST_CHANGE_LATEST_SHARD=1: before the run starts, rank 0 changes one byte in the middle of the
  largest shard of --load's latest checkpoint (a bad disk or copy, found when the restart reads it);
- CRYSTAL_TEST_CORRUPT_WEIGHT_AFTER=N: after step N the last rank adds 1e-3 to one entry of its first
  parameter: a replica silently diverged, as a bad GPU's memory would leave it;
- CRYSTAL_TEST_SLOW_RANK="R:S": rank R sleeps S seconds at the start of each training step's forward and
  backward (as a slow GPU or a slow data reader would make it late to the gradient sync);
- CRYSTAL_TEST_SCALE_INIT=F: every initial weight times F (then any checkpoint loads over them): a model
  whose predictions depend on its context from the first step, so that attention over the wrong tokens
  shows in an evaluation's figures (an untrained one scores nearly as a unigram model does).

Under torchrun --max-restarts (tests/helpers/faulty_pretrain.py), a value "N@A" injects the fault in attempt A
only (TORCHELASTIC_RESTART_COUNT): a fault that heals; without "@A" it recurs in every attempt.
"""

from __future__ import annotations

import os
import signal


def _iterations(environ, name: str) -> set[int]:
    return {int(x) for x in environ.get(name, "").split(",") if x.strip()}


def this_attempt(environ) -> dict:
    """The CRYSTAL_TEST_* faults of this attempt, their "@A" removed; every other variable as it is."""
    attempt, faults = environ.get("TORCHELASTIC_RESTART_COUNT", "0"), {}
    for name, value in environ.items():
        if name.startswith("CRYSTAL_TEST_") and "@" in value:
            value, only_in = value.rsplit("@", 1)
            if only_in != attempt:
                continue
        faults[name] = value
    return faults


def install(environ) -> None:
    environ = this_attempt(environ)
    import torch
    from megatron.core import dist_checkpointing

    from megatron_ext.training.faults import UpdateGuard
    from megatron_ext.training.loop import Trainer

    poison_at, spike_at = (
        _iterations(environ, "CRYSTAL_TEST_NAN_ITERS"),
        _iterations(environ, "CRYSTAL_TEST_SPIKE_ITERS"),
    )
    if poison_at or spike_at:
        check, train_step = UpdateGuard.check, Trainer.train_step
        step = {"iteration": 0}  # the iteration being trained, which the guard itself does not know

        def counting_train_step(self, iterators):
            step["iteration"] = self.iteration + 1
            return train_step(self, iterators)

        def injected_check(self, model_chunks, loss, stop_signalled=False):
            if step["iteration"] in poison_at:
                model_chunks[0].buffers[0].grad_data.view(-1)[0] = float("nan")
            if step["iteration"] in spike_at and loss is not None:
                loss = loss * 10
            return check(self, model_chunks, loss, stop_signalled)

        Trainer.train_step, UpdateGuard.check = counting_train_step, injected_check

    kill_in_save = environ.get("CRYSTAL_TEST_KILL_IN_SAVE")
    if kill_in_save:
        save = dist_checkpointing.save

        def killing_save(state, path, *args, **kwargs):
            last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
            if last and os.path.basename(os.path.normpath(str(path))) == f"iter_{int(kill_in_save):07d}":
                os.kill(os.getpid(), signal.SIGKILL)
            return save(state, path, *args, **kwargs)

        dist_checkpointing.save = killing_save

    full_disk_at = environ.get("CRYSTAL_TEST_FULL_DISK_AT")
    if full_disk_at:
        import errno

        save_on_a_disk = dist_checkpointing.save

        def full_disk_save(state, path, *args, **kwargs):
            if os.path.basename(os.path.normpath(str(path))) == f"iter_{int(full_disk_at):07d}":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return save_on_a_disk(state, path, *args, **kwargs)

        dist_checkpointing.save = full_disk_save

    if environ.get("CRYSTAL_TEST_CHANGE_LATEST_SHARD") and environ.get("RANK", "0") == "0":
        _change_latest_shard(environ)

    kill_in_async = environ.get("CRYSTAL_TEST_KILL_IN_ASYNC_WRITE")
    if kill_in_async:
        from megatron_ext import checkpointing

        saver_save, schedule = checkpointing.CheckpointSaver.save, checkpointing.AsyncCallsQueue.schedule_async_request
        saving = {"iteration": None}

        def noting_save(self, iteration, *args, **kwargs):
            saving["iteration"] = iteration
            return saver_save(self, iteration, *args, **kwargs)

        def killing_schedule(self, request):
            if saving["iteration"] == int(kill_in_async):
                write = request.async_fn

                def write_then_kill_the_job(*args, **kwargs):
                    write(*args, **kwargs)
                    os.kill(os.getppid(), signal.SIGKILL)
                    os.kill(os.getpid(), signal.SIGKILL)

                request = request._replace(async_fn=write_then_kill_the_job)
            return schedule(self, request)

        checkpointing.CheckpointSaver.save = noting_save
        checkpointing.AsyncCallsQueue.schedule_async_request = killing_schedule

    for name, sig in (("CRYSTAL_TEST_STOP_AT", signal.SIGSTOP), ("CRYSTAL_TEST_KILL_AT", signal.SIGKILL)):
        if environ.get(name):
            _signal_last_rank_at(int(environ[name]), sig)

    corrupt_after = environ.get("CRYSTAL_TEST_CORRUPT_WEIGHT_AFTER")
    if corrupt_after:
        from megatron_ext.training.loop import Trainer

        step_once = Trainer.train_step

        def corrupting_train_step(self, iterators):
            result = step_once(self, iterators)
            last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
            if last and self.iteration + 1 == int(corrupt_after):  # the loop counts the step after this returns
                with torch.no_grad():
                    next(self.model[0].parameters()).view(-1)[0] += 1e-3
            return result

        Trainer.train_step = corrupting_train_step

    slow_rank = environ.get("CRYSTAL_TEST_SLOW_RANK")
    if slow_rank:
        import time

        from megatron_ext.training.loop import Trainer

        rank, seconds = slow_rank.split(":")
        run_schedule = Trainer._run

        def slowed_run(self, iterators, forward_only, *args, **kwargs):
            if not forward_only and torch.distributed.get_rank() == int(rank):
                time.sleep(float(seconds))
            return run_schedule(self, iterators, forward_only, *args, **kwargs)

        Trainer._run = slowed_run

    scale_init = environ.get("CRYSTAL_TEST_SCALE_INIT")
    if scale_init:
        from megatron_ext.training import loop

        build_model = loop.build_model

        def scaled_build_model(*args, **kwargs):
            chunks = build_model(*args, **kwargs)
            with torch.no_grad():
                for chunk in chunks:
                    for p in chunk.parameters():
                        p.mul_(float(scale_init))
            return chunks

        loop.build_model = scaled_build_model


def _signal_last_rank_at(step: int, sig: signal.Signals) -> None:
    import torch

    from megatron_ext.training.loop import Trainer

    train_step = Trainer.train_step

    def signalling_train_step(self, iterators):
        last = torch.distributed.get_rank() == torch.distributed.get_world_size() - 1
        if last and self.iteration + 1 == step:
            os.kill(os.getpid(), sig)
        return train_step(self, iterators)

    Trainer.train_step = signalling_train_step


def _change_latest_shard(environ) -> None:
    """One byte of --load's latest checkpoint's largest shard, changed in place (its size kept)."""
    import sys

    load = sys.argv[sys.argv.index("--load") + 1]
    with open(os.path.join(load, "latest_checkpointed_iteration.txt")) as f:
        latest = os.path.join(load, f"iter_{int(f.read()):07d}")
    shard = max((os.path.join(latest, n) for n in os.listdir(latest) if n.endswith(".distcp")), key=os.path.getsize)
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    print(f"fault injected: one byte changed in {shard}", flush=True)
