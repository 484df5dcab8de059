# crystal-megatron on NVIDIA's PyTorch container, which ships CUDA, NCCL, Transformer Engine, apex and
# flash-attn. First version: installs the project with the same pinned requirements as `make demo`
# (pyproject.toml), keeping the container's own torch (it satisfies torch>=2.6).
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/crystal-megatron
COPY pyproject.toml README.md ./
COPY megatron_ext ./megatron_ext
RUN pip install --no-cache-dir --no-build-isolation -e .
COPY . .

# Prints the accelerators this container sees.
CMD ["python", "-c", "import torch; n = torch.cuda.device_count(); print(f'{n} GPU(s):', [torch.cuda.get_device_name(i) for i in range(n)])"]
