"""Crystal in plain PyTorch, written from the released architecture and independent of Megatron-Core.

Tests hold the Megatron model against it, and the Hugging Face export is checked against it. Parameter
names follow the released checkpoint (GPT-2 naming) but weights are stored as ``nn.Linear`` [out, in];
the HF format's Conv1D stores [in, out], a transpose the exporter does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.model.crystal_config import CrystalConfig


def rotary_angles(seq_length: int, rotary_dim: int, base: float) -> torch.Tensor:
    """theta[pos, i] = pos / base^(2i / rotary_dim), i < rotary_dim / 2."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    return torch.outer(torch.arange(seq_length, dtype=torch.float64), inv_freq)


def apply_interleaved_rotary(x: torch.Tensor, angles: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """GPT-J style: rotate the pairs (x[2i], x[2i+1]) of the first rotary_dim channels by angle i.

    x: [batch, heads, seq, head_dim]; angles: [seq, rotary_dim / 2].
    """
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: CrystalConfig):
        super().__init__()
        self.cfg = cfg
        self.c_attn = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # [q; k; v]
        self.c_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        n, d = self.cfg.num_attention_heads, self.cfg.head_dim
        q, k, v = (t.view(b, s, n, d).transpose(1, 2) for t in self.c_attn(x).split(h, dim=-1))
        q = apply_interleaved_rotary(q, angles, self.cfg.rotary_dim)
        k = apply_interleaved_rotary(k, angles, self.cfg.rotary_dim)
        scores = (q @ k.transpose(-1, -2)) * self.cfg.softmax_scale
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(dim=-1)
        return self.c_proj((probs @ v).transpose(1, 2).reshape(b, s, h))


class SwiGLU(nn.Module):
    def __init__(self, cfg: CrystalConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)  # up
        self.c_fc2 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)  # gate
        self.c_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.c_fc(x) * F.silu(self.c_fc2(x)))


class Block(nn.Module):
    def __init__(self, cfg: CrystalConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), angles)
        return x + self.mlp(self.ln_2(x))


class CrystalReference(nn.Module):
    def __init__(self, cfg: CrystalConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [batch, seq] -> logits [batch, seq, vocab] (LM head tied to wte, no bias)."""
        angles = rotary_angles(input_ids.shape[1], self.cfg.rotary_dim, self.cfg.rotary_base)
        x = self.wte(input_ids) * self.cfg.mup_embeddings_scale
        for block in self.h:
            x = block(x, angles.to(x.device))
        return F.linear(self.ln_f(x), self.wte.weight) * self.cfg.output_multiplier
