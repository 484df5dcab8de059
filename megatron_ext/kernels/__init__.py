"""The fused kernel path: which implementation the model's layers use (``selection``), and this
project's own kernels for the local layer spec when Transformer Engine is absent: partial interleaved
RoPE (``rope``), bias + SwiGLU (``swiglu``) and the FP8 linear (``fp8_scaling``, ``fp8_linear``).

Each kernel module holds a plain-PyTorch reference beside its Triton kernel; the Triton kernels run on
CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (the tests)."""
