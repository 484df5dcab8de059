"""What this machine offers the training step, and the kernel path the engine takes with it.

Transformer Engine, apex, flash-attn and Triton are optional: they are looked for, never required.
`python -m megatron_ext.accelerators` prints the report (the Docker image's default command): the path
``--transformer-impl auto`` takes here without FP8, and the one ``--fp8-format hybrid`` would take (or why
it cannot).
"""

from __future__ import annotations

import importlib.util

import torch

from megatron_ext.kernels.selection import KernelPathError, select

OPTIONAL = {"transformer_engine": "Transformer Engine", "apex": "apex", "flash_attn": "flash-attn", "triton": "Triton"}


def available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(module) is not None for module, name in OPTIONAL.items()}


def found() -> str:
    return ", ".join(name for name, ok in available().items() if ok) or "none"


def devices() -> str:
    if not torch.cuda.is_available():
        return "CPU only (Megatron-Core runs through megatron_ext.cpu_compat)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} GPU(s): {', '.join(names)}"


def report() -> str:
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}", devices()]
    lines += [f"{name}: {'found' if ok else 'not installed'}" for name, ok in available().items()]
    lines.append(f"kernel path: {select().describe()}")
    try:
        lines.append(f"kernel path with --fp8-format hybrid: {select(fp8_format='hybrid').describe()}")
    except KernelPathError as e:
        lines.append(f"kernel path with --fp8-format hybrid: unavailable: {e}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
