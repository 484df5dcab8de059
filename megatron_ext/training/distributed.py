"""Process groups, devices and seeds: torchrun's environment -> torch.distributed -> parallel_state."""

from __future__ import annotations

import datetime
import os
import random
import sys

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_ext import cpu_compat
from megatron_ext.training.run_config import DETERMINISTIC_ENVIRONMENT, RunConfig


def initialize(run: RunConfig) -> torch.device:
    """Start the process group and Megatron's parallel state; returns this rank's device."""
    if run.kernels.deterministic_mode:
        make_deterministic()
    if cpu_compat.activate():
        device = torch.device("cpu")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    timeout = datetime.timedelta(minutes=run.layout.distributed_timeout_minutes)
    torch.distributed.init_process_group(
        backend=run.layout.distributed_backend,
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        timeout=timeout,
        store=attempt_store(timeout),
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=run.layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=run.layout.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=run.layout.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=run.layout.distributed_timeout_minutes,  # its groups' (default 30)
    )
    # Different pipeline stages hold different layers and must not initialise them identically.
    seed = run.optimizer.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    # Megatron's tracker seeding leaves the default generator at the data-parallel seed; CPU
    # initialisation draws from it and must be identical across tensor-parallel ranks.
    torch.manual_seed(seed)
    return device


def attempt_store(timeout: datetime.timedelta):
    """Under torchrun, its env:// store with every key under this attempt's prefix (TORCHELASTIC_RESTART_COUNT);
    None otherwise (init_process_group makes its own).

    Why: torchrun's static rendezvous (--master-addr/--master-port) keeps one store for every restart of the
    workers, and the keys under which gloo and NCCL publish each rank's address are the same in every attempt
    (the default group's and each new_group's, numbered in order). A restarted attempt reads the killed one's
    addresses and fails ("Gloo connectFullMesh failed ... Connection refused") or waits for peers that are
    gone. Under a prefix per attempt each one meets only its own ranks."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    store, _, _ = next(torch.distributed.rendezvous("env://", timeout=timeout))
    return torch.distributed.PrefixStore(f"crystal/attempt_{attempt}", store)


def make_deterministic() -> None:
    """--deterministic-mode, before cuBLAS, NCCL or Transformer Engine read their environment (checked in
    run_config): deterministic kernels only, or an error naming the op that has none."""
    for name, (value, *_) in DETERMINISTIC_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    torch.use_deterministic_algorithms(True)


def is_logging_rank() -> bool:
    """Tensor rank 0 of the last data-parallel rank of the last pipeline stage: the loss is known there,
    and the data (its per-source scalars need the indices only reading ranks hold). At tensor-parallel
    size 1 it is the last rank, as in Megatron-LM."""
    return (
        parallel_state.is_pipeline_last_stage(ignore_virtual=True)
        and parallel_state.get_tensor_model_parallel_rank() == 0
        and parallel_state.get_data_parallel_rank() == parallel_state.get_data_parallel_world_size() - 1
    )


def print_rank_0(message: str, error: bool = False) -> None:
    """On rank 0; an error goes to stderr, where a user's error is its last line."""
    if torch.distributed.get_rank() == 0:
        print(message, flush=True, file=sys.stderr if error else sys.stdout)


def shutdown() -> None:
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
