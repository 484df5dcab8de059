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
from megatron.core import parallel_state

from megatron_ext.model.crystal_config import CrystalConfig

# Megatron name inside a layer -> reference name inside block h.N.
_LAYER_NAMES = {
    "input_layernorm.weight": "ln_1.weight",
    "input_layernorm.bias": "ln_1.bias",
    "self_attention.linear_qkv.weight": "attn.c_attn.weight",
    "self_attention.linear_qkv.bias": "attn.c_attn.bias",
    "self_attention.linear_proj.weight": "attn.c_proj.weight",
    "self_attention.linear_proj.bias": "attn.c_proj.bias",
    "pre_mlp_layernorm.weight": "ln_2.weight",
    "pre_mlp_layernorm.bias": "ln_2.bias",
    "mlp.linear_fc2.weight": "mlp.c_proj.weight",
    "mlp.linear_fc2.bias": "mlp.c_proj.bias",
}
_FC1 = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")
_TOP_NAMES = {
    "embedding.word_embeddings.weight": "wte.weight",
    "output_layer.weight": "wte.weight",  # tied: the last pipeline stage's copy of the embedding
    "decoder.final_layernorm.weight": "ln_f.weight",
    "decoder.final_layernorm.bias": "ln_f.bias",
}


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


def _local_shard(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    return full.chunk(tp, dim=param.partition_dim)[rank]


def load_reference_weights(
    chunks: list[torch.nn.Module], ref: dict[str, torch.Tensor], cfg: CrystalConfig, padded_vocab: int
) -> None:
    """Copy a reference state dict into this rank's (unwrapped) Megatron model chunks, any TP / PP / VP."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for chunk in chunks:
            layers = chunk.decoder.layers
            for name, param in chunk.named_parameters():
                if name.startswith("decoder.layers."):
                    local_idx, suffix = name.removeprefix("decoder.layers.").split(".", 1)
                    block = f"h.{layers[int(local_idx)].layer_number - 1}."
                    if suffix in _FC1:
                        kind = suffix.rsplit(".", 1)[1]
                        gate = ref[block + "mlp.c_fc2." + kind].chunk(tp, dim=0)[rank]
                        up = ref[block + "mlp.c_fc." + kind].chunk(tp, dim=0)[rank]
                        param.copy_(torch.cat((gate, up), dim=0))
                        continue
                    full = ref[block + _LAYER_NAMES[suffix]]
                    if suffix.startswith("self_attention.linear_qkv"):
                        full = qkv_to_megatron(full, cfg)
                else:
                    full = ref[_TOP_NAMES[name]]
                    if _TOP_NAMES[name] == "wte.weight":
                        full = torch.nn.functional.pad(full, (0, 0, 0, padded_vocab - full.shape[0]))
                param.copy_(_local_shard(full, param))
