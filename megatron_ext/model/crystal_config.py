"""Crystal architecture hyper-parameters and the named presets.

Facts of the released CrystalCoder 7B (LLM360): pre-LN LayerNorm with bias, biases on every linear
except the tied LM head, SwiGLU with an explicit FFN width, RoPE on the first 25% of each head,
interleaved (GPT-J rotate-every-two), and Cerebras-style muP.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CrystalConfig:
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    ffn_hidden_size: int
    seq_length: int = 2048
    vocab_size: int = 32032
    rotary_percent: float = 0.25
    rotary_base: int = 10000
    layernorm_epsilon: float = 1e-5
    # muP (Cerebras style). width scale = base width / width; the released 7B used 256 / 4096.
    mup_width_scale: float = 0.0625
    mup_embeddings_scale: float = 14.6
    mup_output_alpha: float = 2.22
    mup_base_init_std: float = 0.073

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary dim {self.rotary_dim} (head dim x rotary percent) must be even")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_percent)

    @property
    def output_multiplier(self) -> float:
        """Logits are multiplied by output alpha x width scale (0.13875 for the 7B)."""
        return self.mup_output_alpha * self.mup_width_scale

    @property
    def softmax_scale(self) -> float:
        """muP scales attention scores by 1/head_dim instead of 1/sqrt(head_dim)."""
        return 1.0 / self.head_dim

    @property
    def embedding_init_std(self) -> float:
        return self.mup_base_init_std

    @property
    def init_std(self) -> float:
        """Hidden matrices: base std x sqrt(width scale)."""
        return self.mup_base_init_std * math.sqrt(self.mup_width_scale)

    @property
    def output_layer_init_std(self) -> float:
        """Attention output and MLP down projections: hidden std / sqrt(2 x layers)."""
        return self.init_std / math.sqrt(2 * self.num_layers)

    def replace(self, **overrides) -> "CrystalConfig":
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def num_parameters(self) -> int:
        """Unique parameters with tied embeddings and the unpadded vocabulary."""
        h, f = self.hidden_size, self.ffn_hidden_size
        attention = 3 * h * h + 3 * h + h * h + h
        mlp = 2 * h * f + 2 * f + f * h + h
        norms = 2 * 2 * h
        return self.vocab_size * h + self.num_layers * (attention + mlp + norms) + 2 * h


PRESETS: dict[str, CrystalConfig] = {
    # The released CrystalCoder 7B.
    "crystal-7b": CrystalConfig(hidden_size=4096, num_layers=32, num_attention_heads=32, ffn_hidden_size=10922),
    # Same recipe at a quarter of the width, for small clusters (FFN 8/3 x hidden, as the 7B).
    "crystal-1b": CrystalConfig(
        hidden_size=2048,
        num_layers=24,
        num_attention_heads=16,
        ffn_hidden_size=5460,
        mup_width_scale=256 / 2048,
    ),
    # The muP base width itself (width scale 1): trains on a laptop CPU in minutes.
    "crystal-tiny": CrystalConfig(
        hidden_size=256,
        num_layers=4,
        num_attention_heads=4,
        ffn_hidden_size=680,
        seq_length=256,
        mup_width_scale=1.0,
    ),
    # For tests: 4 layers so that PP=2 with two virtual stages has one layer per chunk.
    "crystal-test": CrystalConfig(
        hidden_size=64,
        num_layers=4,
        num_attention_heads=4,
        ffn_hidden_size=176,
        seq_length=32,
        vocab_size=1024,
    ),
}


def get_preset(name: str) -> CrystalConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"--model {name!r} is not a preset; choose one of {sorted(PRESETS)}") from None


def layout_problem(cfg: CrystalConfig, tp: int, pp: int, vocab_divisible_by: int) -> str | None:
    """Why the model cannot be cut TP x PP ways (one line naming the flag), or None. Shared by the training
    command line and the checkpoint import, which must agree on what a valid layout is."""
    if tp < 1 or pp < 1:
        return "--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1"
    if cfg.num_attention_heads % tp:
        return f"--tensor-model-parallel-size {tp} does not divide the {cfg.num_attention_heads} attention heads"
    if cfg.ffn_hidden_size % tp:
        hint = " (10922 = 2 x 43 x 127: TP must be 1 or 2)" if cfg.ffn_hidden_size == 10922 else ""
        return f"--tensor-model-parallel-size {tp} does not divide the FFN width {cfg.ffn_hidden_size}{hint}"
    if cfg.num_layers % pp:
        return f"--pipeline-model-parallel-size {pp} does not divide the {cfg.num_layers} layers"
    if vocab_divisible_by < 1 or vocab_divisible_by % tp:
        return (
            f"--tensor-model-parallel-size {tp} does not divide --make-vocab-size-divisible-by "
            f"{vocab_divisible_by}, so the padded vocabulary would not split evenly"
        )
    return None
