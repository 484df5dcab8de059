"""Megatron dist checkpoint -> CrystalCoder Hugging Face directory, streaming tensor by tensor."""

from __future__ import annotations

import json
import os
import resource
import shutil

import torch
from tqdm import tqdm

from megatron_ext.release import hf_format
from megatron_ext.release.dist_checkpoint_reader import DistCheckpointReader
from megatron_ext.release.safetensors_writer import write_sharded
from megatron_ext.tokenizer import BOS_ID, EOD_ID

GENERATION_CONFIG = {"_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": EOD_ID}


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (Linux VmHWM: since exec, unlike ru_maxrss, which also
    counts what a forking parent held)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_metadata_files(cfg, directory: str) -> None:
    """config.json (the release's keys and order), generation_config.json and the remote code."""
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_format.hf_config(cfg), f, indent=4)
    with open(os.path.join(directory, "generation_config.json"), "w") as f:
        json.dump(GENERATION_CONFIG, f, indent=4)
    for name in hf_format.MODELING_FILES:
        shutil.copy(os.path.join(hf_format.MODELING_DIR, name), os.path.join(directory, name))


def write_weights(
    reader: DistCheckpointReader, directory: str, dtype: torch.dtype, max_shard_bytes: int, show_progress: bool = True
) -> dict:
    """Stream every tensor of the checkpoint into sharded safetensors; returns the index."""
    cfg = reader.crystal
    names = hf_format.reference_names(cfg)
    entries = [(hf_format.HF_PREFIX + n, hf_format.hf_shape(n, cfg)) for n in names]
    tensors = (hf_format.to_hf(name, tensor) for name, tensor in reader.reference_tensors())
    with tqdm(total=len(entries), desc="tensors", unit="tensor", disable=not show_progress) as bar:
        return write_sharded(directory, entries, tensors, dtype, max_shard_bytes, progress=bar)
