"""Validation on held-out documents: loss and bits per byte, per source, on the same samples every time.

With --phases, source s contributes the first n samples of its held-out documents (those the phases file's
validation_fraction keeps out of training) in their epoch-0 sample order, which spreads them over all the
documents (the first n positions of the packing would cover only the first few), plain (no FIM: the figure
is the source's own text). With a blend (--data-path / --mock-data), the first --eval-iters batches of Megatron's
validation split. Each sample is a slot of its own, so the standard error over samples comes for free.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_ext.evaluation.eval_set import BYTES, LOSS, TOKENS, Figure, mean_and_stderr
from megatron_ext.evaluation.token_bytes import TokenBytes


class HeldOutSet(torch.utils.data.Dataset):
    """samples: (source index, where the sample is) per slot; read(where) gives its seq_length + 1 tokens."""

    task = "valid"
    packed = False  # a row is one held-out sample

    def __init__(self, names: list[str], samples: list[tuple[int, int]], batch_size: int, table: TokenBytes | None):
        self.names, self.samples, self.table = names, samples, table
        self.name, self.num_slots, self.batch_size = self.task, len(samples), batch_size
        self.steps = -(-len(samples) // batch_size)

    def read(self, source: int, where: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __getitem__(self, i: int) -> dict:
        source, where = self.samples[min(i, len(self.samples) - 1)]
        row = np.asarray(self.read(source, where), dtype=np.int64)
        tokens, labels = row[:-1], row[1:]
        mask = np.full(len(labels), 0.0 if i >= len(self.samples) else 1.0, dtype=np.float32)  # padding rows
        nbytes = self.table.label_bytes(tokens, labels) if self.table else np.zeros(len(labels), dtype=np.float32)
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask),
            "position_ids": torch.arange(len(tokens)),
            "slot": torch.tensor(min(i, len(self.samples) - 1)),
            "label_bytes": torch.from_numpy(nbytes),
        }

    def figures(self, slots: np.ndarray) -> list[Figure]:
        """The overall loss; per source (with phases) loss and bits per byte, its standard error over samples."""
        slots = np.asarray(slots, dtype=np.float64)
        out = [
            Figure(self.task, "loss", slots[:, LOSS].sum() / slots[:, TOKENS].sum(), int(slots[:, TOKENS].sum()), None)
        ]
        sources = np.array([s for s, _ in self.samples])
        for index, name in enumerate(self.names):
            mine = slots[sources == index]
            if not len(mine):
                continue
            task = f"{self.task}/{name}" if len(self.names) > 1 or name != self.task else self.task
            if task != self.task:
                out.append(
                    Figure(task, "loss", mine[:, LOSS].sum() / mine[:, TOKENS].sum(), int(mine[:, TOKENS].sum()), None)
                )
            if self.table is not None:
                _, stderr = mean_and_stderr(mine[:, LOSS] / math.log(2) / np.maximum(mine[:, BYTES], 1))
                bpb = mine[:, LOSS].sum() / math.log(2) / mine[:, BYTES].sum()
                out.append(Figure(task, "bpb", bpb, len(mine), stderr))
        return out


class PhasesValidation(HeldOutSet):
    """Per source of a phases file; valid_dataset: the run's PhasedDataset of held-out documents."""

    def __init__(self, valid_dataset, samples_per_source: int, batch_size: int, table: TokenBytes):
        self.streams = valid_dataset.streams
        samples = [
            (index, j)
            for index, stream in enumerate(self.streams)
            for j in range(min(samples_per_source, stream.samples_per_epoch))
        ]
        super().__init__([stream.spec.name for stream in self.streams], samples, batch_size, table)

    def read(self, source: int, where: int) -> np.ndarray:
        return self.streams[source].sample(where)[0]  # epoch 0's sample order: spread over all the documents


class BlendValidation(HeldOutSet):
    """A blend's validation split (a Megatron-Core GPTDataset): its first `batches` global batches."""

    def __init__(self, valid_dataset, batches: int, batch_size: int, table: TokenBytes | None):
        self.dataset = valid_dataset
        count = min(batches * batch_size, len(valid_dataset)) if valid_dataset is not None else 0
        super().__init__(["valid"], [(0, i) for i in range(count)], batch_size, table)

    def read(self, source: int, where: int) -> np.ndarray:
        sample = self.dataset[where]
        return np.append(sample["tokens"].numpy(), sample["labels"].numpy()[-1])
