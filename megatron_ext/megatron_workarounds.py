"""Workarounds for Megatron-Core 0.16.1, in one place: each names the behaviour of that version it works
around. apply() installs the patches and is called explicitly at start-up by the code that needs them
(the training loop); importing this module changes nothing. On another Megatron-Core version apply()
stops with one line rather than patch code it was not written for.

Elsewhere, by choice rather than patch: the distributed optimizer's checkpoint format (checkpointing.py:
'fully_reshardable'), parameter groups with distinct checkpoint keys (optimizer.py), and the CPU layer
(cpu_compat.py, active only without CUDA).
"""

from __future__ import annotations

import torch

SUPPORTED_VERSION = "0.16.1"
_UPSTREAM: dict = {}


class UnsupportedMegatronVersion(RuntimeError):
    pass


def check_version() -> None:
    from megatron.core import package_info

    if package_info.__version__ != SUPPORTED_VERSION:
        raise UnsupportedMegatronVersion(
            f"megatron-core {package_info.__version__} is installed; this project's workarounds "
            f"(megatron_ext/megatron_workarounds.py) are for {SUPPORTED_VERSION}: "
            f"pip install megatron-core=={SUPPORTED_VERSION}"
        )


def apply() -> None:
    """Check the version and install the patches (once)."""
    check_version()
    if _UPSTREAM:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _UPSTREAM["set_states"] = DistributedOptimizer._set_main_param_and_optimizer_states
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    _UPSTREAM["fully_reshardable"] = DistributedOptimizer.sharded_param_state_fully_reshardable
    DistributedOptimizer.sharded_param_state_fully_reshardable = _sharded_param_state_fully_reshardable
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _UPSTREAM["results_queue"] = filesystem_async._get_write_results_queue
    filesystem_async._get_write_results_queue = _write_results_queue_dying_with_its_rank


def _write_results_queue_dying_with_its_rank():
    """Megatron-Core 0.16.1's checkpoint writer keeps its results queue in a multiprocessing Manager, a
    spawned server process (275 MB here) that outlives a rank killed by a signal: under torchrun's in-job
    restarts each SIGKILLed rank left one behind, holding host memory and the job's stdout until the
    allocation ended. The same queue, from a Manager whose process is killed when its rank dies
    (PR_SET_PDEATHSIG; Linux only, elsewhere upstream's)."""
    import multiprocessing
    import sys

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None and sys.platform == "linux":
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        manager.start(initializer=_die_with_parent)
        filesystem_async._results_queue = manager.Queue()
        _UPSTREAM["results_manager"] = manager  # upstream's Manager() is kept alive by its queue's reference alike
    return _UPSTREAM["results_queue"]()


def _die_with_parent() -> None:
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def inner_optimizers(optimizer) -> list:
    """The Megatron optimizers inside a ChainedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _set_main_param_and_optimizer_states(self, model_param, tensors):
    """Megatron-Core 0.16.1 fix: its 'fully_reshardable' loader copies every per-parameter state key,
    but torch's Adam keeps a per-parameter 'step' that the format does not store (load_state_dict has
    already restored it from the param groups). Copy only the keys the checkpoint has."""
    if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
        return _UPSTREAM["set_states"](self, model_param, tensors)
    group_index, group_order = self.model_param_group_index_map[model_param]
    main_param = self.optimizer.param_groups[group_index]["params"][group_order]
    destination = {"param": main_param, **self.optimizer.state[main_param]}
    for key, tensor in tensors.items():
        destination[key].copy_(tensor)


def _sharded_param_state_fully_reshardable(self, *args, **kwargs):
    """Megatron-Core 0.16.1 fix: its 'fully_reshardable' save gathers each buffer's optimizer state without
    the padding between buckets (get_parameter_state_dp_zero), then slices it at the parameters' padded
    positions (param_index_map). With one bucket both agree; with several (--overlap-grad-reduce, or a
    --ddp-bucket-size) every parameter after the first bucket was saved with another parameter's state,
    and a resumed run diverged (test_scaling_flags.py). The positions are made unpadded for the call."""
    padded = [buffer.param_index_map for buffer in self.buffers]
    try:
        for buffer in self.buffers:
            shift, before = {}, 0
            for bucket in buffer.buckets:
                shift[bucket.bucket_id] = bucket.offset - before  # the padding of the buckets before it
                before += bucket.numel_unpadded
            buffer.param_index_map = {
                param: (start - shift[bucket_id], end - shift[bucket_id], bucket_id)
                for param, (start, end, bucket_id) in buffer.param_index_map.items()
            }
        return _UPSTREAM["fully_reshardable"](self, *args, **kwargs)
    finally:
        for buffer, index_map in zip(self.buffers, padded):
            buffer.param_index_map = index_map


def materialize_optimizer_state(optimizer) -> None:
    """Create Adam's state (step, moments) before loading into it.

    Megatron-Core 0.16.1's DistributedOptimizer.state_dict() requires Adam's 'step' to exist when neither
    apex nor Transformer Engine is installed, and torch creates it only on a first step. A step at lr 0
    with zero gradients creates it and leaves the parameters as they are; the load overwrites it all.
    """
    for opt in inner_optimizers(optimizer):
        inner = opt.optimizer
        if inner.state:
            continue
        lrs = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        inner.zero_grad()
        for group, lr in zip(inner.param_groups, lrs):
            group["lr"] = lr


def unshare_adam_steps(optimizer) -> None:
    """Megatron-Core 0.16.1 fix: without apex/TE its DistributedOptimizer.load_state_dict gives every
    parameter's state one shared 'step' tensor, which torch's Adam then increments in place once per
    parameter, corrupting the bias correction from the first step after a resume."""
    for opt in inner_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
