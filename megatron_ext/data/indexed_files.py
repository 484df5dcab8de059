"""The indexed datasets (.bin / .idx) that sources read, opened with Megatron-Core's IndexedDataset
(memory-mapped: opening reads the index header, not the data)."""

from __future__ import annotations

import os
import warnings


def open_indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with warnings.catch_warnings():  # its notes on opening say nothing to a user
        warnings.simplefilter("ignore")
        return IndexedDataset(prefix)


def file_shape(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of an indexed dataset, from its index header and data file size (no scan)."""
    dataset = open_indexed(prefix)
    return len(dataset), os.path.getsize(prefix + ".bin") // dataset.index.dtype_size
