"""Sharded safetensors written one tensor at a time, plus the Hugging Face index.

safetensors' own save_file serialises a dict of tensors that are all in memory at once; an exporter that
must stay near one tensor's memory for a 7B model cannot use it. The format is simple and fixed (an
8-byte little-endian header length, a JSON header giving each tensor's dtype, shape and byte range, then
the raw bytes back to back), and every file written here is read back by safetensors itself in the tests.
Shapes are known before any tensor is read, so each shard's header is written first and the data streamed.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
INDEX_NAME = "model.safetensors.index.json"


def _plan_shards(entries: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_bytes: int) -> list[list]:
    shards, current, size = [], [], 0
    for name, shape in entries:
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    return shards + [current] if current else shards


def _header(shard: list, dtype: str) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, nbytes in shard:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keeps the data 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_sharded(
    directory: str,
    entries: list[tuple[str, tuple[int, ...]]],
    tensors,
    dtype: torch.dtype,
    max_shard_bytes: int,
    progress=None,
) -> dict:
    """Write the tensors (an iterator of (name, tensor) in the order of entries) as
    model-0000i-of-0000n.safetensors files and the index; returns the index."""
    shards = _plan_shards(entries, torch.tensor([], dtype=dtype).element_size(), max_shard_bytes)
    weight_map, total = {}, 0
    tensors = iter(tensors)
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with open(os.path.join(directory, filename), "wb") as f:
            f.write(_header(shard, _DTYPES[dtype]))
            for name, shape, nbytes in shard:
                got_name, tensor = next(tensors)
                if got_name != name or tuple(tensor.shape) != tuple(shape):
                    raise AssertionError(f"expected {name} {shape}, got {got_name} {tuple(tensor.shape)}")
                data = tensor.detach().to(dtype).contiguous()
                f.write(data.view(torch.uint8).numpy().data)  # bf16 has no numpy dtype; its bytes do
                weight_map[name] = filename
                total += nbytes
                if progress is not None:
                    progress.update(1)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
    return index
