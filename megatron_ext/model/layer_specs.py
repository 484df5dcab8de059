"""Crystal's transformer structure as Megatron-Core layer specs.

Pre-LN blocks: LayerNorm(bias) -> self-attention (fused QKV with bias, causal) -> residual;
LayerNorm(bias) -> SwiGLU MLP (fc1 = [gate; up], fc2) -> residual. The final norm carries the muP logit
multiplier (see ``CrystalLayerNorm``). The modules filling each slot come from the kernel path
(``megatron_ext.kernels.selection``): Megatron-Core's local modules, this project's fused ones, or
Transformer Engine's.
"""

from __future__ import annotations

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from megatron_ext.kernels.fp8_linear import fp8_linear_classes
from megatron_ext.kernels.rope import FusedRopeSelfAttention
from megatron_ext.kernels.sdpa_attention import TorchSDPAttention
from megatron_ext.kernels.selection import CoreAttention, KernelPath
from megatron_ext.kernels.swiglu import FusedSwiGLUMLP
from megatron_ext.model.layer_norm import CrystalLayerNorm

# Megatron-Core's own modules, unfused: the reference path (release parity, model tests).
PLAIN_LOCAL = KernelPath(transformer_impl="local", attention=CoreAttention.MEGATRON_UNFUSED, on_gpu=False)


def _te_modules():
    """Transformer Engine's modules, imported only on that path: LayerNorm fused into the linear that
    follows it (so the layer's own norm slots are identities)."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    return TELayerNormColumnParallelLinear, TEDotProductAttention, TERowParallelLinear


def crystal_layer_spec(path: KernelPath = PLAIN_LOCAL) -> ModuleSpec:
    keys_map = {}
    if path.uses_te:
        column, core_attention, row = _te_modules()
        norm = IdentityOp
        # The fused norms' parameters are saved under the local spec's names, so that checkpoints (and
        # the release tools reading them) are the same whichever path trained them.
        keys_map = {
            "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
            "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
        }
    else:
        column, row = fp8_linear_classes(path.fp8) if path.fp8 else (ColumnParallelLinear, RowParallelLinear)
        core_attention = {
            CoreAttention.TORCH_SDPA: TorchSDPAttention,
            CoreAttention.MEGATRON_UNFUSED: DotProductAttention,
        }[path.attention]
        norm = CrystalLayerNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=FusedRopeSelfAttention if path.fused_rope else SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column,
                    core_attention=core_attention,
                    linear_proj=row,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(
                module=FusedSwiGLUMLP if path.fused_swiglu else MLP,
                submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row),
            ),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def crystal_block_spec(
    config: TransformerConfig, output_multiplier: float, vp_stage: int | None = None, path: KernelPath = PLAIN_LOCAL
) -> TransformerBlockSubmodules:
    """The decoder of one pipeline stage (or virtual stage)."""
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(
        layer_specs=[crystal_layer_spec(path)] * num_layers,
        layer_norm=ModuleSpec(module=CrystalLayerNorm, params={"output_multiplier": output_multiplier}),
    )
