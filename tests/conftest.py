"""Where the project's Triton kernels run in the tests. Without a GPU: in Triton's interpreter, on CPU
tensors, for this test process and the processes it spawns with torch.multiprocessing (it must be set
before any kernel module is imported: triton.jit reads it when a kernel is defined). With one: compiled,
on CUDA tensors (test_kernels.py's DEVICE), so that a GPU machine checks the real kernels against their
references. Training runs started by distributed_run.py drop it: on CPU they take the references."""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# Under pytest-xdist (make test runs one worker per core) each worker's in-process tests keep to one thread,
# as the training processes the tests start do (OMP_NUM_THREADS=1): the workers share the cores rather than
# oversubscribe them.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
