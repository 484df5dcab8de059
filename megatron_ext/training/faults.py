"""Surviving faults: a pre-emption signal ends the run at a step boundary with a checkpoint, and a
non-finite update is skipped instead of poisoning the weights.

- SIGUSR1 / SIGTERM (SLURM's warning before a time limit or pre-emption, `--signal=USR1@300`): the
  handler only raises a flag; after the current step every rank learns whether any rank was signalled
  (one all-reduce per step), and together they save and exit 0, so the requeued job resumes there.
- Non-finite gradients (a NaN or inf loss produces them): every rank checks its gradient buffers after
  the backward pass; if any rank finds one, no rank steps the optimizer or the lr schedule. After
  --max-skipped-steps such steps in a row the run stops with a message rather than spin.
Test hooks (environment variables) that exercise the real paths: CRYSTAL_TEST_NAN_ITERS ("3,5,6")
poisons the gradients of those iterations; CRYSTAL_TEST_KILL_IN_SAVE=N makes the last rank SIGKILL itself
inside the save of iteration N, after the other ranks have started writing.
"""

from __future__ import annotations

import os
import signal

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    def __init__(self, device: torch.device):
        self.device, self.signalled = device, None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank when any rank has been signalled."""
        flag = torch.tensor([1 if self.signalled else 0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def die_in_save_if_asked(iteration: int) -> None:
    if os.environ.get("CRYSTAL_TEST_KILL_IN_SAVE") == str(iteration) and \
            torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        os.kill(os.getpid(), signal.SIGKILL)


def _test_nan_iterations() -> set[int]:
    raw = os.environ.get("CRYSTAL_TEST_NAN_ITERS", "")
    return {int(x) for x in raw.split(",") if x.strip()}


class NonFiniteGuard:
    def __init__(self, max_consecutive: int, device: torch.device):
        self.max_consecutive, self.device = max_consecutive, device
        self.consecutive, self.total = 0, 0
        self.poison_at = _test_nan_iterations()

    def grads_finite(self, model_chunks: list, iteration: int) -> bool:
        """Whether every rank's gradient buffers are finite (a collective: call on every rank)."""
        buffers = [b.grad_data for m in model_chunks for b in m.buffers + m.expert_parallel_buffers]
        if iteration in self.poison_at:
            buffers[0].view(-1)[0] = float("nan")
        bad = torch.tensor([0 if all(torch.isfinite(g).all() for g in buffers) else 1], device=self.device)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return not bad.item()

    def record(self, finite: bool) -> None:
        if finite:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.total += 1

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive
