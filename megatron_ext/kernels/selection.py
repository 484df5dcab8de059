"""Which kernel path the model's layers take, decided once at start-up from the flags and what the
machine offers (Megatron-Core's flag names and meanings).

``--transformer-impl auto``: Transformer Engine's layers (fused LayerNorm + linear, TE attention, TE
FP8) when TE imports and a GPU is present; otherwise Megatron-Core's local spec with this project's
kernels: fused partial interleaved RoPE, bias + SwiGLU and vocab-parallel cross-entropy (Triton, on
GPU; the first two and the loss on the TE path too), attention through torch's
SDPA (``--attention-backend auto/flash``) or Megatron's unfused one (``unfused/local``), and with
``--fp8-format`` the FP8 linear of ``fp8_linear`` (``torch._scaled_mm``).

FP8 needs compute capability 8.9 (Ada, Hopper) or newer; asked for on an older GPU (A100: 8.0) the run
stops at once naming the GPU. On CPU it runs only when ``--fp8-cpu-emulation`` asks for it (tests).
The probes (TE version, GPU, Triton) are a value, so that tests can put any machine in their place.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
from dataclasses import dataclass

import torch

from megatron_ext.kernels.fp8_scaling import FORMATS, RECIPES, FP8Recipe

TE_ONLY_RECIPES = ("mxfp8", "blockwise")
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
FP8_MIN_CAPABILITY = (8, 9)


class CoreAttention(enum.Enum):
    """What computes core attention; layer_specs.py maps each to its module. The value is for people."""

    TRANSFORMER_ENGINE = "TE DotProductAttention"
    TORCH_SDPA = "torch scaled_dot_product_attention"
    MEGATRON_UNFUSED = "Megatron-Core DotProductAttention (unfused)"


class KernelPathError(ValueError):
    """A combination of flags this machine cannot run; the message is the one-line reason."""


@dataclass(frozen=True)
class Probes:
    te_version: str | None = None  # None: Transformer Engine does not import
    gpu_name: str | None = None  # None: no GPU (CPU run)
    compute_capability: tuple[int, int] | None = None
    triton: bool = False


def probe() -> Probes:
    te = None
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            te = importlib.metadata.version("transformer_engine")
        except importlib.metadata.PackageNotFoundError:
            te = "unknown version"
    if not torch.cuda.is_available():
        return Probes(te_version=te, triton=importlib.util.find_spec("triton") is not None)
    return Probes(
        te_version=te,
        gpu_name=torch.cuda.get_device_name(),
        compute_capability=torch.cuda.get_device_capability(),
        triton=importlib.util.find_spec("triton") is not None,
    )


@dataclass(frozen=True)
class KernelPath:
    transformer_impl: str  # "transformer_engine" or "local"
    attention: CoreAttention
    attention_backend: str = "auto"  # the flag, for Transformer Engine
    fp8: FP8Recipe | None = None
    on_gpu: bool = True
    fused_rope: bool = False
    fused_swiglu: bool = False
    fused_cross_entropy: bool = False
    te_version: str | None = None

    @property
    def uses_te(self) -> bool:
        return self.transformer_impl == "transformer_engine"

    def attention_text(self) -> str:
        if self.attention is CoreAttention.TRANSFORMER_ENGINE:
            return f"{self.attention.value} (backend {self.attention_backend})"
        if self.attention is CoreAttention.TORCH_SDPA and self.on_gpu:
            return f"{self.attention.value} (flash / memory-efficient kernels)"
        return self.attention.value

    def describe(self) -> str:
        impl = f"Transformer Engine {self.te_version}" if self.uses_te else "Megatron-Core local spec (native)"
        if self.fp8 is None:
            fp8 = "off (bf16/fp32 GEMMs)"
        else:
            engine = (
                "TE"
                if self.uses_te
                else ("torch._scaled_mm" if self.on_gpu else "torch._scaled_mm on CPU: emulated, for tests")
            )
            fp8 = (
                f"{self.fp8.format} {self.fp8.recipe} (amax history {self.fp8.amax_history_len}, margin "
                f"{self.fp8.margin}; {engine})"
            )
        on_off = lambda flag: "on" if flag else "off"  # noqa: E731
        layernorm = "fused into the next linear (TE)" if self.uses_te else "torch"
        return (
            f"{impl} | attention: {self.attention_text()} | fp8: {fp8} | fused rope (Triton): "
            f"{on_off(self.fused_rope)} | "
            f"fused bias+SwiGLU (Triton): {on_off(self.fused_swiglu)} | fused cross-entropy (Triton): "
            f"{on_off(self.fused_cross_entropy)} | LayerNorm: {layernorm}"
        )


def select(
    transformer_impl: str = "auto",
    attention_backend: str = "auto",
    fp8_format: str | None = None,
    fp8_recipe: str = "delayed",
    fp8_amax_history_len: int = 1024,
    fp8_margin: int = 0,
    fp8_cpu_emulation: bool = False,
    probes: Probes | None = None,
) -> KernelPath:
    p = probes if probes is not None else probe()
    gpu = p.gpu_name is not None
    if transformer_impl == "transformer_engine":
        if p.te_version is None:
            raise KernelPathError(
                "--transformer-impl transformer_engine: Transformer Engine does not import here "
                "(use the NGC container, or --transformer-impl local)"
            )
        if not gpu:
            raise KernelPathError("--transformer-impl transformer_engine needs a GPU; this run has none")
    use_te = transformer_impl == "transformer_engine" or (
        transformer_impl == "auto" and p.te_version is not None and gpu
    )

    recipe = None
    if fp8_format is not None:
        if fp8_format not in FORMATS:
            raise KernelPathError(f"--fp8-format {fp8_format}: choose one of {', '.join(FORMATS)}")
        if gpu and p.compute_capability < FP8_MIN_CAPABILITY:
            major, minor = p.compute_capability
            raise KernelPathError(
                f"--fp8-format {fp8_format}: {p.gpu_name} (compute capability {major}.{minor}) has "
                "no FP8 tensor cores (8.9+ needed: H100, H200, L40S); train in bf16 without --fp8-format"
            )
        if not gpu and not fp8_cpu_emulation:
            raise KernelPathError(
                f"--fp8-format {fp8_format} on CPU: FP8 is emulated there, for tests only; "
                "pass --fp8-cpu-emulation to ask for it"
            )
        if not use_te and fp8_recipe in TE_ONLY_RECIPES:
            raise KernelPathError(
                f"--fp8-recipe {fp8_recipe} needs Transformer Engine; the native path has {', '.join(RECIPES)}"
            )
        if fp8_recipe not in RECIPES + TE_ONLY_RECIPES:
            raise KernelPathError(f"--fp8-recipe {fp8_recipe}: choose one of {', '.join(RECIPES + TE_ONLY_RECIPES)}")
        recipe = FP8Recipe(fp8_format, fp8_recipe, fp8_amax_history_len, fp8_margin)

    if attention_backend not in ATTENTION_BACKENDS:
        raise KernelPathError(f"--attention-backend {attention_backend}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    if use_te:
        attention = CoreAttention.TRANSFORMER_ENGINE
    elif attention_backend in ("auto", "flash"):
        attention = CoreAttention.TORCH_SDPA
    elif attention_backend == "fused":
        raise KernelPathError(
            "--attention-backend fused is Transformer Engine's cuDNN attention; not available "
            "on the local spec (use auto, flash, unfused or local)"
        )
    else:
        attention = CoreAttention.MEGATRON_UNFUSED
    triton_kernels = gpu and p.triton
    return KernelPath(
        transformer_impl="transformer_engine" if use_te else "local",
        attention=attention,
        attention_backend=attention_backend,
        fp8=recipe,
        on_gpu=gpu,
        fused_rope=triton_kernels,
        fused_swiglu=triton_kernels,
        fused_cross_entropy=triton_kernels,
        te_version=p.te_version if use_te else None,
    )
