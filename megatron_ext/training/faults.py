"""Surviving faults: a pre-emption signal ends the run at a step boundary with a checkpoint, and a
non-finite update is skipped instead of poisoning the weights.

- SIGUSR1 / SIGTERM (SLURM's warning before a time limit or pre-emption, `--signal=USR1@300`): the
  handler only raises a flag; every rank learns in the step's one verdict all-reduce whether any rank
  was signalled, and after the step together they save and exit 0, so the requeued job resumes there.
- Non-finite gradients (a NaN or inf loss produces them): every rank sums each gradient buffer after the
  backward pass (a NaN or inf anywhere makes the sum non-finite; no mask as large as the buffer); if any
  rank's is not finite, no rank steps the optimizer or the lr schedule.
- Loss spikes (optional, --loss-spike-window W): a step whose loss lies above mean + k sigma of the last
  W applied steps' losses is handled the same way, so that one bad batch does not throw the weights off.
- --exit-duration-in-mins M (Megatron-LM's): once M minutes have passed since the process started, the
  run stops as on a signal (the same one all-reduce decides, so every rank stops at the same step), saves
  and exits 0, leaving the stop marker the SLURM launcher requeues on.
- After --max-skipped-steps skipped steps in a row the run stops with a message rather than spin.
- --check-weight-hash-across-dp-replicas-interval N (Megatron-LM's): every N steps the data-parallel replicas
  compare a hash of every parameter (Megatron-Core's check); replicas that differ (a GPU or its memory
  corrupting data silently) stop the job before it saves, in one line naming the first differing rank and
  parameter (exit code 5).
- A rank that stops answering (hung, stopped, its node lost): a collective waiting for it longer than
  --distributed-timeout-minutes raises on gloo, and every rank still alive ends with one line naming the
  timeout and the collective it waited in (collective_failure), not a traceback; a rank whose peer's
  process ended while it waited says so in one line too. With NCCL, torch's own
  watchdog ends the process at the same timeout, with its own message.
The tests inject faults from outside (tests/helpers/fault_injection.py); nothing here reads a test hook.
"""

from __future__ import annotations

import math
import os
import signal
import sysconfig
import time
import traceback
from collections import deque

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_RUN_START = time.time()  # --exit-duration-in-mins counts from here: the process's start, or mark_run_start's


def mark_run_start() -> None:
    """pretrain() calls it first (a process that imported this module earlier, such as the tests' warm
    launcher, counts from the run's start, as Megatron-LM does)."""
    global _RUN_START
    _RUN_START = time.time()


class StopRequest:
    """Remembers a stop signal, or a time limit passed (--exit-duration-in-mins, counted from the run's start
    as Megatron-LM's); UpdateGuard.check tells every rank whether any rank asks to stop."""

    def __init__(self, exit_duration_minutes: float | None = None):
        self.signalled = None
        self.deadline = None if exit_duration_minutes is None else _RUN_START + 60 * exit_duration_minutes
        self.exit_duration_minutes = exit_duration_minutes
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.signalled = signal.Signals(signum).name

    def requested(self) -> str | None:
        """Why this rank asks to stop (a signal's name, or the time limit), or None."""
        if self.signalled is None and self.deadline is not None and time.time() >= self.deadline:
            self.signalled = f"--exit-duration-in-mins {self.exit_duration_minutes:g} passed"
        return self.signalled

    def close(self) -> None:
        """Give the signals back to the handlers they had before the run."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class UpdateGuard:
    """Decides, identically on every rank, whether a step's update is applied.

    One all-reduce and one host sync per step carry every input of the verdicts: whether any rank's
    gradients are non-finite, the step's loss (known on the last pipeline stage only), so that every rank
    keeps the same window of recent losses and reaches the same spike verdict, and whether any rank got
    a stop signal (stop_agreed). The window
    and the counters are checkpointed: a resumed run decides as the uninterrupted one would have.
    """

    def __init__(self, max_consecutive: int, device: torch.device, spike_window: int = 0, spike_sigma: float = 6.0):
        self.max_consecutive, self.device, self.spike_sigma = max_consecutive, device, spike_sigma
        self.recent = deque(maxlen=spike_window) if spike_window else None
        self.consecutive, self.total = 0, 0
        self.stop_agreed = False

    def check(self, model_chunks: list, loss: float | None, stop_signalled: bool = False) -> str | None:
        """Why this step's update must be skipped, or None to apply it (a collective: call on every rank).
        loss: the step's global loss on the last pipeline stage, None elsewhere. Sets stop_agreed: whether
        any rank was signalled to stop."""
        buffers = [b.grad_data for m in model_chunks for b in m.buffers + m.expert_parallel_buffers]
        # One fp32 sum per buffer: a NaN or inf anywhere in a buffer makes its sum non-finite.
        total = (
            torch.stack([torch.sum(g, dtype=torch.float32) for g in buffers]).sum()
            if buffers
            else torch.zeros((), device=self.device)
        )
        seen, bad_loss = -math.inf, 0.0
        if loss is not None:
            seen = loss
            if not math.isfinite(seen):  # a NaN or inf loss counts as non-finite gradients
                seen, bad_loss = -math.inf, 1.0
        verdict = torch.stack(
            [
                (~torch.isfinite(total)).to(torch.float64).clamp(min=bad_loss),
                torch.tensor(seen, dtype=torch.float64, device=total.device),
                torch.tensor(1.0 if stop_signalled else 0.0, dtype=torch.float64, device=total.device),
            ]
        )
        torch.distributed.all_reduce(verdict, op=torch.distributed.ReduceOp.MAX)
        bad, seen, stop = verdict.tolist()  # the step's one host sync for the guard and the stop request
        self.stop_agreed = bool(stop)
        reason = "non-finite gradients" if bad else self._spike(seen)
        if reason:
            self.consecutive += 1
            self.total += 1
        else:
            self.consecutive = 0
            if self.recent is not None:
                self.recent.append(seen)
        return reason

    def _spike(self, loss: float) -> str | None:
        if self.recent is None or len(self.recent) < self.recent.maxlen:
            return None
        mean = sum(self.recent) / len(self.recent)
        sigma = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
        limit = mean + self.spike_sigma * sigma
        if sigma > 0 and loss > limit:
            return (
                f"loss spike ({loss:.4f} > {limit:.4f}, mean + {self.spike_sigma:g} sigma of the last "
                f"{len(self.recent)} steps)"
            )
        return None

    @property
    def exhausted(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"recent": list(self.recent or ()), "consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        self.consecutive, self.total = state["consecutive"], state["total"]
        if self.recent is not None:
            self.recent.extend(state["recent"][-self.recent.maxlen :])


# How gloo reports a collective that waited past the timeout, and one whose peer went away.
_TIMED_OUT = ("timed out",)
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")


class ReplicasDiverged(Exception):
    """The data-parallel replicas' parameters differ (check_replicas_agree); its text is the one line."""


def check_replicas_agree(model_chunks, iteration: int) -> None:
    """Megatron-Core's check_param_hashes_across_dp_replicas (SHA-1 of every parameter, on the host, all-gathered
    over the data-parallel group), cross-checked so that every rank learns the verdict. Megatron-Core logs each
    parameter that differs from data-parallel rank 0's; those lines are caught to name the first one."""
    import logging
    import socket

    from megatron.core import parallel_state
    from megatron.core.utils import check_param_hashes_across_dp_replicas

    class Differences(logging.Handler):
        def __init__(self):
            super().__init__()
            self.names: list[str] = []

        def emit(self, record):
            text = record.getMessage()
            if "Hash not matching for" in text:
                self.names.append(text.split("Hash not matching for ", 1)[1])

    logger, handler = logging.getLogger("megatron.core.utils"), Differences()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        agree = check_param_hashes_across_dp_replicas(model_chunks, cross_check=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if agree:
        return
    mine = (parallel_state.get_data_parallel_rank(), torch.distributed.get_rank(), socket.gethostname(), handler.names)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    differing = [r for r in everyone if r[3]]
    dp_rank, rank, host, names = differing[0] if differing else (None, None, None, ["?"])
    raise ReplicasDiverged(
        f"step {iteration}: the parameters differ across the data-parallel replicas "
        f"(--check-weight-hash-across-dp-replicas-interval): data-parallel rank {dp_rank} (rank {rank}, {host}) "
        f"differs from data-parallel rank 0 in {names[0]}"
        + (f" and {len(names) - 1} more" if len(names) > 1 else "")
        + (f"; {len(differing) - 1} other ranks differ too" if len(differing) > 1 else "")
        + "; stopping without saving: a GPU or its memory corrupts data (check that node), then resume from the "
        "last checkpoint"
    )


def collective_failure(error: BaseException) -> tuple[str, str] | None:
    """(kind, where) for a collective that failed because another rank did not answer: kind "timeout" (it
    waited past --distributed-timeout-minutes) or "peer gone" (the other rank's process ended); where: the
    collective and its caller ("all_reduce, called from finalize_model_grads (megatron/core/distributed/
    finalize_model_grads.py:312)"). None for any other error."""
    if not isinstance(error, RuntimeError):
        return None
    text = str(error).lower()
    kind = (
        "timeout" if any(t in text for t in _TIMED_OUT) else "peer gone" if any(t in text for t in _PEER_GONE) else None
    )
    frames = traceback.extract_tb(error.__traceback__)
    in_c10d = [
        i for i, f in enumerate(frames) if f.filename.endswith(os.path.join("distributed", "distributed_c10d.py"))
    ]
    if kind is None or not in_c10d:
        return None
    collective = frames[in_c10d[-1]].name
    collective = {"_coalescing_manager": "coalesced collectives"}.get(collective, collective)  # DDP's buckets
    stdlib = sysconfig.get_paths()["stdlib"]
    callers = [f for f in frames[: in_c10d[0]] if os.sep + "torch" + os.sep not in f.filename
               and not f.filename.startswith(stdlib)]  # fmt: skip
    if not callers:
        return kind, collective
    caller = callers[-1]
    where = os.path.join(*caller.filename.split(os.sep)[-4:])
    return kind, f"{collective}, called from {caller.name} ({where}:{caller.lineno})"
