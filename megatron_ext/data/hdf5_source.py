"""A source of ready samples in HDF5 files: LLM360's released Crystal data (CrystalCoderDatasets), read with h5py.

Layout (Cerebras's GptHDF5MapDataProcessor; LLM360/crystalcoder-data-prep): each `*.h5` file holds one
dataset "data" of shape (n, 3, width), int32, row 0 the input ids, row 1 the loss mask (Cerebras calls it
attention_mask: 0 on padding such as <fim_pad>), row 2 the labels. Samples are taken as they are: no
re-tokenisation, no end-of-document id added, FIM already applied offline; the mask and the labels reach
the loss as stored. A row whose labels are not its next inputs (labels[:-1] != ids[1:]) is counted, not
changed.

A source's samples are indexed file by file, row by row, its files (of all its directories) sorted by
file name (Cerebras Release 2.0.2's order; 1.9.1 used the filesystem's glob order, see docs/crystal_data.md), so
that phase 3's "SlimPajama/<Set>_train_packed" is the two released halves part0of2 + part1of2 merged back
(even and odd chunk numbers). `data_subset: "a-b[,c-d...]"` keeps the samples [int(n a), int(n b)) (and so
on) of the source, as 2.0.2 computes them. Sample k of the source (in the default blending order) is row
k mod n: the data are shuffled on disk, and an epoch reads them again in the same order.

Files are opened lazily, at most MAX_OPEN at once (the least recently used is closed); a DataLoader worker
opens its own handles (h5py handles do not survive a fork). A row that cannot be read mid-run (a file
damaged or gone) is counted and replaced by a row without loss, instead of ending the job.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass

import numpy as np

MAX_OPEN = 16  # file handles kept per process (h5py's chunk cache is per handle: 1 MB each by default)


class Hdf5SourceError(ValueError):
    """A directory or file that cannot serve as an HDF5 source; the message is one line naming it."""


@dataclass(frozen=True)
class Hdf5Files:
    """A source's files in reading order, their sample counts and their samples' width."""

    paths: tuple[str, ...]
    rows: tuple[int, ...]
    width: int

    @property
    def total(self) -> int:
        return sum(self.rows)


def scan(directories: list[str], where: str) -> Hdf5Files:
    """The files of the directories, sorted by file name, with every header checked (opening each file's
    header only: start-up does not read the data)."""
    import h5py

    found = []
    for directory in directories:
        if not os.path.isdir(directory):
            raise Hdf5SourceError(f"{where}: {directory}: no such directory")
        names = sorted(n for n in os.listdir(directory) if n.endswith(".h5"))
        found += [(name, os.path.join(directory, name)) for name in names]
    if not found:
        raise Hdf5SourceError(f"{where}: no *.h5 files in {', '.join(directories)}")
    found.sort(key=lambda pair: pair[0])  # by file name across directories (stable: directory order on ties)
    paths, rows, width = [], [], None
    for _, path in found:
        try:
            with h5py.File(path, "r") as f:
                if "data" not in f:
                    raise Hdf5SourceError(f"{where}: {path}: no dataset 'data' (found: {', '.join(f) or 'none'})")
                data = f["data"]
                shape, dtype = data.shape, data.dtype
        except OSError as e:
            raise Hdf5SourceError(f"{where}: {path}: not a readable HDF5 file ({e})") from None
        if len(shape) != 3 or shape[1] != 3 or dtype.kind not in "iu":
            raise Hdf5SourceError(
                f"{where}: {path}: 'data' is {dtype} of shape {shape}; expected integers of shape (n, 3, width): "
                "input ids, loss mask, labels"
            )
        if width is not None and shape[2] != width:
            raise Hdf5SourceError(f"{where}: {path}: samples {shape[2]} wide, the source's first file's {width}")
        width = shape[2]
        paths.append(path)
        rows.append(int(shape[0]))
    files = Hdf5Files(tuple(paths), tuple(rows), int(width))
    if files.total == 0:
        raise Hdf5SourceError(f"{where}: the source's {len(paths)} file(s) hold no samples")
    return files


def parse_subset(text, where: str) -> tuple[tuple[float, float], ...]:
    """data_subset "a-b[,c-d...]": increasing ranges within [0, 1]."""
    try:
        ranges = tuple(tuple(float(x) for x in part.split("-")) for part in str(text).strip().split(","))
        assert all(len(r) == 2 for r in ranges)
    except (ValueError, AssertionError):
        raise Hdf5SourceError(f"{where}: {text!r}: expected ranges such as '0.0-0.1' or '0.0-0.2,0.5-0.7'") from None
    previous = 0.0
    for start, end in ranges:
        if not (previous <= start <= end <= 1.0):
            raise Hdf5SourceError(f"{where}: {text!r}: ranges must be increasing, within 0-1")
        previous = end
    return ranges


def subset_rows(total: int, ranges: tuple[tuple[float, float], ...] | None) -> np.ndarray:
    """[start, stop) pairs of the rows kept, as Cerebras 2.0.2's segmenter bounds them (int(n x bound))."""
    if not ranges:
        return np.array([[0, total]], dtype=np.int64)
    return np.array([[int(total * a), int(total * b)] for a, b in ranges], dtype=np.int64)


class Hdf5Source:
    """The SourceStream interface over a source's HDF5 samples (phased_dataset.py, phase_schedule.py)."""

    def __init__(self, spec, seq_length: int):
        from megatron_ext.data.source_stream import source_key

        self.spec, self.seq_length, self.key = spec, seq_length, source_key(spec.name)
        self.files = spec.hdf5_files
        self._file_starts = np.cumsum([0, *self.files.rows])
        kept = subset_rows(self.files.total, spec.data_subset)
        self._kept = kept
        self._kept_ends = np.cumsum(kept[:, 1] - kept[:, 0])
        self.samples_per_epoch = spec.samples
        self.tokens_per_epoch = self.samples_per_epoch * seq_length
        self._open: collections.OrderedDict = collections.OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = collections.OrderedDict()  # each process opens its own handles
        return state

    def where(self, k: int) -> tuple[str, int]:
        """(file, row) of the source's sample k: row k mod n of the kept samples, files in name order."""
        i = k % self.samples_per_epoch
        part = int(np.searchsorted(self._kept_ends, i, side="right"))
        row = int(self._kept[part, 0]) + i - (int(self._kept_ends[part - 1]) if part else 0)
        f = int(np.searchsorted(self._file_starts, row, side="right")) - 1
        return self.files.paths[f], row - int(self._file_starts[f])

    def _handle(self, path: str):
        import h5py

        if os.getpid() != self._pid:  # a forked DataLoader worker: the parent's handles are not ours
            self._open, self._pid = collections.OrderedDict(), os.getpid()
        handle = self._open.pop(path, None)
        if handle is None:
            handle = h5py.File(path, "r")
            while len(self._open) >= MAX_OPEN:
                self._open.popitem(last=False)[1].close()
        self._open[path] = handle
        return handle

    def read(self, k: int) -> tuple[np.ndarray | None, int]:
        """(the (3, width) sample k as int64, or None where it cannot be read, and its epoch)."""
        path, row = self.where(k)
        try:
            sample = np.asarray(self._handle(path)["data"][row], dtype=np.int64)
        except (OSError, KeyError, ValueError):
            handle = self._open.pop(path, None)
            if handle is not None:
                handle.close()
            sample = None
        return sample, k // self.samples_per_epoch

    def open_epoch_of(self, k: int) -> None:
        """Nothing to build: the samples are indexed by their files' headers."""

    def locate(self, k: int) -> tuple[int, int]:
        return k // self.samples_per_epoch, k % self.samples_per_epoch

    def consumed(self, k: int) -> dict:
        """What the first k samples used (HDF5 samples hold no document boundaries to count)."""
        path, row = self.where(k) if k else (self.files.paths[0], 0)
        return {
            "samples": k,
            "tokens": k * self.seq_length,
            "epoch": k // self.samples_per_epoch,
            "epochs": k / self.samples_per_epoch,
            "samples_per_epoch": self.samples_per_epoch,
            "next_sample": f"{path}:{row}",
            "documents_per_file": {},
        }
