"""Triton's interpreter for this test process and the processes it spawns with torch.multiprocessing:
the project's Triton kernels then run on CPU tensors and are checked against their PyTorch references.
It must be set before any kernel module is imported (triton.jit reads it when a kernel is defined).
Training runs started by distributed_run.py drop it: on CPU they take the references."""

import os

os.environ["TRITON_INTERPRET"] = "1"
