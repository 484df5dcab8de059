"""What an evaluation hands the model: fixed rows of tokens, each scored into a slot.

An evaluation set is a map-style dataset of rows shaped like training samples (tokens, labels, loss mask,
position ids) plus `slot` (which scored unit the row's masked labels belong to: a held-out sample, one
choice of a multiple-choice question) and `label_bytes` (UTF-8 bytes per label). Every row goes through a
forward pass, the training's pipeline schedule in the loop or a Hugging Face model offline, and each slot
gets [summed loss in nats, tokens, bytes]; the set turns that table into figures. One table per set,
whatever the layout: reduced over data-parallel ranks on the last pipeline stage.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import numpy as np
import torch

LOSS, TOKENS, BYTES = range(3)
SLOT_COLUMNS = 3


class Figure(NamedTuple):
    task: str  # e.g. "valid/code", "arc_easy"
    metric: str  # e.g. "bpb", "acc", "acc_norm"
    value: float
    n: int | None  # what the figure is over (samples, questions, tokens)
    stderr: float | None


class EvalSet(Protocol):
    name: str
    num_slots: int
    batch_size: int  # rows per step (the run's global batch); the last step is padded with masked rows
    steps: int

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> dict: ...
    def figures(self, slots: np.ndarray) -> list[Figure]: ...


def slot_table(
    per_token_loss: torch.Tensor,
    batch_mask: torch.Tensor,
    label_bytes: torch.Tensor,
    slot: torch.Tensor,
    num_slots: int,
) -> torch.Tensor:
    """[num_slots, SLOT_COLUMNS] of one micro-batch."""
    mask = batch_mask.float()
    columns = torch.stack(
        ((per_token_loss.float() * mask).sum(dim=1), mask.sum(dim=1), (label_bytes.float() * mask).sum(dim=1)), dim=1
    )
    return torch.zeros(num_slots, SLOT_COLUMNS, device=columns.device, dtype=columns.dtype).index_add_(0, slot, columns)


def row(ids: list[int], scored_from: int, seq_length: int, slot: int, label_bytes: np.ndarray, pad_id: int) -> dict:
    """A row of an evaluation set from a token sequence whose labels from position `scored_from` on are
    scored (ids[scored_from + 1:], the continuation); longer than seq_length + 1, it loses its start."""
    ids = np.asarray(ids, dtype=np.int64)
    cut = max(len(ids) - (seq_length + 1), 0)
    ids, first = ids[cut:], max(scored_from - cut, 0)
    n = len(ids) - 1
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    mask = np.zeros(seq_length, dtype=np.float32)
    nbytes = np.zeros(seq_length, dtype=np.float32)
    tokens[:n], labels[:n] = ids[:-1], ids[1:]
    mask[first:n] = 1
    nbytes[:n] = label_bytes[cut:][:n] if len(label_bytes) else 0
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
        "position_ids": torch.arange(seq_length),
        "slot": torch.tensor(slot),
        "label_bytes": torch.from_numpy(nbytes),
    }


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    return mean, float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
