"""Megatron-Core 0.16.1 on CPU (gloo), for laptops and CI.

Megatron-Core has no CPU path: it names CUDA in a few dozen places (RNG trackers, streams, buffers made
with ``device="cuda"``, optimizer type checks against ``torch.cuda.FloatTensor``). No library offers a
switch for this, so this module redirects those call sites to the CPU. It is the only place in the
project that does so, and ``activate()`` does nothing when a CUDA device is present.

What it changes, once per process:
- ``torch.cuda`` functions Megatron calls: device queries answer "cpu", streams/events are inert,
  synchronisation is a no-op, and the RNG state functions act on the CPU generator;
- Megatron's own CUDA RNG helpers in ``tensor_parallel.random``;
- a global ``TorchFunctionMode`` that maps any ``device=`` naming CUDA to the CPU, and reports
  ``Tensor.type()`` of CPU tensors with the ``torch.cuda.`` prefix so the optimizer's dispatch on that
  string takes the float32 path;
- the causal masks of Megatron's unfused softmax, made on the CPU: the mode is popped while its handler
  runs ``Tensor.backward`` (it is a torch function), so a forward redone in backward by activation
  recomputation (Megatron-Core's CheckpointFunction) is not redirected, and that is where it makes them.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch.overrides import TorchFunctionMode

_active = False


def is_active() -> bool:
    return _active


class _InertStream:
    """Stands in for torch.cuda.Stream / Event: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call made while active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to or func is torch.Tensor.cuda:
            if func is torch.Tensor.cuda:
                return args[0]
            args = tuple("cpu" if i > 0 and _is_cuda(a) else a for i, a in enumerate(args))
        elif func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") else name
        return func(*args, **kwargs)


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(state, *args, **kwargs):
    torch.set_rng_state(state)


def _seed_cpu_generator(seed):
    torch.default_generator.manual_seed(int(seed))


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    return torch.triu(torch.ones(sq, sq), diagonal=1).bool()


def activate() -> bool:
    """Install the redirections if no CUDA device is present. Returns True when active."""
    global _active
    if _active:
        return True
    if torch.cuda.is_available():
        return False
    # Megatron-Core's advice for GPUs (set CUDA_DEVICE_MAX_CONNECTIONS=1 for async TP all-reduce) has
    # nothing to act on here.
    warnings.filterwarnings(
        "ignore",
        message="When using async grad allreduce it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS",
        category=UserWarning,
        module=r"megatron\.core\.tensor_parallel\.layers",
    )

    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = _seed_cpu_generator
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as transformer_utils

    for module in (transformer_utils, fused_softmax):
        module.get_default_causal_mask = _cpu_causal_mask

    # Entered for the life of the process: there is no point at which Megatron stops naming CUDA.
    _CudaToCpuMode().__enter__()
    _active = True
    return True
