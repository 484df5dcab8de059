"""What an evaluation hands the model: fixed rows of tokens, each scored into a slot.

An evaluation set is a map-style dataset of rows shaped like training samples (tokens, labels, loss mask,
position ids) plus `slot` (which scored unit the row's masked labels belong to: a held-out sample, one
choice of a multiple-choice question) and `label_bytes` (UTF-8 bytes per label). Every row goes through a
forward pass, the training's pipeline schedule in the loop or a Hugging Face model offline, and each slot
gets [summed loss in nats, tokens, bytes]; the set turns that table into figures. One table per set,
whatever the layout: reduced over data-parallel ranks on the last pipeline stage.

A set of short requests (the downstream tasks: 30-500 tokens each, against rows of 2048) is *packed*:
as many whole requests as fit share a row, each attending only to itself (a block-diagonal causal mask)
with its positions restarting at 0, so that its figures equal the one-request-per-row ones (within
float summation order) at a fraction of the rows. Such a row's `slot` is per token; the mask is derived
from the position ids alone (a segment starts where the position is 0), which is all that a pipeline
stage without data needs to be given.
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
    packed: bool  # rows hold several requests: the forward needs packed_attention_mask(position_ids)

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
    """[num_slots, SLOT_COLUMNS] of one micro-batch; slot [b] (a row per slot) or [b, s] (per token)."""
    mask = batch_mask.float()
    if slot.dim() == 2:
        columns = torch.stack((per_token_loss.float() * mask, mask, label_bytes.float() * mask), dim=2)
        return torch.zeros(num_slots, SLOT_COLUMNS, device=columns.device, dtype=columns.dtype).index_add_(
            0, slot.flatten(), columns.flatten(0, 1)
        )
    columns = torch.stack(
        ((per_token_loss.float() * mask).sum(dim=1), mask.sum(dim=1), (label_bytes.float() * mask).sum(dim=1)), dim=1
    )
    return torch.zeros(num_slots, SLOT_COLUMNS, device=columns.device, dtype=columns.dtype).index_add_(0, slot, columns)


class Piece(NamedTuple):
    """One request in a row: ids whose labels from position `scored_from` on are scored (ids[scored_from + 1:],
    the continuation). A task's bytes are its continuation's, counted by the set, so rows carry none."""

    ids: list[int]
    scored_from: int
    slot: int


def positions_taken(length: int, seq_length: int) -> int:
    """Row positions a request of `length` ids takes (its labels); longer than a row, it loses its start."""
    return min(length, seq_length + 1) - 1


def pack(lengths: list[int], seq_length: int, together: bool = True) -> list[list[int]]:
    """Rows of request indices, in order: as many whole requests as fit seq_length positions (first fit in
    order, so that a row's requests are neighbours: one question's choices share rows); one per row when
    not together."""
    rows: list[list[int]] = []
    used = seq_length
    for i, length in enumerate(lengths):
        taken = positions_taken(length, seq_length)
        if not together or used + taken > seq_length:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += taken
    return rows


def packed_row(pieces: list[Piece], seq_length: int, pad_id: int) -> dict:
    """A row of an evaluation set holding these requests one after the other (a request longer than the
    row loses its start), then padding: position ids restart at 0 with each request and with the padding
    (its own segment), and `slot` names each token's request."""
    tokens = np.full(seq_length, pad_id, dtype=np.int64)
    labels = np.full(seq_length, pad_id, dtype=np.int64)
    mask = np.zeros(seq_length, dtype=np.float32)
    nbytes = np.zeros(seq_length, dtype=np.float32)
    positions = np.zeros(seq_length, dtype=np.int64)
    slots = np.zeros(seq_length, dtype=np.int64)
    at = 0
    for piece in pieces:
        ids = np.asarray(piece.ids, dtype=np.int64)
        cut = max(len(ids) - (seq_length + 1), 0)
        ids, first = ids[cut:], max(piece.scored_from - cut, 0)
        n = len(ids) - 1
        if at + n > seq_length:
            raise ValueError(f"requests of {at + n} positions packed into a row of {seq_length}")
        tokens[at : at + n], labels[at : at + n] = ids[:-1], ids[1:]
        mask[at + first : at + n] = 1
        positions[at : at + n] = np.arange(n)
        slots[at : at + n] = piece.slot
        at += n
    positions[at:] = np.arange(seq_length - at)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
        "position_ids": torch.from_numpy(positions),
        "slot": torch.from_numpy(slots),
        "label_bytes": torch.from_numpy(nbytes),
    }


def packed_attention_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] bool, True where query i may attend key j: the same request (a segment starts where
    the position is 0) and j <= i. Megatron-Core's convention is the opposite (True: masked out)."""
    segment = (position_ids == 0).cumsum(dim=1)
    same = segment[:, :, None] == segment[:, None, :]
    s = position_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    return (same & causal)[:, None]


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    mean = float(values.mean())
    return mean, float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
