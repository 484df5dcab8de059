"""Crystal's rotary embedding, fused: the first rotary_dim features of every head (25% for Crystal),
rotated in interleaved pairs (GPT-J's rotate-every-two), on q and k in one kernel launch.

Megatron-Core's local path rotates q and k one after the other with torch ops (a cos, a sin, a rotate,
two multiplies, an add, a concatenation: several passes over each tensor). The kernel reads each
element once and writes it once; the backward is the same rotation by the opposite angle.
``FusedRopeSelfAttention`` puts it into Megatron-Core's SelfAttention.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention

from megatron_ext.kernels.triton_runtime import HAVE_TRITON, runs_on


def rope_reference(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """x [s, b, heads, head_dim]; angles [s, rotary_dim / 2] (position x inverse frequency)."""
    rot = 2 * angles.shape[-1]
    cos, sin = angles.cos()[:, None, None, :], angles.sin()[:, None, None, :]
    even, odd = x[..., 0:rot:2].float(), x[..., 1:rot:2].float()
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)


def angles_from_megatron(freqs: torch.Tensor) -> torch.Tensor:
    """Megatron-Core's RotaryEmbedding gives [s, 1, 1, rotary_dim] with each angle repeated for its pair
    (interleaved layout): one angle per pair."""
    return freqs[:, 0, 0, 0::2].float().contiguous()


if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotate_token(
        x_ptr,
        out_ptr,
        heads,
        s_x,
        s_out,
        cos,
        sin,
        head_dim,
        half_rot,
        BLOCK_H: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        h = tl.arange(0, BLOCK_H)[:, None]
        p = tl.arange(0, BLOCK_P)[None, :]
        pairs = (h < heads) & (p < half_rot)
        x0 = tl.load(x_ptr + h * s_x + 2 * p, mask=pairs, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + h * s_x + 2 * p + 1, mask=pairs, other=0.0).to(tl.float32)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + h * s_out + 2 * p, (x0 * cos - x1 * sin).to(out_ty), mask=pairs)
        tl.store(out_ptr + h * s_out + 2 * p + 1, (x1 * cos + x0 * sin).to(out_ty), mask=pairs)
        d = tl.arange(0, BLOCK_D)[None, :]
        rest = (h < heads) & (d >= 2 * half_rot) & (d < head_dim)
        tl.store(out_ptr + h * s_out + d, tl.load(x_ptr + h * s_x + d, mask=rest), mask=rest)

    @triton.jit
    def _rope_qk_kernel(
        q_ptr,
        k_ptr,
        q_out_ptr,
        k_out_ptr,
        angles_ptr,
        batch,
        q_heads,
        k_heads,
        qs_s,
        qs_b,
        qs_h,
        ks_s,
        ks_b,
        ks_h,
        head_dim,
        half_rot,
        direction,
        BLOCK_H: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)  # offsets beyond 2^31 elements at large micro batches
        s, b = token // batch, token % batch
        p = tl.arange(0, BLOCK_P)[None, :]
        angle = tl.load(angles_ptr + s * half_rot + p, mask=p < half_rot, other=0.0)
        cos, sin = tl.cos(angle), direction * tl.sin(angle)
        # Outputs are contiguous [s, b, heads, head_dim].
        _rotate_token(
            q_ptr + s * qs_s + b * qs_b,
            q_out_ptr + token * q_heads * head_dim,
            q_heads,
            qs_h,
            head_dim,
            cos,
            sin,
            head_dim,
            half_rot,
            BLOCK_H,
            BLOCK_P,
            BLOCK_D,
        )
        _rotate_token(
            k_ptr + s * ks_s + b * ks_b,
            k_out_ptr + token * k_heads * head_dim,
            k_heads,
            ks_h,
            head_dim,
            cos,
            sin,
            head_dim,
            half_rot,
            BLOCK_H,
            BLOCK_P,
            BLOCK_D,
        )

    def _launch(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor, direction: float):
        if q.stride(-1) != 1:
            q = q.contiguous()
        if k.stride(-1) != 1:
            k = k.contiguous()
        s, b, q_heads, head_dim = q.shape
        q_out, k_out = (
            torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
        )
        half_rot = angles.shape[-1]
        _rope_qk_kernel[(s * b,)](
            q,
            k,
            q_out,
            k_out,
            angles,
            b,
            q_heads,
            k.shape[2],
            q.stride(0),
            q.stride(1),
            q.stride(2),
            k.stride(0),
            k.stride(1),
            k.stride(2),
            head_dim,
            half_rot,
            direction,
            BLOCK_H=triton.next_power_of_2(max(q_heads, k.shape[2])),
            BLOCK_P=triton.next_power_of_2(half_rot),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
        return q_out, k_out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, angles):
        ctx.save_for_backward(angles)
        return _launch(q, k, angles, 1.0)

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        (angles,) = ctx.saved_tensors
        return (*_launch(grad_q, grad_k, angles, -1.0), None)


def fused_rope(q: torch.Tensor, k: torch.Tensor, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [s, b, q_heads, head_dim] and k [s, b, k_heads, head_dim] rotated; any strides (views of the
    fused QKV projection are fine)."""
    if runs_on(q):
        return _FusedRope.apply(q, k, angles)
    return rope_reference(q, angles), rope_reference(k, angles)


class FusedRopeSelfAttention(SelfAttention):
    """Megatron-Core's SelfAttention with the rotation done by ``fused_rope`` right after the QKV split.

    The base class applies RoPE to q and k separately, from the ``rotary_pos_emb`` it is given; this
    class takes the embedding from it, and rotates both tensors in one launch as they come out of
    ``get_query_key_value_tensors`` (training and plain evaluation; the layer spec chooses it only for
    those, not for inference with a KV cache or packed sequences)."""

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        self._rope_angles = None
        if rotary_pos_emb is not None:
            freqs = rotary_pos_emb[0] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
            if freqs.shape[1] != 1:  # angles per token (packed evaluation rows): Megatron-Core's rotation
                return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=rotary_pos_emb, **kwargs)
            self._rope_angles = angles_from_megatron(freqs)
        return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)

    def get_query_key_value_tensors(self, *args, **kwargs):
        query, key, value = super().get_query_key_value_tensors(*args, **kwargs)
        if self._rope_angles is not None:
            query, key = fused_rope(query, key, self._rope_angles[: query.shape[0]])
        return query, key, value
