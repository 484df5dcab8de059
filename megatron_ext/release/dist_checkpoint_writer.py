"""Write a weights-only pretrain_crystal.py dist checkpoint one tensor chunk at a time, without a process
group and without building the model: the import's counterpart of dist_checkpoint_reader.py.

The checkpoint is what Megatron-Core's dist_checkpointing.save writes for the model alone (torch_dist):
each weight one global tensor, the layers stacked on a leading axis and saved as one chunk per layer
(linear_fc1 as two, its gate rows and its up rows, as Megatron-Core shards the SwiGLU projection), the
local linear layers' empty extra state as one object per layer, common.pt and metadata.json. Megatron-Core
offers no way to save without holding every tensor at once (its writer stages them all before writing),
so the chunks go to PyTorch DCP's FileSystemWriter directly, which asks for each item's data only as it
writes it; with one file per item it also lets go of each tensor once written (a file's tensors are kept
until the file closes), so memory stays near the largest chunk.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

# dist_checkpointing's description of a torch_dist checkpoint (its metadata.json).
SHARDED_BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}  # fmt: skip


@dataclass(frozen=True)
class Chunk:
    """One box of a global tensor, produced only when the writer reaches it."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    dtype: torch.dtype = torch.float32


class _LazyItems:
    """The one SavePlanner call FileSystemWriter.write_data makes: an item's data, made on demand."""

    def __init__(self, chunks: dict[MetadataIndex, Chunk], objects: dict[str, bytes]):
        self.chunks, self.objects = chunks, objects

    def resolve_data(self, item: WriteItem):
        if item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[item.index.fqn])
        chunk = self.chunks[item.index]
        tensor = chunk.produce().to(chunk.dtype).contiguous()
        if tuple(tensor.shape) != chunk.sizes:
            raise ValueError(f"{chunk.key} at {chunk.offsets}: made {tuple(tensor.shape)}, planned {chunk.sizes}")
        return tensor


def serialized(obj) -> bytes:
    """An object entry's bytes, as dist_checkpointing writes a ShardedObject (torch.save)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_checkpoint(path: str, chunks: list[Chunk], objects: dict[str, bytes], common: dict) -> None:
    """The directory path as a complete dist checkpoint: chunks (together covering each global tensor),
    objects ({key: bytes}), common (common.pt's dict)."""
    os.makedirs(path, exist_ok=True)
    by_index, items, state = {}, [], {}
    for chunk in chunks:
        index = MetadataIndex(chunk.key, torch.Size(chunk.offsets))
        by_index[index] = chunk
        properties = TensorProperties(dtype=chunk.dtype)
        box = ChunkStorageMetadata(offsets=torch.Size(chunk.offsets), sizes=torch.Size(chunk.sizes))
        items.append(WriteItem(index=index, type=WriteItemType.SHARD,
                               tensor_data=TensorWriteData(chunk=box, properties=properties,
                                                           size=torch.Size(chunk.global_shape))))  # fmt: skip
        entry = state.setdefault(chunk.key, TensorStorageMetadata(properties, torch.Size(chunk.global_shape), []))
        entry.chunks.append(box)
    for key in objects:
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        state[key] = BytesStorageMetadata()
    writer = FileSystemWriter(path, single_file_per_rank=False, sync_files=True, thread_count=1)
    writer.set_up_storage_writer(True)
    (plan,) = writer.prepare_global_plan([writer.prepare_local_plan(SavePlan(items))])
    results = writer.write_data(plan, _LazyItems(by_index, objects)).wait()
    torch.save(common, os.path.join(path, "common.pt"))
    with open(os.path.join(path, "metadata.json"), "w") as f:
        json.dump(SHARDED_BACKEND, f)
    writer.finish(Metadata(state_dict_metadata=state), [results])  # .metadata last: the index of the rest
