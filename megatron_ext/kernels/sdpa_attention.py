"""Core attention through torch's ``scaled_dot_product_attention`` for the local layer spec.

Megatron-Core's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix (a baddbmm,
a masked softmax, a bmm). Without Transformer Engine or flash-attn, torch's SDPA still dispatches to its
built-in FlashAttention-2 / memory-efficient kernels on GPU (and to a fused C++ kernel on CPU): causal,
with Crystal's muP scale 1/head_dim passed as ``scale``; with an explicit mask (packed evaluation rows)
its masked kernels.
"""

from __future__ import annotations

import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class TorchSDPAttention(DotProductAttention):
    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        mask_type = attn_mask_type or self.attn_mask_type
        if packed_seq_params is not None or attention_bias is not None or mask_type != AttnMaskType.causal:
            raise ValueError("TorchSDPAttention covers causal attention over BSHD sequences only")
        s, b = query.shape[:2]
        # [s, b, heads, head_dim] -> [b, heads, s, head_dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        dropout = self.attention_dropout.p if self.training else 0.0
        # An explicit mask (packed evaluation rows: block-diagonal causal, Megatron's True = masked out)
        # replaces the causal one; SDPA's boolean mask means the opposite (True = attend).
        allowed = None if attention_mask is None else ~attention_mask
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=allowed is None, scale=self.softmax_scale
        )
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
