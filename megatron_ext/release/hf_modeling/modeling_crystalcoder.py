"""CrystalCoder (LLM360) for transformers 5.x remote code, written by crystal-megatron.

The released remote code no longer imports under transformers 5 and its model cannot generate() from
4.50 on; this one keeps the release's weight names and layouts (GPT-2 Conv1D, [in, out]) and computes:
pre-LN blocks with biased LayerNorm; attention with biased QKV / output, RoPE on the first rotary_dim
channels of each head, interleaved (GPT-J), scores x 1/head_dim (muP); SwiGLU MLP
c_proj(c_fc(x) * silu(c_fc2(x))); embeddings x mup_embeddings_scale; logits from the tied embedding
x mup_output_alpha x mup_width_scale.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_crystalcoder import CrystalCoderConfig

# The output field holding the KV cache was renamed from past_key_values to cache within transformers 5.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored [in, out]."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], -1)


def _rotate_interleaved(x, cos, sin, rotary_dim):
    """Rotate pairs (x[2i], x[2i+1]) of the first rotary_dim channels; x [b, heads, seq, head_dim]."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    even, odd = rot[..., 0::2], rot[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, rest), dim=-1)


class CrystalCoderAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.rotary_dim = config.rotary_dim
        self.scale = 1.0 / self.head_dim if config.mup_scale_qk_dot_by_d else 1.0 / math.sqrt(self.head_dim)
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)

    def forward(self, x, cos, sin, mask, cache):
        b, s, h = x.shape
        q, k, v = (t.view(b, s, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(h, dim=-1))
        q = _rotate_interleaved(q, cos, sin, self.rotary_dim)
        k = _rotate_interleaved(k, cos, sin, self.rotary_dim)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
        probs = scores.masked_fill(~mask, torch.finfo(scores.dtype).min).softmax(dim=-1).to(v.dtype)
        return self.c_proj(torch.matmul(probs, v).transpose(1, 2).reshape(b, s, h))


class CrystalCoderMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.n_inner)  # up
        self.c_fc2 = Conv1D(config.n_embd, config.n_inner)  # gate
        self.c_proj = Conv1D(config.n_inner, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.c_fc(x) * F.silu(self.c_fc2(x)))


class CrystalCoderBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CrystalCoderAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = CrystalCoderMLP(config)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.attn(self.ln_1(x), cos, sin, mask, cache)
        return x + self.mlp(self.ln_2(x))


class CrystalCoderPreTrainedModel(PreTrainedModel):
    config_class = CrystalCoderConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CrystalCoderBlock"]
    _supports_cache_class = True

    def _init_weights(self, module):
        std = 0.073 * math.sqrt(self.config.mup_width_scale)
        if isinstance(module, Conv1D):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.trunc_normal_(module.weight, std=0.073, a=-0.146, b=0.146)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class CrystalCoderModel(CrystalCoderPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(CrystalCoderBlock(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, value):
        self.wte = value

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        use_cache=None,
        cache=None,
        past_key_values=None,
        **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        b, s = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device).expand(b, -1)
        inv_freq = 1.0 / (
            self.config.rotary_base
            ** (torch.arange(0, self.config.rotary_dim, 2, dtype=torch.float64) / self.config.rotary_dim)
        )
        angles = position_ids.to(torch.float64)[:, None, :, None] * inv_freq.to(inputs_embeds.device)
        cos, sin = angles.cos().to(inputs_embeds.dtype), angles.sin().to(inputs_embeds.dtype)

        # [b, 1, s, past + s]: causal, and padding keys (attention_mask 0) hidden; a 4D boolean attention_mask
        # (True: may attend) replaces it, e.g. block-diagonal for several sequences packed in a row, whose
        # position_ids restart with each sequence.
        if attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask.bool()
        else:
            key_pos = torch.arange(past + s, device=inputs_embeds.device)
            mask = (key_pos[None, :] <= torch.arange(past, past + s, device=inputs_embeds.device)[:, None])[None, None]
            if attention_mask is not None:
                mask = mask & attention_mask[:, None, None, : past + s].bool()

        x = inputs_embeds * self.config.mup_embeddings_scale
        for block in self.h:
            x = block(x, cos, sin, mask, cache)
        x = self.ln_f(x)
        return BaseModelOutputWithPast(last_hidden_state=x, **{_CACHE_FIELD: cache if use_cache else None})


class CrystalCoderLMHeadModel(CrystalCoderPreTrainedModel, GenerationMixin):
    """Logits come from the tied embedding directly: there is no separate lm_head parameter to tie."""

    def __init__(self, config):
        super().__init__(config)
        self.transformer = CrystalCoderModel(config)
        self.output_scale = config.mup_output_alpha * config.mup_width_scale
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def get_output_embeddings(self):
        return None

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        cache=None,
        past_key_values=None,
        logits_to_keep=0,
        **kwargs,
    ):
        out = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cache=cache if cache is not None else past_key_values,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = F.linear(hidden, self.transformer.wte.weight) * self.output_scale
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
