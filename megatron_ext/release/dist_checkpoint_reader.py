"""Read the model weights of a pretrain_crystal.py dist checkpoint one tensor at a time, without a process
group and without building the model.

Megatron-Core stores each weight as one global tensor (TP shards joined; all layers stacked on a leading
axis), in PyTorch distributed-checkpoint (DCP) files. DCP's own loaders read whole global tensors: for the
7B, all 32 layers of fc1 at once (11 GB in fp32). The reader here asks DCP's storage layer for one box of a
global tensor (one layer) instead, so that memory stays near one layer's tensor.
"""

from __future__ import annotations

import os

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_ext.checkpoint_files import (
    CheckpointError,
    Readers,
    checkpoint_path,
    damage_reason,
    incomplete_reason,
    read_common_state,
)
from megatron_ext.model.crystal_config import CrystalConfig
from megatron_ext.release.hf_format import reference_names
from megatron_ext.release.weight_mapping import (
    LAYER_PREFIX,
    REFERENCE_SOURCES,
    megatron_global_shapes,
    qkv_from_megatron,
)


class _BoxPlanner:
    """The two LoadPlanner calls FileSystemReader.read_data makes: where each read lands, and a commit."""

    def __init__(self, destinations: dict[str, torch.Tensor]):
        self.destinations = destinations

    def resolve_tensor(self, item):
        dest = self.destinations[item.dest_index.fqn]
        for dim, (offset, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            dest = dest.narrow(dim, offset, length)
        return dest

    def commit_tensor(self, item, tensor) -> None:
        pass


class DistCheckpointReader:
    def __init__(self, root: str, step: int | None = None, verify_integrity: bool = True):
        """root: a --save directory (its latest checkpoint, or step's), or one iter_N directory. verify_integrity:
        its files hashed against its manifest first (checkpoint_integrity.py); in a --save directory a changed
        latest checkpoint is passed over for the newest that verifies, with a line naming the file."""
        if not os.path.isdir(root):
            raise CheckpointError(f"--load {root}: no such directory")
        readers = Readers() if verify_integrity else None
        if os.path.isfile(os.path.join(root, "metadata.json")):
            path, reason = root, damage_reason(root, readers)
            if reason is not None:
                raise CheckpointError(reason)
        else:
            path = checkpoint_path(root, step, readers)
        if path is None:
            raise CheckpointError(
                f"--load {root}: no checkpoint (no latest_checkpointed_iteration.txt, no iter_* given)"
            )
        self.path = path
        common = read_common_state(path)
        self.iteration = common.get("iteration")
        self.tokenizer = common.get("tokenizer")
        try:
            self.crystal = CrystalConfig(**common["model_config"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: model_config is not a Crystal config ({e})") from None
        self._reader = FileSystemReader(path)
        try:
            self._metadata = self._reader.read_metadata()
        except (OSError, EOFError, RuntimeError) as e:
            raise CheckpointError(f"{path}: cannot read the DCP metadata ({e})") from None
        self._reader.set_up_storage_reader(self._metadata, is_coordinator=True)
        self._check_complete()
        self.padded_vocab = self._tensor_metadata("embedding.word_embeddings.weight").size[0]

    def _tensor_metadata(self, key: str) -> TensorStorageMetadata:
        md = self._metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise CheckpointError(f"{self.path} has no tensor {key!r}: not a Crystal model checkpoint")
        return md

    def _check_complete(self) -> None:
        """Every model tensor present with the config's shape, every file it lives in present and long
        enough: a truncated copy fails here, before any output is written."""
        for key, shape in megatron_global_shapes(self.crystal).items():
            got = tuple(self._tensor_metadata(key).size)
            if got != shape:
                raise CheckpointError(f"{self.path}: {key} has shape {got}, the model config implies {shape}")
        emb = tuple(self._tensor_metadata("embedding.word_embeddings.weight").size)
        if emb[1] != self.crystal.hidden_size or emb[0] < self.crystal.vocab_size:
            raise CheckpointError(f"{self.path}: embedding shape {emb} does not fit vocab {self.crystal.vocab_size}")
        reason = incomplete_reason(self.path, tensors="model")
        if reason:
            raise CheckpointError(reason)

    def read(self, key: str, layer: int | None = None) -> torch.Tensor:
        """The global tensor key, or its slice for one layer of the stacked decoder.layers.* tensors."""
        md = self._tensor_metadata(key)
        offsets, sizes = [0] * len(md.size), list(md.size)
        if layer is not None:
            offsets[0], sizes[0] = layer, 1
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        dest = torch.empty(sizes, dtype=md.properties.dtype)
        plan = LoadPlan(create_read_items_for_chunk_list(key, md, [box]))
        self._reader.read_data(plan, _BoxPlanner({key: dest})).wait()
        return dest[0] if layer is not None else dest

    def reference_tensors(self):
        """Yield (reference name, tensor) in the release's order, one tensor at a time (fc1, which holds
        both c_fc and c_fc2, is read once and its halves handed out in turn)."""
        cfg = self.crystal
        fc1: dict[str, torch.Tensor] = {}
        for name in reference_names(cfg):
            if not name.startswith("h."):
                base, kind = name.rsplit(".", 1)
                tensor = self.read(f"{REFERENCE_SOURCES[base]}.{kind}")
                yield name, tensor[: cfg.vocab_size] if name == "wte.weight" else tensor
                continue
            _, layer, rest = name.split(".", 2)
            part, kind = rest.rsplit(".", 1)
            source = f"{LAYER_PREFIX}{REFERENCE_SOURCES[part]}.{kind}"
            if part in ("mlp.c_fc", "mlp.c_fc2"):
                if kind not in fc1:
                    fc1[kind] = self.read(source, int(layer))
                gate, up = fc1[kind].chunk(2, dim=0)
                yield name, up if part == "mlp.c_fc" else gate
                if part == "mlp.c_fc2":
                    del fc1[kind]
                continue
            tensor = self.read(source, int(layer))
            yield name, qkv_from_megatron(tensor, cfg) if part == "attn.c_attn" else tensor
