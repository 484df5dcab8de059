"""The training samples of a phases file: a map-style dataset addressed by SampleRef, and the sampler that
walks the phase schedule and hands each data-parallel rank its micro-batches.

Megatron's sample order is kept: step t's global batch is the schedule's next G samples (G the phase's
global batch size), and micro-batch m of data-parallel rank d holds its samples [m*B*D + d*B, ... + B).
Every rank walks its own copy of the schedule, so the data of a step does not depend on the layout.
"""

from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from megatron_ext.data.fim import FimTokenIds, apply_fim
from megatron_ext.data.hdf5_source import Hdf5Source
from megatron_ext.data.phase_schedule import PhaseSchedule, SampleRef
from megatron_ext.data.phases_config import PhasesConfig, PhasesConfigError
from megatron_ext.data.run_transforms import OUTCOMES, UNCHOSEN, outcome_counts
from megatron_ext.data.source_stream import SourceStream
from megatron_ext.data.span_corruption import SentinelIds, apply_span_corruption

# Per row, what the loss should know happened to it: the runs FIM or span corruption chose, by
# run_transforms.OUTCOMES; an HDF5 sample whose labels are not its next inputs; one that could not be read.
ROW_COUNTS = (*OUTCOMES, "labels_not_next_input", "unreadable")


class PhasedDataset(torch.utils.data.Dataset):
    def __init__(
        self, config: PhasesConfig, seq_length: int, tokenizer=None, split: str = "train", cache_dir: str | None = None
    ):
        """cache_dir: the sources' indices on disk (data/index_cache.py); None: in this process's memory."""
        self.config = config

        def stream(spec):
            if spec.is_hdf5:
                return Hdf5Source(spec, seq_length)
            return SourceStream(spec, seq_length, config.seed, config.validation_fraction, split, cache_dir)

        self.streams = _side_by_side(stream, list(config.sources.values()))
        for stream in self.streams:
            if stream.samples_per_epoch == 0:
                raise PhasesConfigError(
                    f"{config.path}: source {stream.spec.name!r} has {stream.tokens_per_epoch} {split} "
                    f"tokens, fewer than one sample of {seq_length + 1}"
                )
        self.tokenizer = tokenizer
        self.fim_ids = FimTokenIds.of(tokenizer) if tokenizer is not None else None
        self.sentinel_ids = SentinelIds.of(tokenizer) if tokenizer is not None else None
        self.position_ids = torch.arange(seq_length, dtype=torch.long)

    def __getitem__(self, ref: SampleRef) -> dict:
        counts = np.zeros(len(ROW_COUNTS), dtype=np.int64)
        if isinstance(self.streams[ref.source], Hdf5Source):
            tokens, labels, loss_mask = self._ready_sample(ref, counts)
        else:
            row, loss_mask, outcomes, _, _ = self.transformed(ref)
            counts[: len(OUTCOMES)] = outcome_counts(outcomes)
            row = torch.from_numpy(row)
            tokens, labels, loss_mask = row[:-1], row[1:], torch.from_numpy(loss_mask)
        return {
            "tokens": tokens,
            "labels": labels,
            "loss_mask": loss_mask,
            "position_ids": self.position_ids,
            "source_id": torch.tensor(ref.source),
            # What happened to the row, by ROW_COUNTS: every row has them, so that a reader's micro-batches keep
            # one layout across phases (readers.TensorGroupBatches).
            "row_counts": torch.from_numpy(counts),
        }

    def _ready_sample(self, ref: SampleRef, counts: np.ndarray):
        """An HDF5 sample as stored: (input ids, labels, loss mask); a row that cannot be read becomes one
        without loss, counted."""
        sample, _ = self.streams[ref.source].read(ref.index)
        if sample is None:
            counts[ROW_COUNTS.index("unreadable")] = 1
            zeros = torch.zeros(len(self.position_ids), dtype=torch.int64)
            return zeros, zeros, torch.zeros(len(self.position_ids), dtype=torch.float32)
        ids, mask, labels = sample
        counts[ROW_COUNTS.index("labels_not_next_input")] = int(not np.array_equal(labels[:-1], ids[1:]))
        return torch.from_numpy(ids), torch.from_numpy(labels), torch.from_numpy((mask != 0).astype(np.float32))

    def transformed(self, ref: SampleRef):
        """(tokens [seq_length + 1] after the phase's FIM or span corruption, loss mask of the labels, each
        run's outcome (run_transforms.OUTCOMES index, or UNCHOSEN), the document runs, the epoch)."""
        stream = self.streams[ref.source]
        row, segments, epoch = stream.sample(ref.index)
        segments = list(segments)
        phase = self.config.phases[ref.phase]
        fim, span_corruption = phase.fim.get(stream.spec.name), phase.span_corruption.get(stream.spec.name)
        key = (self.config.seed, stream.key, epoch)
        if span_corruption is not None:  # a source has one of the two in a phase (phases_config.py)
            row, loss_mask, outcomes = apply_span_corruption(
                row, segments, span_corruption, key, self.tokenizer, self.sentinel_ids
            )
        elif fim is not None and fim.rate > 0:
            row, loss_mask, outcomes = apply_fim(
                row, segments, fim.rate, fim.spm_rate, key, self.tokenizer, self.fim_ids
            )
        else:
            loss_mask, outcomes = np.ones(len(row) - 1, dtype=np.float32), [UNCHOSEN] * len(segments)
        return row, loss_mask, outcomes, segments, epoch

    def open_epochs(self, positions: dict[str, int]) -> None:
        """Every source's indices for the epoch its next sample (positions: samples read) lies in, the
        sources side by side, before the first batch is asked for (and before DataLoader workers fork, so
        that they inherit the maps)."""
        _side_by_side(lambda stream: stream.open_epoch_of(positions.get(stream.spec.name, 0)), self.streams)

    def epochs_read(self, iters: int | None = None) -> dict[str, float]:
        """Per source, the epochs that the first `iters` iterations (default: all phases) read of it."""
        needed = {name: 0.0 for name in self.config.sources}
        left = self.config.total_iters if iters is None else iters
        for phase in self.config.phases:
            steps = min(phase.iters, left)
            left -= steps
            for name, weight in phase.blend.items() if steps else ():
                needed[name] += weight * steps * phase.global_batch_size + 1  # the blending rule's slack of one
        return {s.spec.name: needed[s.spec.name] / s.samples_per_epoch for s in self.streams}

    def check_epochs(self, train_iters: int) -> None:
        """Refuse a run that would read more epochs of a source than its max_epochs, before training."""
        run, whole = self.epochs_read(train_iters), self.epochs_read()
        for stream in self.streams:
            spec = stream.spec
            if spec.max_epochs is not None and run[spec.name] > spec.max_epochs:
                raise PhasesConfigError(
                    f"{self.config.path}: sources.{spec.name}.max_epochs {spec.max_epochs}: the run's {train_iters} "
                    f"iterations read {run[spec.name]:.2f} epochs of it ({stream.samples_per_epoch} samples each; "
                    f"all the phases: {whole[spec.name]:.2f})"
                )


def _side_by_side(build, items: list) -> list:
    """build over items in threads: the index builds are numpy permutations, gathers and cumulative sums,
    which release the GIL, so sources build on as many cores. At most 8 at once: each holds its
    temporaries (about 20 bytes per document) until it is written."""
    if len(items) <= 1:
        return [build(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(build, items))


class PhaseBatchSampler(torch.utils.data.Sampler):
    """This rank's micro-batches of SampleRefs for `steps` steps from the schedule's current state."""

    def __init__(self, schedule: PhaseSchedule, micro_batch_size: int, dp_rank: int, dp_size: int, steps: int):
        self.schedule = copy.deepcopy(schedule)
        self.mbs, self.dp_rank, self.dp_size, self.steps = micro_batch_size, dp_rank, dp_size, steps

    def __iter__(self):
        schedule = self.schedule
        stride = self.mbs * self.dp_size
        for _ in range(self.steps):
            refs = schedule.take(schedule.next_step_batch_size())
            for first in range(self.dp_rank * self.mbs, len(refs), stride):
                yield refs[first : first + self.mbs]
