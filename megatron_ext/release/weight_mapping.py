"""Placing full (unsharded) Crystal weights, named as in the reference model, into Megatron shards.

Two layouts differ between the released/reference format and Megatron-Core:
- QKV: the reference concatenates [q; k; v]; Megatron groups rows per head, [q_h; k_h; v_h] for each h,
  so that a contiguous tensor-parallel slice holds whole heads.
- SwiGLU fc1: the reference keeps gate (c_fc2) and up (c_fc) apart; Megatron's fc1 on TP rank r holds
  [gate_r; up_r] and applies silu to the first half of its own slice.
Vocabulary rows are zero-padded up to Megatron's padded size.
"""

from __future__ import annotations

import torch

from megatron_ext.model.crystal_config import CrystalConfig

# The one map between the namings; the reader inverts it (REFERENCE_SOURCES). Megatron's name inside
# decoder.layers.N -> the reference part(s) inside block h.N; fc1 holds two reference tensors, [gate; up].
LAYER_PARTS: dict[str, str | tuple[str, str]] = {
    "input_layernorm": "ln_1",
    "self_attention.linear_qkv": "attn.c_attn",
    "self_attention.linear_proj": "attn.c_proj",
    "pre_mlp_layernorm": "ln_2",
    "mlp.linear_fc1": ("mlp.c_fc2", "mlp.c_fc"),  # gate (silu'd), up
    "mlp.linear_fc2": "mlp.c_proj",
}
# Outside the layers. output_layer is the last pipeline stage's copy of the tied embedding.
TOP_PARTS = {
    "embedding.word_embeddings": "wte",
    "output_layer": "wte",
    "decoder.final_layernorm": "ln_f",
}
LAYER_PREFIX = "decoder.layers."
# Reference part -> Megatron name: the inverse of LAYER_PARTS and TOP_PARTS (the embedding, not its copy).
REFERENCE_SOURCES = {
    **{ref: meg for meg, refs in LAYER_PARTS.items() for ref in (refs if isinstance(refs, tuple) else (refs,))},
    **{ref: meg for meg, ref in TOP_PARTS.items() if meg != "output_layer"},
}


def megatron_global_shapes(cfg: CrystalConfig) -> dict[str, tuple[int, ...]]:
    """The global (TP-joined) shape of every model tensor of a dist checkpoint but the embedding, the
    layers stacked on a leading axis; from the reference shapes through the map (fc1: gate and up rows)."""
    from megatron_ext.release.hf_format import reference_shape

    shapes = {}
    for meg, refs in LAYER_PARTS.items():
        for kind in ("weight", "bias"):
            parts = [reference_shape(f"h.0.{r}.{kind}", cfg) for r in (refs if isinstance(refs, tuple) else (refs,))]
            shapes[f"{LAYER_PREFIX}{meg}.{kind}"] = (cfg.num_layers, sum(p[0] for p in parts), *parts[0][1:])
    for kind in ("weight", "bias"):
        shapes[f"decoder.final_layernorm.{kind}"] = reference_shape(f"ln_f.{kind}", cfg)
    return shapes


def qkv_to_megatron(tensor: torch.Tensor, cfg: CrystalConfig) -> torch.Tensor:
    """[q; k; v] (rows) -> per-head [q_h; k_h; v_h]."""
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    parts = [t.reshape(heads, head_dim, *t.shape[1:]) for t in tensor.chunk(3, dim=0)]
    return torch.stack(parts, dim=1).reshape(tensor.shape)


def qkv_from_megatron(tensor: torch.Tensor, cfg: CrystalConfig) -> torch.Tensor:
    """Per-head [q_h; k_h; v_h] -> [q; k; v] (rows), the inverse of qkv_to_megatron."""
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    per_head = tensor.reshape(heads, 3, head_dim, *tensor.shape[1:])
    return per_head.transpose(0, 1).reshape(tensor.shape)


def _tensor_parallel_rank() -> tuple[int, int]:
    """(TP size, TP rank). Imported here, not at the top: the names and layouts above serve the checkpoint
    reader, which runs without Megatron-Core (checkpoint_files.py says why)."""
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _local_shard(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp, rank = _tensor_parallel_rank()
    return full.chunk(tp, dim=param.partition_dim)[rank]


def load_reference_weights(
    chunks: list[torch.nn.Module], ref: dict[str, torch.Tensor], cfg: CrystalConfig, padded_vocab: int
) -> None:
    """Copy a reference state dict into this rank's (unwrapped) Megatron model chunks, any TP / PP / VP."""
    tp, rank = _tensor_parallel_rank()
    with torch.no_grad():
        for chunk in chunks:
            layers = chunk.decoder.layers
            for name, param in chunk.named_parameters():
                base, kind = name.rsplit(".", 1)
                if base.startswith(LAYER_PREFIX):
                    local_idx, part = base.removeprefix(LAYER_PREFIX).split(".", 1)
                    block = f"h.{layers[int(local_idx)].layer_number - 1}."
                    refs = LAYER_PARTS[part]
                    if isinstance(refs, tuple):  # fc1: this rank's gate rows, then its up rows
                        gate, up = (ref[f"{block}{r}.{kind}"].chunk(tp, dim=0)[rank] for r in refs)
                        param.copy_(torch.cat((gate, up), dim=0))
                        continue
                    full = ref[f"{block}{refs}.{kind}"]
                    if refs == "attn.c_attn":
                        full = qkv_to_megatron(full, cfg)
                else:
                    full = ref[f"{TOP_PARTS[base]}.{kind}"]
                    if TOP_PARTS[base] == "wte":
                        full = torch.nn.functional.pad(full, (0, 0, 0, padded_vocab - full.shape[0]))
                param.copy_(_local_shard(full, param))
