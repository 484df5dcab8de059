"""Validation per source: each source of the phases file on the same held-out documents at every
evaluation, as loss and bits per byte.

The held-out documents are those the phases file's validation_fraction sets aside (never trained on).
Source s contributes its first n samples of the held-out documents' epoch-0 packing, plain (no FIM:
the figure is the source's own text), so every evaluation and every layout reads the same tokens. The
samples are laid out in the run's global batches, the last one padded with masked samples, and go
through the training's forward pipeline schedule (any TP / PP / DP layout).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_ext.evaluation.token_bytes import TokenBytes

# Columns of the per-source report of an evaluation step, summed over samples, micro-batches and ranks.
LOSS, TOKENS, BYTES, BPB_SUM, BPB_SQUARES, SAMPLES = range(6)
COLUMNS = 6


class SourceValidationSet(torch.utils.data.Dataset):
    def __init__(self, valid_dataset, samples_per_source: int, batch_size: int, table: TokenBytes):
        """valid_dataset: the run's PhasedDataset of held-out documents."""
        self.streams, self.table = valid_dataset.streams, table
        self.position_ids = valid_dataset.position_ids
        self.samples = [min(samples_per_source, s.samples_per_epoch) for s in self.streams]
        self.index = [(s, j) for s, n in enumerate(self.samples) for j in range(n)]
        self.batch_size = batch_size
        self.steps = -(-len(self.index) // batch_size)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __getitem__(self, i: int) -> dict:
        source, j = self.index[i] if i < len(self.index) else self.index[0]
        row, _ = self.streams[source].packed(0, j)
        tokens, labels = row[:-1], row[1:]
        label_bytes = self.table.label_bytes(tokens, labels)
        mask = np.ones(len(labels), dtype=np.float32)
        if i >= len(self.index):  # padding to a whole batch: counts nowhere
            mask[:] = 0
            label_bytes[:] = 0
        return {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(mask),
            "position_ids": self.position_ids,
            "source_id": torch.tensor(source),
            "label_bytes": torch.from_numpy(label_bytes),
        }


def sample_columns(per_token_loss: torch.Tensor, mask: torch.Tensor, label_bytes: torch.Tensor) -> torch.Tensor:
    """[samples, COLUMNS] of one micro-batch: summed loss (nats), tokens, bytes, and the sample's bits per
    byte and its square (for the standard error over samples); padding samples count zero."""
    loss = (per_token_loss.float() * mask).sum(dim=1)
    tokens = mask.sum(dim=1)
    nbytes = (label_bytes.float() * mask).sum(dim=1)
    real = (nbytes > 0).float()
    bpb = loss / math.log(2) / nbytes.clamp(min=1) * real
    return torch.stack((loss, tokens, nbytes, bpb, bpb * bpb, real), dim=1)


def summarise(names: list[str], report: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per source: loss (nats per token), bits per byte, the standard error of bits per byte over the
    samples, tokens, bytes, samples."""
    out = {}
    for name, row in zip(names, report.double().tolist()):
        samples = row[SAMPLES]
        if not samples:
            continue
        mean = row[BPB_SUM] / samples
        variance = max(row[BPB_SQUARES] / samples - mean * mean, 0.0) * samples / max(samples - 1, 1)
        out[name] = {
            "loss": row[LOSS] / row[TOKENS],
            "bpb": row[LOSS] / math.log(2) / row[BYTES],
            "bpb_stderr": math.sqrt(variance / samples),
            "tokens": int(row[TOKENS]),
            "bytes": int(row[BYTES]),
            "samples": int(samples),
        }
    return out
