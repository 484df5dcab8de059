"""CrystalCoder configuration (LLM360's released format), for transformers 5.x remote code.

Written by crystal-megatron's tools/convert_to_hf.py. The keys are the release's (GPT-2 names); the
attribute map gives generate() and other library code the standard names it looks for.
"""

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class CrystalCoderConfig(PreTrainedConfig):
    model_type = "crystalcoder"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "max_position_embeddings": "n_positions",
        "intermediate_size": "n_inner",
    }

    def __init__(
        self,
        vocab_size=32032,
        n_positions=2048,
        n_embd=4096,
        n_layer=32,
        n_head=32,
        n_inner=10922,
        activation_function="swiglu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        scale_attn_weights=True,
        use_cache=True,
        bos_token_id=1,
        eos_token_id=2,
        position_embedding_type="rotary",
        rotary_dim=32,
        rotary_base=10000,
        mup_width_scale=0.0625,
        mup_embeddings_scale=14.6,
        mup_output_alpha=2.22,
        mup_scale_qk_dot_by_d=True,
        tie_word_embeddings=True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.scale_attn_weights = scale_attn_weights
        self.use_cache = use_cache
        self.position_embedding_type = position_embedding_type
        self.rotary_dim = rotary_dim
        self.rotary_base = rotary_base
        self.mup_width_scale = mup_width_scale
        self.mup_embeddings_scale = mup_embeddings_scale
        self.mup_output_alpha = mup_output_alpha
        self.mup_scale_qk_dot_by_d = mup_scale_qk_dot_by_d
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs
        )
