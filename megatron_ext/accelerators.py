"""What this machine offers the training step, and the kernel path the engine takes with it.

Transformer Engine, apex and flash-attn are optional: they are looked for, never required. The engine
currently runs Megatron-Core's local layer spec whatever is found (the fused FP8 path is a separate piece
of work), and says so. `python -m megatron_ext.accelerators` prints the report (the Docker image's default
command).
"""

from __future__ import annotations

import importlib.util

import torch

OPTIONAL = {"transformer_engine": "Transformer Engine", "apex": "apex", "flash_attn": "flash-attn"}


def available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(module) is not None for module, name in OPTIONAL.items()}


def devices() -> str:
    if not torch.cuda.is_available():
        return "CPU only (Megatron-Core runs through megatron_ext.cpu_compat)"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} GPU(s): {', '.join(names)}"


def kernel_path() -> str:
    found = [name for name, ok in available().items() if ok]
    return ("Megatron-Core local spec: torch attention and rope, unfused"
            + (f" ({', '.join(found)} found, not used by this path)" if found else " (no Transformer Engine, apex or flash-attn)"))


def report() -> str:
    lines = [f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}", devices()]
    lines += [f"{name}: {'found' if ok else 'not installed'}" for name, ok in available().items()]
    lines.append(f"kernel path: {kernel_path()}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
