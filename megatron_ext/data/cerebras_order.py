"""Cerebras's sample order for a phase over HDF5 sources: the order Crystal read its released data in.

Cerebras/modelzoo's `Mixture(datasets, weights, interleave=True, seed=shuffle_seed)` (data/common/
h5_map_dataset/readers.py, Release 2.0.2; LLM360/crystalcoder-train's params: `shuffle: false`,
`shuffle_seed: 1`), re-derived here from its description (docs/crystal_data.md):
- the weights are normalised; one epoch of the mixture is total = max(len(d) / w over the sources of
  weight > 0.05) samples, and source i takes int(total * w_i) of them, its samples 0, 1, ... taken modulo
  its length (a small source wraps);
- the positions 0..N-1 of the sources' blocks laid end to end are shuffled with
  numpy.random.default_rng(seed).shuffle, then, block by block, the positions holding a block's values
  get the block's values in increasing order: the sources are interleaved at random while each source is
  read in its own order.
Cerebras's sampler then reads the mixture from the resume point (global step x batch) in order, and with
`repeat: true` starts it again. Here a phase's step t reads mixture positions [G t', G (t' + 1)), t' = t
mod floor(N / G): an epoch holds whole global batches and its last N mod G positions are not read (an
inference: Cerebras's per-system batch sampler drops its last partial batch; docs/crystal_data.md lists it among
the guesses).

The mixture is built once per process per phase (N int32 positions, int64 past 2^31: 4 bytes a sample of
the epoch, 1.8 GB for Crystal's phase 2) and kept in a small cache, not in the schedule, which the samplers
copy.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

EPOCH_WEIGHT_FLOOR = 0.05  # sources at or below this weight do not set the epoch's length (Cerebras's rule)


@dataclass(frozen=True)
class Mixture:
    values: np.ndarray  # per position, its value in the sources' blocks laid end to end
    starts: np.ndarray  # [0, count_0, count_0 + count_1, ...]
    lengths: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.values)

    def at(self, position: int) -> tuple[int, int]:
        """(source index in the phase's blend order, the source's sample) at a position of the epoch."""
        value = int(self.values[position])
        source = int(np.searchsorted(self.starts, value, side="right")) - 1
        return source, (value - int(self.starts[source])) % self.lengths[source]

    def source_counts(self, start: int, stop: int) -> np.ndarray:
        """How many of the positions [start, stop) of the epoch each source holds (a jump to a start point
        in one pass over the positions, where reading them one by one would take minutes for Crystal)."""
        counts = np.zeros(len(self.lengths), dtype=np.int64)
        for first in range(start, stop, 1 << 24):  # in chunks: bounded memory for a phase of 10^8 positions
            values = self.values[first : min(first + (1 << 24), stop)]
            counts += np.bincount(np.searchsorted(self.starts, values, side="right") - 1, minlength=len(counts))
        return counts


@functools.lru_cache(maxsize=4)
def mixture(lengths: tuple[int, ...], weights: tuple[float, ...], seed: int) -> Mixture:
    """lengths: each source's samples (after data_subset); weights: normalised, in the blend's order."""
    total = max(n / w for n, w in zip(lengths, weights) if w > EPOCH_WEIGHT_FLOOR)
    counts = [int(total * w) for w in weights]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    # Cerebras shuffles an int64 arange; Generator.shuffle's draws depend on the length alone, so an int32
    # one gets the same permutation (the tests compare with the int64 construction) in half the memory.
    values = np.arange(int(starts[-1]), dtype=np.int32 if starts[-1] < 2**31 else np.int64)
    np.random.default_rng(seed).shuffle(values)
    # Re-sort within each source's block, in place and in chunks: the j-th position (in order) holding a
    # value of block i gets block i's j-th value. Peak memory: the array and one chunk (Crystal's phase 2:
    # 452M positions, 1.8 GB).
    taken = starts[:-1].copy()
    for first in range(0, len(values), 1 << 24):
        chunk = values[first : first + (1 << 24)]
        block = np.searchsorted(starts, chunk, side="right") - 1
        for i in np.unique(block):
            where = np.flatnonzero(block == i)
            chunk[where] = np.arange(taken[i], taken[i] + len(where))
            taken[i] += len(where)
    return Mixture(values, starts, tuple(lengths))
