"""The memory a rank needs for a layout, by part: weights, gradients, optimizer state and activations.

Megatron-LM's report_theoretical_memory is the anchor (weights + gradients + Adam: 18 bytes a parameter,
6 + 12/DP with the distributed optimizer; activations by Korthikanti et al.), made exact for Crystal's
layer rather than a GPT's: the activations are counted tensor by tensor as this model's forward saves
them for backward (measured with torch.autograd.graph.saved_tensors_hooks in tests/test_memory.py). Per
layer and micro-batch of s tokens, b sequences, hidden h, FFN f, a heads, TP t (elements, in the
activations' dtype unless marked fp32):

  outside the tensor-parallel regions (divided by t only with sequence parallelism):
    the two layer norms' inputs and outputs          4 sbh       and their mean / rstd  4 sb (fp32)
  inside them (divided by t):
    the fused QKV projection's output               3 sbh
    q and k after RoPE (SDPA's inputs; v is a view)  2 sbh       RoPE's cos / sin      4 s x rotary dim (fp32)
    the attention output (the projection's input)    1 sbh       its log-sum-exp       a s b (fp32)
    SwiGLU: FC1's output 2 sbf, the gate's silu and product and the bias-added half 3 sbf (unfused);
      with the fused kernel its output alone, sbf
  There is no s^2 term: attention is SDPA / flash (the scores are never stored).
Recomputation: full keeps a recomputed unit's input only (sbh, /t with sequence parallelism); selective
(core_attn) drops the attention's log-sum-exp (SDPA's other inputs and output are kept by the layers around
it). After the last layer (last stage): the final norm (2 sbh, 2 sb), the logits the loss keeps, s b V/t
in fp32, and its labels and mask (9 sb bytes); before the first (first stage) the token ids (24 sb bytes).
Pipeline: the first stage holds min(PP, micro-batches) micro-batches in flight (1F1B), times Megatron-LM's
interleaving penalty 1 + (PP-1)/(PP x VP).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_ext.model.crystal_config import CrystalConfig

GIB = 1024**3


@dataclass(frozen=True)
class Layout:
    """What the memory depends on besides the model: the parallel layout, the batch, the options."""

    tp: int = 1
    pp: int = 1
    vp: int | None = None  # model chunks per stage (None: no interleaving)
    dp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    bf16: bool = True
    grad_reduce_in_fp32: bool = True
    recompute_granularity: str | None = None  # "full" or "selective"
    recompute_method: str | None = None  # with full: "uniform" or "block"
    recompute_num_layers: int | None = None
    fused_swiglu: bool = False


@dataclass(frozen=True)
class Memory:
    """Bytes a rank needs, by part (the most loaded rank of a stage: the first stage for activations)."""

    parameters: int  # on this rank
    weights: int
    gradients: int
    optimizer: int
    activations_per_microbatch: int  # saved for backward, this stage's layers
    microbatches_in_flight: float
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (
            f"weights {size_text(self.weights)} | gradients {size_text(self.gradients)} | optimizer "
            f"{size_text(self.optimizer)} | activations {size_text(self.activations)} "
            f"({size_text(self.activations_per_microbatch)} a micro-batch x {self.microbatches_in_flight:g} in "
            f"flight) | total {size_text(self.total)}"
        )


def size_text(nbytes: float) -> str:
    """GiB with two decimals, or MiB below one GiB (a test model's figures)."""
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.2f} MiB"


def layer_parameters(crystal: CrystalConfig, tp: int) -> int:
    """One layer's parameters on a tensor-parallel rank: the column-parallel QKV and FC1 (weights and biases)
    and the row-parallel projection and FC2 weights are split; their biases and the layer norms are not."""
    h, f = crystal.hidden_size, crystal.ffn_hidden_size
    split = (3 * h * h + 3 * h) + h * h + (2 * f * h + 2 * f) + f * h
    return split // tp + 2 * h + 2 * 2 * h


def stage_parameters(crystal: CrystalConfig, padded_vocab: int, layout: Layout, stage: int) -> int:
    """Parameters on a rank of pipeline stage `stage` (from 0): its layers, the word embedding on the first
    stage, and on the last the final norm and (with PP > 1) its copy of the tied embedding."""
    count = crystal.num_layers // layout.pp * layer_parameters(crystal, layout.tp)
    embedding = padded_vocab * crystal.hidden_size // layout.tp
    if stage == 0:
        count += embedding
    if stage == layout.pp - 1:
        count += 2 * crystal.hidden_size + (embedding if layout.pp > 1 else 0)
    return count


def layer_activation_bytes(crystal: CrystalConfig, s: int, b: int, layout: Layout, recomputed: bool = False) -> int:
    """Bytes one layer saves for backward in a micro-batch (see the module docstring)."""
    h, f, a, t = crystal.hidden_size, crystal.ffn_hidden_size, crystal.num_attention_heads, layout.tp
    width = 2 if layout.bf16 else 4
    outside = 1 / t if layout.sequence_parallel else 1
    if recomputed:
        return int(width * s * b * h * outside)
    elements = 4 * s * b * h * outside + (3 + 2 + 1) * s * b * h / t + (3 if layout.fused_swiglu else 5) * s * b * f / t
    fp32 = 4 * s * b * outside + 4 * s * crystal.rotary_dim
    if layout.recompute_granularity != "selective":
        fp32 += a * s * b / t
    return int(width * elements + 4 * fp32)


def activation_bytes(crystal: CrystalConfig, padded_vocab: int, layout: Layout, stage: int = 0) -> int:
    """Bytes a rank of this stage saves for backward in one micro-batch."""
    s, b, h = crystal.seq_length, layout.micro_batch_size, crystal.hidden_size
    chunks = layout.vp or 1
    chunk_layers = crystal.num_layers // layout.pp // chunks
    kept_inputs, full_layers = 0, chunk_layers  # per chunk: recomputed units' inputs, layers kept whole
    n = layout.recompute_num_layers or 0
    if layout.recompute_granularity == "full" and layout.recompute_method == "uniform":
        kept_inputs, full_layers = -(-chunk_layers // n), 0  # every n layers keep one input
    elif layout.recompute_granularity == "full":  # block: the first n layers of each chunk
        kept_inputs, full_layers = min(n, chunk_layers), chunk_layers - min(n, chunk_layers)
    total = chunks * (
        kept_inputs * layer_activation_bytes(crystal, s, b, layout, recomputed=True)
        + full_layers * layer_activation_bytes(crystal, s, b, layout)
    )
    if stage == 0:
        total += 3 * 8 * s * b  # the embedding's int64 token ids (three saved views' storages)
    if stage == layout.pp - 1:
        total += 9 * s * b  # the loss's int64 labels and bool mask
        width = 2 if layout.bf16 else 4
        outside = 1 / layout.tp if layout.sequence_parallel else 1
        total += int(width * 2 * s * b * h * outside + 4 * 2 * s * b * outside)  # final norm's input and output
        total += 4 * s * b * padded_vocab // layout.tp  # the logits the loss keeps (fp32)
    return int(total)


def microbatches_in_flight(layout: Layout, stage: int = 0) -> float:
    """1F1B: stage i holds min(PP - i, micro-batches) micro-batches' activations; interleaving adds
    Megatron-LM's penalty 1 + (PP-1)/(PP x VP)."""
    in_flight = min(layout.pp - stage, layout.num_microbatches)
    if layout.vp:
        in_flight *= 1 + (layout.pp - 1) / (layout.pp * layout.vp)
    return in_flight


def estimate(crystal: CrystalConfig, padded_vocab: int, layout: Layout, stage: int = 0) -> Memory:
    """The memory of a rank of pipeline stage `stage`. Weights in the training dtype (bf16: 2 bytes, else 4);
    gradients in Megatron-Core's fp32 (or bf16) reduction buffer; Adam's two moments, plus with bf16 the
    fp32 main parameters, all divided over the data-parallel ranks by the distributed optimizer."""
    params = stage_parameters(crystal, padded_vocab, layout, stage)
    weight_width = 2 if layout.bf16 else 4
    grad_width = 4 if layout.grad_reduce_in_fp32 or not layout.bf16 else 2
    optimizer_width = 8 + (4 if layout.bf16 else 0)
    optimizer = params * optimizer_width
    if layout.distributed_optimizer:
        optimizer = -(-params // layout.dp) * optimizer_width
    per_microbatch = activation_bytes(crystal, padded_vocab, layout, stage)
    in_flight = microbatches_in_flight(layout, stage)
    return Memory(
        parameters=params,
        weights=params * weight_width,
        gradients=params * grad_width,
        optimizer=optimizer,
        activations_per_microbatch=per_microbatch,
        microbatches_in_flight=in_flight,
        activations=int(per_microbatch * in_flight),
    )
