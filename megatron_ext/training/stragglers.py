"""Stragglers named (--log-straggler, Megatron-LM's flag; off by default).

The rule: each rank times its own work of each step, from the step's start (Trainer.train_step) to its first
gradient collective (Megatron-Core's finalize_model_grads, where the ranks meet): reading the
batch, the forward and the backward. That is what a slow GPU, a throttled node or a slow data reader stretches,
and what the others then spend waiting in the gradient reduction, so the step times themselves are alike on
every rank and name nobody. Every log interval the ranks all-gather their sums (one float per rank, the only
collective added) and the logging rank names the slowest --straggler-minmax-count ranks (global rank, host,
their time a step against the median of the others) whose time is over --straggler-threshold times that
median over the interval; the spread (fastest, median, slowest, the slowest rank's ratio) goes to the
metrics, so to TensorBoard, W&B and --metrics-jsonl. With pipeline stages the time includes a stage's waits
for its neighbours' activations (the first stage waits least): compare ranks of the same stage.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch

from megatron_ext.training import distributed
from megatron_ext.training.metric_sinks import STRAGGLER as PREFIX


class OwnWork:
    """This rank's seconds of its own work in the steps since the last read (see the module's rule)."""

    def __init__(self, config):
        self.finalize = config.finalize_model_grads_func
        config.finalize_model_grads_func = self._finalize
        self.started, self.seconds, self.steps = time.perf_counter(), 0.0, 0
        self._timed = False

    def _finalize(self, *args, **kwargs):
        if not self._timed:  # the first gradient collective of the step
            self.seconds += time.perf_counter() - self.started
            self.steps, self._timed = self.steps + 1, True
        return self.finalize(*args, **kwargs)

    def step_started(self) -> None:
        self.started, self._timed = time.perf_counter(), False

    def take(self) -> tuple[float, int]:
        seconds, steps = self.seconds, self.steps
        self.seconds, self.steps = 0.0, 0
        return seconds, steps


def spread(per_rank: list[float], count: int, threshold: float) -> tuple[dict[str, float], list[tuple[int, float]]]:
    """(the metrics, [(rank, its ratio to the median of the others)] of the up to `count` slowest ranks over the
    threshold) from each rank's seconds a step."""
    order = sorted(range(len(per_rank)), key=lambda r: per_rank[r], reverse=True)

    def ratio(rank: int) -> float:
        others = statistics.median([t for r, t in enumerate(per_rank) if r != rank] or per_rank)
        return per_rank[rank] / others if others > 0 else 1.0

    slowest = order[0]
    metrics = {
        PREFIX + "fastest-s": min(per_rank),
        PREFIX + "median-s": statistics.median(per_rank),
        PREFIX + "slowest-s": per_rank[slowest],
        PREFIX + "slowest-rank": float(slowest),
        PREFIX + "slowest-over-median": ratio(slowest),
    }
    named = [(r, ratio(r)) for r in order[:count] if ratio(r) > threshold]
    return metrics, named


class StragglerDetector:
    """Gathers the ranks' own-work times at each log step and names the stragglers (a collective: every
    rank calls check at the same steps). The Trainer calls work.step_started() as each step begins."""

    def __init__(self, config, count: int, threshold: float):
        self.work, self.count, self.threshold = OwnWork(config), count, threshold
        self.hosts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(self.hosts, socket.gethostname())  # once, at start-up
        self.first_step = 1
        distributed.print_rank_0(
            f"--log-straggler: each rank's own work a step (batch, forward, backward, up to the gradient sync) "
            f"compared every log interval; named when over {threshold:g}x the others' median"
        )

    def check(self, iteration: int) -> tuple[dict[str, float], list[str]]:
        """(the spread's metrics, a line per named straggler) over the steps since the last check."""
        seconds, steps = self.work.take()
        local = torch.tensor([seconds / max(steps, 1)], dtype=torch.float64)
        gathered = [torch.zeros_like(local) for _ in self.hosts]
        torch.distributed.all_gather(gathered, local)
        per_rank = [t.item() for t in gathered]
        metrics, named = spread(per_rank, self.count, self.threshold)
        window = f"steps {self.first_step}-{iteration}"
        self.first_step = iteration + 1
        lines = [
            f"straggler: rank {rank} (host {self.hosts[rank]}) took {per_rank[rank]:.3f} s a step of its own work "
            f"(batch, forward, backward) against the others' median {per_rank[rank] / ratio:.3f} s ({ratio:.1f}x) "
            f"over {window}"
            for rank, ratio in named
        ]
        return metrics, lines
