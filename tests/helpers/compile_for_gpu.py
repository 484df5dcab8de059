"""Compile every Triton kernel of megatron_ext.kernels for a real GPU target, on a machine without one:
`python tests/helpers/compile_for_gpu.py 90` (H100) or `80` (A100) prints one JSON line per kernel compiled,
then one that lists every kernel the modules define.

The interpreter that checks the kernels' numbers (test_kernels.py) runs Python, not Triton's compiler:
a kernel that is right there can still fail to compile for a GPU (types, layouts, shared memory). Here
the kernels go through Triton's whole pipeline down to a cubin (Triton's bundled ptxas) for the
architecture given, launched through the modules' own entry points with the shapes of the Crystal 7B,
so launcher and kernel signatures are checked together, and ptxas reports each kernel's registers and
spills. Nothing runs: Triton's driver is replaced by
one that names the target, and each launch stops after compiling (Triton's warm-up mode). Values
computed after a launch are garbage and unused.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET: the compiler is under test"


class TargetOnlyDriver:
    """What a launch asks of Triton's driver before compiling: the target, a device and a stream."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def register_use(ptx: str, arch: int) -> dict:
    """Registers per thread and bytes spilled to local memory, from ptxas's report on the kernel's PTX
    (Triton keeps no such figures without a driver to load the cubin into)."""
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run(
            [str(ptxas), "-v", "--gpu-name", f"sm_{arch}{'a' if arch == 90 else ''}", source.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_bytes": int(spills.group(1)) + int(spills.group(2)),
    }


def compile_only(compiled: list, arch: int):
    real_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = real_run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(
            {
                "kernel": self.fn.__name__,
                "module": self.fn.__module__,
                "stages": sorted(kernel.asm),
                "shared_bytes": kernel.metadata.shared,
                **register_use(kernel.asm["ptx"], arch),
            }
        )
        return kernel

    JITFunction.run = run


def kernel_modules():
    from megatron_ext.kernels import cross_entropy, fp8_scaling, rope, swiglu

    return cross_entropy, fp8_scaling, rope, swiglu


def defined_kernels() -> set[str]:
    """Every launchable kernel (helpers called from kernels are compiled inside them)."""
    return {
        name
        for module in kernel_modules()
        for name, value in vars(module).items()
        if isinstance(value, JITFunction) and name.endswith("_kernel")
    }


def launch_every_kernel(arch: int) -> None:
    cross_entropy, fp8_scaling, rope, swiglu = kernel_modules()
    for module in (cross_entropy, fp8_scaling, rope, swiglu):
        module.runs_on = lambda tensor: True  # CPU tensors stand in for CUDA ones: only their dtypes and strides count
    bf16 = torch.bfloat16
    # Crystal 7B: 32 heads of 128 (rope on 32 dims: 16 angles), FFN 10922, padded vocab 32,256 over TP 2.
    qkv = torch.randn(2, 1, 32, 3 * 128, dtype=bf16, requires_grad=True)
    q, k = qkv[..., :128], qkv[..., 128:256]  # views of the fused QKV projection, as in the model
    sum(t.float().sum() for t in rope.fused_rope(q, k, torch.randn(2, 16))).backward()
    for bias in (torch.randn(2 * 10922, dtype=bf16, requires_grad=True), None):
        fc1 = torch.randn(3, 2 * 10922, dtype=bf16, requires_grad=True)
        swiglu.bias_swiglu(fc1, bias).float().sum().backward()
    torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    logits = torch.randn(2, 1, 16128, dtype=bf16, requires_grad=True)
    labels = torch.randint(0, 16128, (2, 1))
    cross_entropy.vocab_parallel_cross_entropy(logits, labels, 16128, 32032, None).sum().backward()
    if arch >= 89:  # FP8 tensor cores: H100 and later (the kernel path refuses FP8 below)
        for x in (torch.randn(40, 24), torch.randn(40, 24, dtype=bf16)):
            for dtype in (fp8_scaling.E4M3, fp8_scaling.E5M2):
                fp8_scaling.quantize(x, torch.ones(()), dtype, transpose=True)
            fp8_scaling.amax(x)


if __name__ == "__main__":
    arch = int(sys.argv[1])
    driver.set_active(TargetOnlyDriver(arch))
    compiled: list = []
    compile_only(compiled, arch)
    launch_every_kernel(arch)
    for entry in compiled:
        print(json.dumps(entry))
    print(json.dumps({"defined": sorted(defined_kernels())}))
    print(f"triton {triton.__version__}: {len(compiled)} kernels compiled for sm_{arch}", file=sys.stderr)
