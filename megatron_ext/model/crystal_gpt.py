"""Crystal on Megatron-Core's GPTModel."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.kernels.cross_entropy import cross_entropy_reference, vocab_parallel_cross_entropy
from megatron_ext.kernels.selection import KernelPath
from megatron_ext.model.crystal_config import CrystalConfig
from megatron_ext.model.layer_specs import PLAIN_LOCAL, crystal_block_spec


@dataclass(frozen=True)
class ParallelLayout:
    """How the model is cut; filled from the command line and parallel_state."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None
    sequence_parallel: bool = False


def truncated_normal_init(std: float):
    """muP's initialiser: a normal truncated at +-2 sigma."""
    return functools.partial(torch.nn.init.trunc_normal_, mean=0.0, std=std, a=-2 * std, b=2 * std)


def transformer_config(
    crystal: CrystalConfig,
    layout: ParallelLayout = ParallelLayout(),
    bf16: bool = False,
    use_cpu_initialization: bool = False,
    perform_initialization: bool = True,
    path: KernelPath = PLAIN_LOCAL,
    recompute: dict | None = None,
) -> TransformerConfig:
    """recompute: TransformerConfig's recompute_* fields (RecomputeSection.transformer_options())."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    # Transformer Engine runs FP8 itself when the config asks (Megatron-Core's TransformerBlock opens
    # TE's FP8 context); the local path's FP8 lives in its linear layers and leaves the config alone.
    te_options = {}
    if path.uses_te:
        te_options["attention_backend"] = AttnBackend[path.attention_backend]
        if path.fp8 is not None:
            te_options.update(
                fp8=path.fp8.format,
                fp8_recipe=path.fp8.recipe,
                fp8_margin=path.fp8.margin,
                fp8_amax_history_len=path.fp8.amax_history_len,
            )
    return TransformerConfig(
        num_layers=crystal.num_layers,
        hidden_size=crystal.hidden_size,
        num_attention_heads=crystal.num_attention_heads,
        ffn_hidden_size=crystal.ffn_hidden_size,
        kv_channels=crystal.head_dim,
        layernorm_epsilon=crystal.layernorm_epsilon,
        normalization="LayerNorm",
        add_bias_linear=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        softmax_scale=crystal.softmax_scale,
        rotary_interleaved=True,
        init_method=truncated_normal_init(crystal.init_std),
        output_layer_init_method=truncated_normal_init(crystal.output_layer_init_std),
        embedding_init_method=truncated_normal_init(crystal.embedding_init_std),
        init_method_std=crystal.init_std,
        embedding_init_method_std=crystal.embedding_init_std,
        # Megatron-Core's fusions below come from apex / Transformer Engine; this project's own (rope,
        # bias + SwiGLU) are modules of the layer spec instead.
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=layout.virtual_pipeline_model_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        # Loss = sum over tokens / tokens in the global batch, whatever the layout or micro-batching.
        calculate_per_token_loss=True,
        **te_options,
        **(recompute or {}),
    )


class CrystalGPTModel(GPTModel):
    """GPTModel plus muP's embedding multiplier (applied after the lookup, before the first block), and a
    loss that ignores the vocabulary's padding rows."""

    def __init__(
        self, *args, embedding_multiplier: float, unpadded_vocab_size: int, fused_cross_entropy: bool = False, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.embedding_multiplier = embedding_multiplier
        self.unpadded_vocab_size = unpadded_vocab_size
        self.fused_cross_entropy = fused_cross_entropy

    def compute_language_model_loss(self, labels, logits):
        """Megatron-Core's cross entropy runs over the padded vocabulary, so the padding rows' logits would
        enter the softmax: the trained model would then depend on rows that the released model (32032
        rows) does not have. Leaving them out makes the training loss that of the released model, and
        leaves the padding rows without gradient. labels [b, s], logits [s, b, V/TP] -> loss [b, s]."""
        first = parallel_state.get_tensor_model_parallel_rank() * logits.shape[-1]
        if self.fused_cross_entropy:
            loss = vocab_parallel_cross_entropy(
                logits, labels.t(), first, self.unpadded_vocab_size, parallel_state.get_tensor_model_parallel_group()
            )
        else:
            loss = cross_entropy_reference(logits, labels.t().contiguous(), first, self.unpadded_vocab_size)
        return loss.t().contiguous()

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        # An explicit mask comes only with packed evaluation rows, whose positions restart with each request:
        # RoPE must then follow position_ids, which Megatron-Core's rotary embedding (positions 0..s-1 of
        # the row, for any position_ids outside the THD packed format) does not.
        self._packed_positions = position_ids if attention_mask is not None else None
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, **kwargs):
        from_lookup = decoder_input is None and self.pre_process
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input, **kwargs)
        if from_lookup:
            out = (out[0] * self.embedding_multiplier, *out[1:])
        positions = getattr(self, "_packed_positions", None)
        if positions is not None and out[1] is not None:
            # [s, 1, 1, d] by row position -> [s, b, 1, d] by each token's own position (the same angles)
            out = (out[0], out[1][:, 0][positions.t()], *out[2:])
        return out


def build_model_chunk(
    crystal: CrystalConfig,
    config: TransformerConfig,
    padded_vocab_size: int,
    pre_process: bool,
    post_process: bool,
    vp_stage: int | None = None,
    path: KernelPath = PLAIN_LOCAL,
) -> CrystalGPTModel:
    return CrystalGPTModel(
        config=config,
        transformer_layer_spec=crystal_block_spec(config, crystal.output_multiplier, vp_stage, path),
        vocab_size=padded_vocab_size,
        max_sequence_length=crystal.seq_length,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=True,
        position_embedding_type="rope",
        rotary_percent=crystal.rotary_percent,
        rotary_base=crystal.rotary_base,
        vp_stage=vp_stage,
        embedding_multiplier=crystal.mup_embeddings_scale,
        unpadded_vocab_size=crystal.vocab_size,
        fused_cross_entropy=path.fused_cross_entropy,
    )


def build_model(
    crystal: CrystalConfig, config: TransformerConfig, padded_vocab_size: int, path: KernelPath = PLAIN_LOCAL
) -> list[CrystalGPTModel]:
    """One model chunk per virtual pipeline stage held by this rank (one chunk without VP)."""
    vp_size = config.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vp_size) if vp_size else [None]:
        chunks.append(
            build_model_chunk(
                crystal,
                config,
                padded_vocab_size,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
                path=path,
            )
        )
    return chunks


def padded_vocab_size(vocab_size: int, divisible_by: int) -> int:
    """Pad to a multiple of divisible_by, whatever the TP size.

    Megatron-LM pads to divisible_by x TP, which gives the embedding a different shape at each TP size
    (32032 rows at TP 1, 32064 at TP 2): a checkpoint would then not load at another TP, and the extra
    rows would change the softmax. One padded size for every layout keeps resharding exact; the
    argument check requires TP to divide it.
    """
    return -(-vocab_size // divisible_by) * divisible_by
