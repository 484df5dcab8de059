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
import os
import threading
import zlib
from dataclasses import dataclass

import numpy as np

from megatron_ext.data.index_cache import IndexCache, smallest_index_type
from megatron_ext.data.indexed_files import file_shape, open_indexed
from megatron_ext.data.phases_config import SourceSpec

INDEX_VERSION = 1  # of the on-disk indices' layout; a change rebuilds every cache

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


class Runs:
    """A sample's document runs as arrays (one gather builds them); iterating gives Segments, made only
    where they are asked for (FIM, tools/data_trace.py)."""

    __slots__ = ("doc_ids", "doc_offsets", "starts", "lengths", "ends_document")

    def __init__(self, doc_ids, doc_offsets, starts, lengths, ends_document):
        self.doc_ids, self.doc_offsets, self.starts = doc_ids, doc_offsets, starts
        self.lengths, self.ends_document = lengths, ends_document

    def __iter__(self):
        columns = (self.doc_ids, self.doc_offsets, self.starts, self.lengths, self.ends_document)
        for values in zip(*(c.tolist() for c in columns)):
            yield Segment(*values)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(start, start + length) over the runs, without a Python loop."""
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(int(lengths.sum()))


def _modified(prefix: str) -> list[int]:
    return [os.stat(prefix + ext).st_mtime_ns for ext in (".idx", ".bin")]


class SourceStream:
    def __init__(
        self,
        spec: SourceSpec,
        seq_length: int,
        seed: int,
        validation_fraction: float = 0.0,
        split: str = "train",
        cache_dir: str | None = None,
    ):
        """cache_dir: where the source's indices live on disk (built once, memory-mapped by every process
        that reads the source); None builds them in this process's memory."""
        self.spec, self.seq_length, self.seed, self.key = spec, seq_length, seed, source_key(spec.name)
        self.validation_fraction, self.split = validation_fraction, split
        self._open_files()
        self.cache = IndexCache(cache_dir, self._identity()) if cache_dir else None
        self.doc_ids = self._index(f"{split}_documents", self._build_documents)
        self.doc_lengths = self._index(f"{split}_lengths", self._build_lengths)
        meta = self.cache.meta(f"{split}_meta", self._build_meta) if self.cache else self._build_meta()
        self.pool_docs_per_file = meta["pool_docs_per_file"]  # documents of the pool in each file
        self.tokens_per_epoch = meta["tokens_per_epoch"]
        self.samples_per_epoch = max(self.tokens_per_epoch - 1, 0) // seq_length
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._ahead: threading.Thread | None = None

    def _open_files(self) -> None:
        self.datasets = [open_indexed(prefix) for prefix in self.spec.prefixes]
        self._first_doc = np.cumsum([0] + [len(ds) for ds in self.datasets])
        # Each file's tokens and where its documents start in them, both memory-mapped: a sample's runs
        # are gathered at once (IndexedDataset.get reads one document per call).
        self._tokens = [
            # A plain view of the map: np.memmap's own indexing costs more than the gather itself.
            np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r").view(np.ndarray)
            if os.path.getsize(prefix + ".bin") else np.zeros(0, dtype=ds.index.dtype)  # empty: cannot be mapped
            for prefix, ds in zip(self.spec.prefixes, self.datasets)
        ]  # fmt: skip
        self._pointers = [ds.index.sequence_pointers for ds in self.datasets]  # in bytes

    def __getstate__(self) -> dict:
        """For a DataLoader worker started by spawn or forkserver (Python 3.14's default): the files and the
        cached indices are mapped again there, not copied through the pickle (in-memory indices are)."""
        opened = ("datasets", "_first_doc", "_tokens", "_pointers")  # by _open_files
        state = {k: v for k, v in self.__dict__.items() if k not in opened}
        state["_epochs"], state["_ahead"] = {}, None
        if self.cache is not None:
            del state["doc_ids"], state["doc_lengths"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open_files()
        if self.cache is not None:
            self.doc_ids = self.cache.load(f"{self.split}_documents")
            self.doc_lengths = self.cache.load(f"{self.split}_lengths")

    def _identity(self) -> dict:
        """What the indices depend on: a change to any of it builds new ones (never reuses old ones)."""
        return {
            "version": INDEX_VERSION,
            "source": self.spec.name,
            # A rewritten file (re-preprocessed, even to the same shape) has a new modification time.
            "files": [[os.path.abspath(p), *file_shape(p), _modified(p)] for p in self.spec.prefixes],
            "subset": self.spec.subset,
            "seed": self.seed,
            "validation_fraction": self.validation_fraction,
            "seq_length": self.seq_length,
        }

    def _index(self, name: str, build) -> np.ndarray:
        return self.cache.array(name, build, int(self._first_doc[-1])) if self.cache else build()

    def _build_documents(self) -> np.ndarray:
        """The pool's document ids (sorted): all, or a seeded subset, minus (or only) the held-out ones."""
        total = int(self._first_doc[-1])
        if self.spec.subset == 1.0 and int(round(self.validation_fraction * total)) == 0:
            # Every document (Crystal's recipe holds none out): the ids the permutation below would sort back.
            return np.arange(total if self.split == "train" else 0, dtype=smallest_index_type(total))
        pool = np.random.default_rng([self.seed, self.key, _POOL_STREAM]).permutation(total)
        pool = pool[: math.ceil(self.spec.subset * len(pool))]
        n_valid = int(round(self.validation_fraction * len(pool)))
        chosen = pool[:n_valid] if self.split == "valid" else pool[n_valid:]
        mask = np.zeros(total, dtype=bool)  # the chosen ids in order: a linear pass, not a sort
        mask[chosen] = True
        return np.flatnonzero(mask).astype(smallest_index_type(total))

    def _build_lengths(self) -> np.ndarray:
        lengths = np.concatenate([ds.sequence_lengths for ds in self.datasets])
        return lengths[self.doc_ids].astype(np.int32)

    def _build_meta(self) -> dict:
        per_file = np.diff(np.searchsorted(self.doc_ids, self._first_doc)).tolist()
        return {"pool_docs_per_file": per_file, "tokens_per_epoch": int(self.doc_lengths.sum(dtype=np.int64))}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(document ids in this epoch's order, cumulative token ends, the order samples are read in),
        kept for the two epochs used last."""
        arrays = self._epochs.pop(epoch, None)
        if arrays is None:
            arrays = self._epoch_arrays(epoch)
        self._epochs[epoch] = arrays  # the most recently used last
        while len(self._epochs) > 2:
            del self._epochs[next(iter(self._epochs))]
        return arrays

    def _epoch_arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.cache is None:
            return self._build_epoch(epoch)
        names = [f"{self.split}_epoch{epoch}_{part}" for part in ("documents", "ends", "samples")]
        if not all(self.cache.has(n) for n in names):
            with self.cache.lock():
                if not all(self.cache.has(n) for n in names):
                    with self.cache.announced(f"{self.split}_epoch{epoch} orders", len(self.doc_ids)):
                        arrays = self._build_epoch(epoch)
                    for name, array in zip(names, arrays):
                        self.cache.write(name, array)
        return tuple(self.cache.load(n) for n in names)

    def prepare(self, epoch: int) -> None:
        """Build (or find) an epoch's indices without reading a sample: tools/build_data_cache.py."""
        self._epoch_arrays(epoch)

    def open_epoch_of(self, k: int) -> None:
        """Have the indices of the epoch holding sample k at hand (built or mapped) before it is read."""
        self._epoch(k // self.samples_per_epoch)

    def _build_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.key, _EPOCH_STREAM, epoch])
        order = rng.permutation(len(self.doc_ids))
        samples = rng.permutation(self.samples_per_epoch).astype(smallest_index_type(self.samples_per_epoch))
        return self.doc_ids[order], np.cumsum(self.doc_lengths[order], dtype=np.int64), samples

    def _build_ahead(self, epoch: int) -> None:
        """Past half of an epoch, build the next one's indices in a background thread (with a cache: the
        first reader to get there builds them, on disk, for everyone)."""
        if self.cache is None or self._ahead is not None and self._ahead.is_alive():
            return
        self._ahead = threading.Thread(target=self._epoch_arrays, args=(epoch,), daemon=True)
        self._ahead.start()

    def locate(self, k: int) -> tuple[int, int]:
        """(epoch, packed position within the epoch) of the source's sample k."""
        epoch, i = divmod(k, self.samples_per_epoch)
        if 2 * i >= self.samples_per_epoch and epoch + 1 not in self._epochs:
            self._build_ahead(epoch + 1)
        return epoch, int(self._epoch(epoch)[2][i])

    def sample(self, k: int) -> tuple[np.ndarray, Runs, int]:
        """Tokens [seq_length + 1] of sample k, the document runs they come from, and the epoch."""
        epoch, j = self.locate(k)
        return (*self.packed(epoch, j), epoch)

    def packed(self, epoch: int, j: int) -> tuple[np.ndarray, Runs]:
        """The j-th sample of the epoch's packed token stream, and its document runs."""
        order, ends, _ = self._epoch(epoch)
        start, stop = j * self.seq_length, j * self.seq_length + self.seq_length + 1
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(ends, stop - 1, side="right"))  # the document holding the last token
        docs = np.asarray(order[first : last + 1], dtype=np.int64)
        doc_ends = np.asarray(ends[first : last + 1], dtype=np.int64)
        doc_starts = np.empty_like(doc_ends)
        doc_starts[0] = ends[first - 1] if first else 0
        doc_starts[1:] = doc_ends[:-1]
        run_starts = np.maximum(doc_starts, start)
        run_ends = np.minimum(doc_ends, stop)
        offsets, lengths = run_starts - doc_starts, run_ends - run_starts
        tokens = np.empty(stop - start, dtype=np.int64)
        if len(self.datasets) == 1:
            files, local = np.zeros(len(docs), dtype=np.int64), docs
        else:
            files = np.searchsorted(self._first_doc, docs, side="right") - 1
            local = docs - self._first_doc[files]
        for f in np.unique(files).tolist():
            mine = files == f
            itemsize = self._tokens[f].dtype.itemsize
            in_file = self._pointers[f][local[mine]] // itemsize + offsets[mine]
            tokens[_ranges(run_starts[mine] - start, lengths[mine])] = self._tokens[f][_ranges(in_file, lengths[mine])]
        runs = Runs(docs, offsets, run_starts - start, lengths, run_ends == doc_ends)
        return tokens, runs

    def consumed(self, k: int) -> dict:
        """What the first k samples used: tokens, epochs (fractional), and documents: every document once
        per completed epoch, pro rata within the current one (its samples are read in shuffled order)."""
        epochs = k / self.samples_per_epoch
        files = {prefix: int(epochs * n) for prefix, n in zip(self.spec.prefixes, self.pool_docs_per_file)}
        return {
            "samples": k,
            "tokens": k * self.seq_length,
            "documents": int(epochs * len(self.doc_ids)),
            "documents_per_epoch": len(self.doc_ids),
            "epoch": k // self.samples_per_epoch,
            "epochs": epochs,
            "documents_per_file": files,
        }
