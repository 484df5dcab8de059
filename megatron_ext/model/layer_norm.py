"""LayerNorm with bias for the local (no Transformer Engine / apex) layer spec.

Megatron-Core's torch fallback (``WrappedTorchNorm``) refuses sequence parallelism, because it cannot
mark its parameters for the tensor-parallel gradient reduction. Under sequence parallelism each TP rank
normalises a different slice of the sequence with the same (replicated) weight and bias, so their
gradients are partial sums: tagging them ``sequence_parallel`` makes Megatron-Core's
``finalize_model_grads`` all-reduce them across the tensor-parallel group.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class CrystalLayerNorm(torch.nn.LayerNorm):
    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        output_multiplier: float = 1.0,
    ):
        super().__init__(hidden_size, eps=eps, bias=True, dtype=config.params_dtype)
        # The final norm carries muP's logit multiplier: the LM head is a bias-free linear map, so
        # scaling its input is exactly scaling the logits, on every TP/PP/SP layout and in loss and
        # inference alike.
        self.output_multiplier = output_multiplier
        for param in (self.weight, self.bias):
            setattr(param, "sequence_parallel", config.sequence_parallel)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden_states)
        return out * self.output_multiplier if self.output_multiplier != 1.0 else out
