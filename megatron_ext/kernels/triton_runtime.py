"""When this project's Triton kernels run.

Triton is optional (it ships with CUDA builds of torch). A kernel runs on CUDA tensors when Triton
imports; on CPU tensors only under ``TRITON_INTERPRET=1``, Triton's interpreter, which the tests use to
check each kernel against its PyTorch reference without a GPU. Elsewhere callers take the reference.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def runs_on(tensor: torch.Tensor) -> bool:
    return HAVE_TRITON and (tensor.is_cuda or INTERPRET)
