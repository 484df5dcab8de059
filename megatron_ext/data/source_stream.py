"""One source's documents as an endless, randomly accessible sequence of packed samples, epoch after epoch.

Epoch e of a source, as Megatron-Core's GPTDataset builds one: its training documents in an order
shuffled by (seed, source, e), concatenated as stored (each ends with its end-of-document token), cut into
samples of seq_length + 1 tokens that overlap by one token (the label shift), and the samples read in a
shuffled order, so that a step does not hold consecutive pieces of one long document. The tail of an
epoch too short for a sample is not used. Sample k of the source lies in epoch k // samples_per_epoch, so a
source's position is one integer: the number of its samples consumed. No document repeats within an epoch.

A source's document pool: the documents of all its prefixes; with `subset`, a seeded random fraction of
them; minus the validation documents (a seeded random fraction, held out of every epoch).
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from megatron_ext.data.indexed_files import open_indexed
from megatron_ext.data.phases_config import SourceSpec

_POOL_STREAM, _EPOCH_STREAM = 0, 1


def source_key(name: str) -> int:
    """A stable number for a source name (seeds must not depend on the order sources are listed in)."""
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class Segment:
    """A run of one document's tokens inside a sample."""

    doc_id: int  # global document id within the source (over all its prefixes)
    doc_offset: int  # where the run starts inside the document
    start: int  # where it starts inside the sample
    length: int
    ends_document: bool  # the run includes the document's last (end-of-document) token


class SourceStream:
    def __init__(self, spec: SourceSpec, seq_length: int, seed: int, validation_fraction: float = 0.0,
                 split: str = "train"):
        self.spec, self.seq_length, self.seed, self.key = spec, seq_length, seed, source_key(spec.name)
        self.datasets = [open_indexed(prefix) for prefix in spec.prefixes]
        lengths = np.concatenate([ds.sequence_lengths for ds in self.datasets]).astype(np.int64)
        self._first_doc = np.cumsum([0] + [len(ds) for ds in self.datasets])
        pool = np.random.default_rng([seed, self.key, _POOL_STREAM]).permutation(len(lengths))
        pool = pool[: math.ceil(spec.subset * len(pool))]
        n_valid = int(round(validation_fraction * len(pool)))
        chosen = pool[:n_valid] if split == "valid" else pool[n_valid:]
        self.doc_ids = np.sort(chosen)
        self.doc_lengths = lengths[self.doc_ids]
        # Documents of the pool in each file (the pool's ids are sorted, the files' ids contiguous).
        self.pool_docs_per_file = np.diff(np.searchsorted(self.doc_ids, self._first_doc)).tolist()
        self.tokens_per_epoch = int(self.doc_lengths.sum())
        self.samples_per_epoch = max(self.tokens_per_epoch - 1, 0) // seq_length
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document ids in this epoch's order, cumulative token ends, the order samples are read in),
        kept for the two latest epochs."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, self.key, _EPOCH_STREAM, epoch])
            order = rng.permutation(len(self.doc_ids))
            index_type = np.int32 if self.samples_per_epoch < 2**31 else np.int64
            samples = rng.permutation(self.samples_per_epoch).astype(index_type)
            self._epochs[epoch] = (self.doc_ids[order], np.cumsum(self.doc_lengths[order]), samples)
            for old in sorted(self._epochs)[:-2]:
                del self._epochs[old]
        return self._epochs[epoch]

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, packed position within the epoch) of the source's sample k."""
        epoch, i = divmod(k, self.samples_per_epoch)
        return epoch, int(self._epoch(epoch)[2][i])

    def _read(self, doc_id: int, offset: int, length: int) -> np.ndarray:
        prefix = int(np.searchsorted(self._first_doc, doc_id, side="right")) - 1
        return self.datasets[prefix].get(int(doc_id - self._first_doc[prefix]), offset=offset, length=length)

    def sample(self, k: int) -> tuple[np.ndarray, list[Segment], int]:
        """Tokens [seq_length + 1] of sample k, the document runs they come from, and the epoch."""
        epoch, j = self.locate(k)
        return (*self.packed(epoch, j), epoch)

    def packed(self, epoch: int, j: int) -> tuple[np.ndarray, list[Segment]]:
        """The j-th sample of the epoch's packed token stream, and its document runs."""
        order, ends, _ = self._epoch(epoch)
        start, stop = j * self.seq_length, j * self.seq_length + self.seq_length + 1
        i = int(np.searchsorted(ends, start, side="right"))
        tokens, segments, position = [], [], start
        while position < stop:
            doc_start = int(ends[i - 1]) if i else 0
            offset = position - doc_start
            length = min(int(ends[i]) - position, stop - position)
            tokens.append(self._read(int(order[i]), offset, length))
            segments.append(Segment(int(order[i]), offset, position - start, length,
                                    ends_document=position + length == int(ends[i])))
            position += length
            i += 1
        return np.concatenate(tokens).astype(np.int64), segments

    def consumed(self, k: int) -> dict:
        """What the first k samples used: tokens, epochs (fractional), and documents: every document once
        per completed epoch, pro rata within the current one (its samples are read in shuffled order)."""
        epochs = k / self.samples_per_epoch
        files = {prefix: int(epochs * n) for prefix, n in zip(self.spec.prefixes, self.pool_docs_per_file)}
        return {"samples": k, "tokens": k * self.seq_length, "documents": int(epochs * len(self.doc_ids)),
                "documents_per_epoch": len(self.doc_ids), "epoch": k // self.samples_per_epoch, "epochs": epochs,
                "documents_per_file": files}
