"""Writing Megatron-Core indexed datasets (.bin/.idx) so that a complete-looking output is complete.

Everything is written under a temporary name beside the target and renamed at the end (.bin first,
.idx last: IndexedDataset needs both, so a reader never sees a half-written pair under the final name).
"""

from __future__ import annotations

import os


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def temp_prefix(prefix: str) -> str:
    return f"{prefix}.tmp{os.getpid()}"


def remove_outputs(prefix: str) -> None:
    for path in (bin_path(prefix), idx_path(prefix)):
        if os.path.exists(path):
            os.remove(path)


def publish(tmp: str, final: str) -> None:
    os.replace(bin_path(tmp), bin_path(final))
    os.replace(idx_path(tmp), idx_path(final))


def import_megatron_datasets():
    """megatron.core.datasets.indexed_dataset, imported without Megatron-Core's apex / Transformer
    Engine warnings, which mean nothing to a tokenising run."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def token_dtype(vocab_size: int) -> type:
    return import_megatron_datasets().DType.optimal_dtype(vocab_size)


def check_writable(prefix: str) -> None:
    """Raise OSError now, not after hours of tokenising, if the output directory cannot be written."""
    directory = os.path.dirname(os.path.abspath(prefix))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(20, "Not a directory", directory)
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write-probe-{os.getpid()}")
    with open(probe, "w"):
        pass
    os.remove(probe)


def merge(prefixes: list[str], output_prefix: str, dtype: type | None = None) -> None:
    """Concatenate indexed datasets, in order, with Megatron-Core's builder; atomic like every output."""
    indexed_dataset = import_megatron_datasets()
    if dtype is None:
        dtype = indexed_dataset.IndexedDataset(prefixes[0]).index.dtype
    tmp = temp_prefix(output_prefix)
    try:
        builder = indexed_dataset.IndexedDatasetBuilder(bin_path(tmp), dtype=dtype)
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(idx_path(tmp))
        publish(tmp, output_prefix)
    finally:
        remove_outputs(tmp)
