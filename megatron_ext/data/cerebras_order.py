"""Cerebras's sample order for a phase over HDF5 sources: the order Crystal read its released data in.

Cerebras/modelzoo's `Mixture(datasets, weights, interleave=True, seed=shuffle_seed)` (data/common/
h5_map_dataset/readers.py, Release 2.0.2; LLM360/crystalcoder-train's params: `shuffle: false`,
`shuffle_seed: 1`), re-derived here from its description (docs/data.md):
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
inference: Cerebras's per-system batch sampler drops its last partial batch; docs/data.md lists it among
the guesses).

The mixture is built once per process per phase (N int32 or int64 positions: 4-8 bytes a sample of the
epoch) and kept in a small cache, not in the schedule, which the samplers copy.
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


@functools.lru_cache(maxsize=4)
def mixture(lengths: tuple[int, ...], weights: tuple[float, ...], seed: int) -> Mixture:
    """lengths: each source's samples (after data_subset); weights: normalised, in the blend's order."""
    total = max(n / w for n, w in zip(lengths, weights) if w > EPOCH_WEIGHT_FLOOR)
    counts = [int(total * w) for w in weights]
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    positions = np.arange(int(starts[-1]))  # int64, as Cerebras shuffles it: the same permutation
    np.random.default_rng(seed).shuffle(positions)
    block = np.searchsorted(starts, positions, side="right") - 1
    values = np.empty(len(positions), dtype=np.int32 if len(positions) < 2**31 else np.int64)
    for i in range(len(counts)):
        values[block == i] = np.arange(starts[i], starts[i + 1])
    return Mixture(values, starts, tuple(lengths))
