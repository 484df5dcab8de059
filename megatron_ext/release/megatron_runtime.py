"""One Megatron-Core model in this process (TP 1, PP 1): the release tools' view of the trained model."""

from __future__ import annotations

import contextlib

import torch

from megatron_ext import cpu_compat
from megatron_ext.model.crystal_config import CrystalConfig


@contextlib.contextmanager
def single_process():
    """A one-rank gloo group and Megatron's parallel state; yields the device the model runs on."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    device = torch.device("cpu") if cpu_compat.activate() else torch.device("cuda", torch.cuda.current_device())
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        parallel_state.initialize_model_parallel(1, 1)
        model_parallel_cuda_manual_seed(0)
        yield device
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def build_model(crystal: CrystalConfig, padded_vocab: int, device: torch.device):
    """The fp32 model, weights left uninitialised (they are loaded next)."""
    from megatron_ext.model.crystal_gpt import build_model as build_chunks
    from megatron_ext.model.crystal_gpt import transformer_config

    config = transformer_config(crystal, use_cpu_initialization=True, perform_initialization=False)
    (model,) = build_chunks(crystal, config, padded_vocab)
    return model.to(device).eval()


@torch.no_grad()
def logits(model, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[batch, seq] -> [batch, seq, vocab] in fp32, the padding rows dropped."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    positions = torch.arange(ids.shape[1], device=device).expand_as(ids)
    return model(ids, positions, None)[..., :vocab_size].float().cpu()
