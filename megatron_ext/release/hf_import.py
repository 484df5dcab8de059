"""CrystalCoder Hugging Face directory -> a weights-only dist checkpoint that pretrain_crystal.py --load
continues from (iteration 0, fresh optimizer and schedule) at any TP / PP.

Streamed: each tensor of the checkpoint (one layer's slice of a stacked weight) is read from the Hugging
Face files, put in Megatron-Core's layout (weight_mapping.py) and written before the next is read, with
no model built and no process group; memory stays near the largest tensor (the embedding) whatever the
model's size. The saved tensors are global, so they load at any layout.
"""

from __future__ import annotations

import os

import torch

from megatron_ext import checkpoint_integrity
from megatron_ext.atomic_files import write_text_atomically
from megatron_ext.checkpoint_files import TRACKER, iteration_dir
from megatron_ext.checkpointing import checkpoint_metadata
from megatron_ext.model.crystal_gpt import padded_vocab_size
from megatron_ext.release.dist_checkpoint_writer import Chunk, serialized, write_checkpoint
from megatron_ext.release.hf_weights import HFWeights
from megatron_ext.release.weight_mapping import LAYER_PARTS, LAYER_PREFIX, megatron_global_shapes, qkv_to_megatron

# Megatron-Core's local linear layers save an empty extra state (kept for Transformer Engine's FP8 state),
# one object per layer, and a run's load asks for each of them.
LINEAR_PARTS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
EMPTY_EXTRA_STATE = [None]


def _layer_chunks(weights: HFWeights, part: str, kind: str, shape: tuple[int, ...]) -> list[Chunk]:
    """One chunk per layer of decoder.layers.<part>.<kind> (linear_fc1: its gate rows, then its up rows)."""
    cfg, key, refs = weights.cfg, f"{LAYER_PREFIX}{part}.{kind}", LAYER_PARTS[part]
    rest = tuple(0 for _ in shape[2:])
    chunks = []
    for layer in range(cfg.num_layers):
        if isinstance(refs, tuple):  # fc1: [gate; up], each half of the rows
            half = shape[1] // 2
            for i, ref in enumerate(refs):
                name = f"h.{layer}.{ref}.{kind}"
                chunks.append(Chunk(key, shape, (layer, i * half, *rest), (1, half, *shape[2:]),
                                    lambda name=name: weights[name].unsqueeze(0)))  # fmt: skip
            continue
        name = f"h.{layer}.{refs}.{kind}"
        if refs == "attn.c_attn":
            produce = lambda name=name: qkv_to_megatron(weights[name], cfg).unsqueeze(0)  # noqa: E731
        else:
            produce = lambda name=name: weights[name].unsqueeze(0)  # noqa: E731
        chunks.append(Chunk(key, shape, (layer, 0, *rest), (1, *shape[1:]), produce))
    return chunks


def checkpoint_chunks(weights: HFWeights, padded_vocab: int) -> list[Chunk]:
    """Every tensor chunk of the model's checkpoint, in Megatron-Core's names and layout."""
    cfg = weights.cfg
    embedding = (padded_vocab, cfg.hidden_size)
    chunks = [
        Chunk("embedding.word_embeddings.weight", embedding, (0, 0), embedding,
              lambda: torch.nn.functional.pad(weights["wte.weight"], (0, 0, 0, padded_vocab - cfg.vocab_size)))
    ]  # fmt: skip
    for key, shape in megatron_global_shapes(cfg).items():
        if key.startswith(LAYER_PREFIX):
            part, kind = key.removeprefix(LAYER_PREFIX).rsplit(".", 1)
            chunks += _layer_chunks(weights, part, kind, shape)
        else:
            kind = key.rsplit(".", 1)[1]
            chunks.append(Chunk(key, shape, (0,) * len(shape), shape, lambda kind=kind: weights[f"ln_f.{kind}"]))
    return chunks


def import_checkpoint(weights: HFWeights, save_dir: str, vocab_divisible_by: int, tokenizer: dict | None) -> str:
    """save_dir/iter_0000000 from the Hugging Face weights, its integrity.json (as a training's save), then the
    tracker; returns its path."""
    cfg = weights.cfg
    padded = padded_vocab_size(cfg.vocab_size, vocab_divisible_by)
    layers = cfg.num_layers
    objects = {
        f"{LAYER_PREFIX}{part}._extra_state/shard_{layer}_{layers}": serialized(EMPTY_EXTRA_STATE)
        for layer in range(layers)
        for part in LINEAR_PARTS
    }
    common = {**checkpoint_metadata(cfg, padded, tokenizer), "iteration": 0, "has_optimizer": False, "parts": []}
    path = iteration_dir(save_dir, 0)
    write_checkpoint(path, checkpoint_chunks(weights, padded), objects, common)
    checkpoint_integrity.write_manifest(path, {})
    write_text_atomically(os.path.join(save_dir, TRACKER), "0")
    return path
