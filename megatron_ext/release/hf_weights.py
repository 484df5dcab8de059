"""Read the weights of a CrystalCoder Hugging Face directory lazily, tensor by tensor, in the reference
naming and layout. Accepts safetensors or PyTorch .bin files, sharded (with an index) or single."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import torch

from megatron_ext.release import hf_format
from megatron_ext.release.hf_format import FormatError

_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# The release also stores a copy of the tied lm_head and GPT-2's attention-mask buffers; none are weights.
_IGNORED = re.compile(r"^(lm_head\.weight|transformer\.h\.\d+\.attn\.(bias|masked_bias))$")


class HFWeights(Mapping):
    def __init__(self, hf_dir: str, cfg):
        self.hf_dir, self.cfg = hf_dir, cfg
        self._open: dict[str, object] = {}  # before _weight_map, which opens a lone weights file
        self.weight_map = self._weight_map()
        expected = {hf_format.HF_PREFIX + n: n for n in hf_format.reference_names(cfg)}
        missing = sorted(set(expected) - set(self.weight_map))
        if missing:
            raise FormatError(f"{hf_dir}: {len(missing)} tensor(s) missing, first {missing[0]}")
        unexpected = sorted(n for n in self.weight_map if n not in expected and not _IGNORED.match(n))
        if unexpected:
            raise FormatError(f"{hf_dir}: unexpected tensor {unexpected[0]}: not a CrystalCoder checkpoint")
        self._names = [n for n in expected.values()]
        for name in self._names:
            shape = tuple(self._shape(hf_format.HF_PREFIX + name))
            want = hf_format.hf_shape(name, cfg)
            if shape != want:
                raise FormatError(
                    f"{hf_dir}: {hf_format.HF_PREFIX + name} has shape {shape}, config.json implies {want}"
                )

    def _weight_map(self) -> dict[str, str]:
        for index in _INDEX_FILES:
            path = os.path.join(self.hf_dir, index)
            if os.path.isfile(path):
                with open(path) as f:
                    weight_map = json.load(f)["weight_map"]
                for file in sorted(set(weight_map.values())):
                    if not os.path.isfile(os.path.join(self.hf_dir, file)):
                        raise FormatError(f"{path} names {file}, which is missing")
                return weight_map
        for single in _SINGLE_FILES:
            if os.path.isfile(os.path.join(self.hf_dir, single)):
                return {name: single for name in self._handle(single).keys()}
        raise FormatError(f"{self.hf_dir}: no weights ({', '.join(_SINGLE_FILES + _INDEX_FILES)})")

    def _handle(self, file: str):
        """A safetensors handle (lazy per tensor) or a memory-mapped .bin state dict."""
        if file not in self._open:
            path = os.path.join(self.hf_dir, file)
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                self._open[file] = safe_open(path, framework="pt")
            else:
                self._open[file] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[file]

    def _shape(self, hf_name: str):
        handle = self._handle(self.weight_map[hf_name])
        if isinstance(handle, dict):
            return handle[hf_name].shape
        return handle.get_slice(hf_name).get_shape()

    def __getitem__(self, name: str) -> torch.Tensor:
        hf_name = hf_format.HF_PREFIX + name
        tensor = _read_one(os.path.join(self.hf_dir, self.weight_map[hf_name]), hf_name)
        return hf_format.from_hf(name, tensor).float()

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _read_one(path: str, name: str) -> torch.Tensor:
    """One tensor, in memory of its own, its file's mapping closed before it is returned: the pages of a
    mapped file count against the process for as long as the mapping is open, so reading a whole
    checkpoint through handles kept open would hold all of it resident (measured: 1.1x the model on the
    import), where this holds one tensor."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name).clone()
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    tensor = state[name].clone()
    del state
    return tensor
