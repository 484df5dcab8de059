"""Run a function on N local processes joined in a real gloo group with Megatron's parallel state."""

from __future__ import annotations

import os
import traceback

import torch
import torch.multiprocessing as mp

from helpers.distributed_run import free_port


def _worker(rank, world_size, port, tp, pp, fn, args, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from megatron_ext import cpu_compat

        cpu_compat.activate()
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        parallel_state.initialize_model_parallel(tp, pp)
        model_parallel_cuda_manual_seed(1)
        torch.manual_seed(1)
        fn(*args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_in_process_group(fn, *args, world_size: int = 1, tp: int = 1, pp: int = 1, timeout: float = 120):
    """fn(*args) on every rank; raises with the failing rank's traceback. fn must be picklable."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, tp, pp, fn, args, errors)) for r in range(world_size)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    if not errors.empty():
        raise AssertionError(errors.get())
    assert not hung, f"{len(hung)} process(es) hung past {timeout}s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
