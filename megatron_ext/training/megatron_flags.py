"""Megatron-LM flags that only name what this project always does, or that it does not do: one table.

A Megatron-LM launch script (Megatron-LM's examples, LLM360's GPU port of Crystal) must run here unchanged
or fail in one line that says why and what to use instead, never on an unknown flag. A flag whose meaning
is a run setting is a field of a section of run_config.py; the flags here change nothing this project
does, so they are rows of this table rather than dead fields: each is **accepted** when its value agrees
with what the run does (Crystal's own shape values among them, compared with the model the run builds)
and **refused** otherwise, or always, with the reason and the equivalent. `--help` shows each row (its
group: "Megatron-LM flags"), docs/training.md lists the table, and arguments.validate checks the given
ones before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

SWITCH = None  # a flag that takes no value


@dataclass(frozen=True)
class MegatronFlag:
    flag: str
    does: str
    """what this project does (an accepted flag), or why it is refused and what to use instead"""
    value: type | None = SWITCH
    agrees: Any = True
    """True: always accepted; False: always refused; a tuple: the values accepted; a function of the model
    (CrystalConfig): the one value accepted, or for a switch whether it agrees"""
    implies: tuple[str, Any] | None = None
    """(field, value) the flag stands for, e.g. --use-flash-attn: attention_backend flash"""
    nargs: str | None = None
    """argparse's nargs where the flag takes several values, as Megatron-LM's (--rampup-batch-size)"""

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")


def _preset(attribute: str) -> Callable:
    return lambda crystal: getattr(crystal, attribute)


# Reasons that several rows share.
_EQUAL_STAGES = "pipeline stages hold equal numbers of layers (--num-layers divisible by PP)"
_NO_CP = "no context parallelism: Crystal's 2048-token rows fit one GPU"
_NO_FSDP = "Megatron-FSDP is not used (see --use-megatron-fsdp)"
_TE_WGRAD = "needs Transformer Engine's fused weight-gradient accumulation"
_PHASES_BATCH = "the phases file sets each phase's global_batch_size (--phases)"
_GPT2_BPE = "GPT-2 BPE files are not read: --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json"


FLAGS = (
    # Already the project's behaviour.
    MegatronFlag("--use-mcore-models", "always Megatron-Core's GPTModel"),
    MegatronFlag(
        "--calculate-per-token-loss",
        "the default --loss-normalization tokens: the step's loss over its unmasked tokens",
    ),
    MegatronFlag("--ckpt-format", "dist checkpoints (torch_dist) are the one format", str, ("torch_dist",)),
    MegatronFlag("--use-dist-ckpt", "dist checkpoints are the one format"),
    MegatronFlag(
        "--context-parallel-size",
        "no context parallelism: Crystal's 2048-token rows fit one GPU; use tensor and pipeline parallelism",
        int,
        (1,),
    ),
    MegatronFlag("--use-flash-attn", "= --attention-backend flash", implies=("attention_backend", "flash")),
    MegatronFlag(
        "--cross-entropy-loss-fusion",
        "the kernel path's fused cross-entropy where it has one (Triton on a GPU; the start-up line names the path)",
    ),
    MegatronFlag(
        "--no-create-attention-mask-in-dataloader",
        "no mask is built by the data loader: attention is causal in the kernel",
    ),
    MegatronFlag("--no-position-embedding", "Crystal has no learned position embedding (rotary)"),
    MegatronFlag("--use-rotary-position-embeddings", "Crystal's rotary embeddings"),
    MegatronFlag("--position-embedding-type", "Crystal's rotary embeddings", str, ("rope",)),
    MegatronFlag("--rotary-percent", "the model's rotary fraction", float, _preset("rotary_percent")),
    MegatronFlag("--rotary-base", "the model's rotary base", int, _preset("rotary_base")),
    MegatronFlag(
        "--rotary-interleave-repeat",
        "Crystal's rotary layout (interleaved pairs, as the release: the exported model's logits match)",
    ),
    MegatronFlag("--rotary-stay-fp32", "the rotary frequencies are computed in fp32"),
    MegatronFlag("--norm-epsilon", "the model's LayerNorm epsilon", float, _preset("layernorm_epsilon")),
    MegatronFlag("--normalization", "Crystal uses LayerNorm", str, ("LayerNorm",)),
    MegatronFlag(
        "--max-position-embeddings",
        "rotary embeddings have no table; must cover the sequence length",
        int,
        lambda crystal: lambda v: v >= crystal.seq_length,
    ),
    MegatronFlag("--attention-softmax-in-fp32", "the attention kernels accumulate the softmax in fp32"),
    MegatronFlag("--no-query-key-layer-scaling", "no query-key layer scaling (Megatron-Core's default)"),
    MegatronFlag("--swiglu", "Crystal's MLP is SwiGLU"),
    MegatronFlag("--attention-dropout", "Crystal trains without dropout", float, (0.0,)),
    MegatronFlag("--hidden-dropout", "Crystal trains without dropout", float, (0.0,)),
    MegatronFlag(
        "--kv-channels",
        "the model's head width (hidden size / heads)",
        int,
        lambda crystal: crystal.hidden_size // crystal.num_attention_heads,
    ),
    MegatronFlag(
        "--num-query-groups",
        "Crystal has full multi-head attention: as many groups as heads",
        int,
        _preset("num_attention_heads"),
    ),
    MegatronFlag(
        "--use-mup",
        "Crystal is muP-parametrised (the preset's width scale, embedding scale, output alpha and initialisation)",
    ),
    MegatronFlag("--mup-width-scale", "the model's muP width scale", float, _preset("mup_width_scale")),
    MegatronFlag("--mup-embeddings-scale", "the model's muP embedding scale", float, _preset("mup_embeddings_scale")),
    MegatronFlag("--mup-output-alpha", "the model's muP output alpha", float, _preset("mup_output_alpha")),
    MegatronFlag("--mup-scale-qk-dot-by-d", "muP's attention scale 1/d (not 1/sqrt(d))"),
    MegatronFlag("--log-throughput", "the log line always shows tokens/s, and on GPUs TFLOP/s per GPU and MFU"),
    MegatronFlag("--tensorboard-queue-size", "TensorBoard's writer queue: what is written is the same", int),
    MegatronFlag(
        "--no-load-rng",
        "no random state is checkpointed: Crystal has no dropout, and the data order is a "
        "function of the seed and the position",
    ),
    MegatronFlag(
        "--use-checkpoint-args",
        "the checkpoint's model shape is checked against the run's; a difference is refused in one line naming both",
    ),
    MegatronFlag(
        "--no-mmap-bin-files",
        "the indexed files are memory-mapped either way: the samples are the same "
        "(the page cache is shared by ranks and workers)",
    ),
    MegatronFlag("--tiktoken-pattern", "no effect: only for TikTokenizer, which this project does not read", str),
    MegatronFlag(
        "--dataloader-type",
        "the sampler reads in order from the resume point (single); cyclic's random "
        "order is refused: the phases file orders the data (order: cerebras is Crystal's)",
        str,
        ("single",),
    ),
    MegatronFlag("--fp8-amax-compute-algo", "delayed scaling takes the largest amax of the history", str, ("max",)),
    MegatronFlag(
        "--no-gradient-accumulation-fusion",
        "weight gradients accumulate in PyTorch (the fused accumulation needs apex or Transformer Engine's wgrad)",
    ),
    MegatronFlag("--no-masked-softmax-fusion", "no masked-softmax fusion: the attention backends mask causally"),
    MegatronFlag("--no-persist-layer-norm", "apex's persistent LayerNorm kernel is not used"),
    MegatronFlag("--rotary-interleaved", "Crystal's rotary layout is interleaved (rotate every two)"),
    MegatronFlag(
        "--mup-base-hidden-size",
        "the model's muP base width (hidden size x width scale)",
        int,
        lambda crystal: lambda v: v == round(crystal.hidden_size * crystal.mup_width_scale),
    ),
    MegatronFlag(
        "--cross-entropy-fusion-impl",
        "the kernel path's cross-entropy (fused with Triton on a GPU), not Transformer Engine's",
        str,
        ("native",),
    ),
    MegatronFlag(
        "--async-strategy",
        "with --async-save, Megatron-Core's own background writer (nvrx, NVIDIA's resiliency extension, is not "
        "installed)",
        str,
        ("mcore",),
    ),
    MegatronFlag(
        "--ckpt-assume-constant-structure",
        "each save plans its layout anew (Megatron-Core's cached plan is a speed-up only): the same files",
    ),
    MegatronFlag(
        "--dist-ckpt-optim-fully-reshardable",
        "the distributed optimizer's state is always saved fully reshardable (any TP / PP / DP on load)",
    ),
    MegatronFlag(
        "--dist-ckpt-strictness",
        "a key the run needs and the checkpoint lacks is a one-line error; keys it has beyond those are ignored",
        str,
        ("assume_ok_unexpected", "log_unexpected", "log_all"),
    ),
    MegatronFlag(
        "--num-distributed-optimizer-instances",
        "one distributed optimizer over all data-parallel ranks",
        int,
        (1,),
    ),
    MegatronFlag(
        "--rerun-mode",
        "Megatron-LM's rerun state machine is not used: a non-finite or spiking loss skips the step "
        "(--loss-spike-window), never reruns it",
        str,
        ("disabled",),
    ),
    MegatronFlag(
        "--async-ckpt-use-cpu-shm",
        "with --async-save the tensors are copied to host memory in the training process before the background "
        "write (Megatron-Core's torch_dist async strategy)",
    ),
    # Not implemented yet (issue #35): refused with what does the same here.
    # Refused, with the equivalent.
    MegatronFlag("--fp16", "Crystal trains in bf16: use --bf16", agrees=False),
    MegatronFlag(
        "--rampup-batch-size",
        _PHASES_BATCH,
        str,
        agrees=False,
        nargs="*",
    ),
    MegatronFlag(
        "--use-megatron-fsdp",
        "Megatron-FSDP is not used: --use-distributed-optimizer shards the optimizer state",
        agrees=False,
    ),
    MegatronFlag(
        "--use-torch-fsdp2", "FSDP2 is not used: --use-distributed-optimizer shards the optimizer state", agrees=False
    ),
    MegatronFlag(
        "--tp-comm-overlap",
        "Crystal's TP is at most 2 (FFN width 10922): use --overlap-grad-reduce and --overlap-param-gather",
        agrees=False,
    ),
    MegatronFlag(
        "--vocab-file",
        _GPT2_BPE,
        str,
        agrees=False,
    ),
    MegatronFlag(
        "--merge-file",
        _GPT2_BPE,
        str,
        agrees=False,
    ),
    MegatronFlag(
        "--decoupled-lr",
        "muP sets the embedding's and the output's lr (--lr; the hidden matrices "
        "--lr x the width scale): another lr for them would undo muP's transfer",
        float,
        agrees=False,
    ),
    MegatronFlag(
        "--decoupled-min-lr", "muP sets the embedding's and the output's lr: see --decoupled-lr", float, agrees=False
    ),
    MegatronFlag("--group-query-attention", "Crystal has full multi-head attention", agrees=False),
    MegatronFlag(
        "--untie-embeddings-and-output-weights", "Crystal ties the embedding and the output layer", agrees=False
    ),
    MegatronFlag("--disable-bias-linear", "Crystal's linear layers have biases", agrees=False),
    MegatronFlag("--apply-layernorm-1p", "Crystal's LayerNorm is the plain one", agrees=False),
    MegatronFlag(
        "--init-method-std",
        "muP sets the initialisation from the width (base std 0.073): --model and --hidden-size",
        float,
        agrees=False,
    ),
    MegatronFlag("--apply-query-key-layer-scaling", "Crystal scales attention by muP's 1/d", agrees=False),
    MegatronFlag("--qk-layernorm", "Crystal has no query-key LayerNorm", agrees=False),
    MegatronFlag("--squared-relu", "Crystal's MLP is SwiGLU", agrees=False),
    MegatronFlag(
        "--step-batch-size-schedule",
        _PHASES_BATCH,
        str,
        agrees=False,
        nargs="*",
    ),
    MegatronFlag(
        "--eval-global-batch-size",
        "validation reads batches of the training --global-batch-size: --eval-iters sets how many",
        int,
        agrees=False,
    ),
    MegatronFlag("--fim-data", "FIM is set per source and phase in the phases file (fim: fim_rate)", agrees=False),
    MegatronFlag(
        "--fim-rate", "FIM is set per source and phase in the phases file (fim: fim_rate)", float, agrees=False
    ),
    MegatronFlag(
        "--fim-spm-rate", "FIM is set per source and phase in the phases file (fim: fim_spm_rate)", float, agrees=False
    ),
    MegatronFlag(
        "--error-injection-rate",
        "the rerun state machine's fault injection is not used (--rerun-mode disabled); tests inject faults from "
        "outside the training (tests/helpers/fault_injection.py)",
        int,
        agrees=False,
    ),
    MegatronFlag(
        "--error-injection-type",
        "the rerun state machine's fault injection is not used (--rerun-mode disabled)",
        str,
        agrees=False,
    ),
    MegatronFlag("--test-mode", "Megatron-Core's internal test hooks are not wired", agrees=False),
    MegatronFlag(
        "--straggler-ctrlr-port",
        "no runtime switch for the straggler detector: --log-straggler is set at launch (one all-gather of a float "
        "per log interval)",
        int,
        agrees=False,
    ),
    MegatronFlag(
        "--disable-straggler-on-startup",
        "no runtime switch for the straggler detector: leave out --log-straggler",
        agrees=False,
    ),
    MegatronFlag(
        "--account-for-embedding-in-pipeline-split",
        _EQUAL_STAGES,
        agrees=False,
    ),
    MegatronFlag(
        "--account-for-loss-in-pipeline-split",
        _EQUAL_STAGES,
        agrees=False,
    ),
    MegatronFlag(
        "--decoder-first-pipeline-num-layers",
        _EQUAL_STAGES,
        int,
        agrees=False,
    ),
    MegatronFlag(
        "--decoder-last-pipeline-num-layers",
        _EQUAL_STAGES,
        int,
        agrees=False,
    ),
    MegatronFlag(
        "--microbatch-group-size-per-virtual-pipeline-stage",
        "the interleaved schedule groups micro-batches by the pipeline size (Megatron-Core's default)",
        int,
        agrees=False,
    ),
    MegatronFlag(
        "--overlap-p2p-communication-warmup-flush",
        "the pipeline's point-to-point transfers are not overlapped with the warm-up and flush",
        agrees=False,
    ),
    MegatronFlag(
        "--overlap-param-gather-with-optimizer-step",
        "not wired: --overlap-param-gather overlaps the gather with the next forward",
        agrees=False,
    ),
    MegatronFlag(
        "--defer-embedding-wgrad-compute",
        _TE_WGRAD,
        agrees=False,
    ),
    MegatronFlag("--wgrad-deferral-limit", _TE_WGRAD, int, agrees=False),
    MegatronFlag(
        "--disable-gloo-process-groups",
        "the distributed optimizer's checkpoints gather over Megatron-Core's gloo groups",
        agrees=False,
    ),
    MegatronFlag(
        "--ddp-average-in-collective",
        "gradients are summed and the loss divided by the step's tokens (--calculate-per-token-loss), with which "
        "Megatron-LM refuses it too",
        agrees=False,
    ),
    MegatronFlag(
        "--use-tp-pp-dp-mapping",
        "ranks are placed in Megatron-Core's default order (tensor, data, pipeline)",
        agrees=False,
    ),
    MegatronFlag(
        "--cp-comm-type",
        _NO_CP,
        str,
        agrees=False,
    ),
    MegatronFlag(
        "--hierarchical-context-parallel-sizes",
        _NO_CP,
        str,
        agrees=False,
        nargs="*",
    ),
    MegatronFlag("--expert-tensor-parallel-size", "Crystal has no experts", int, agrees=False),
    MegatronFlag(
        "--tp-comm-overlap-cfg",
        "Crystal's TP is at most 2 (see --tp-comm-overlap)",
        str,
        agrees=False,
    ),
    MegatronFlag(
        "--data-parallel-sharding-strategy",
        "Megatron-FSDP is not used: --use-distributed-optimizer shards the optimizer state",
        str,
        agrees=False,
    ),
    MegatronFlag("--megatron-fsdp-main-params-dtype", _NO_FSDP, str, agrees=False),
    MegatronFlag("--megatron-fsdp-main-grads-dtype", _NO_FSDP, str, agrees=False),
    MegatronFlag("--megatron-fsdp-grad-comm-dtype", _NO_FSDP, str, agrees=False),
    MegatronFlag(
        "--fp8-param-gather",
        "needs Transformer Engine's FP8 weights; the local FP8 path casts the bf16 "
        "weights each step (use --fp8-format alone)",
        agrees=False,
    ),
)
BY_DEST = {f.dest: f for f in FLAGS}

# Megatron-LM's other --tokenizer-type choices: refused with the form that reads the same files here.
_SENTENCEPIECE = "use CrystalTokenizer with the SentencePiece .model (the model's pieces, then Crystal's specials)"
REFUSED_TOKENIZER_TYPES = {
    "GPTSentencePieceTokenizer": _SENTENCEPIECE,
    "SentencePieceTokenizer": _SENTENCEPIECE,
    "Llama2Tokenizer": _SENTENCEPIECE,
    "GPT2BPETokenizer": "use HuggingFaceTokenizer with a tokenizer.json of the BPE vocabulary and merges",
    "TikTokenizer": "use HuggingFaceTokenizer with a tokenizer.json",
    "BertWordPieceLowerCase": "a BERT tokenizer: use HuggingFaceTokenizer with a tokenizer.json",
    "BertWordPieceCase": "a BERT tokenizer: use HuggingFaceTokenizer with a tokenizer.json",
    "MultimodalTokenizer": "Crystal reads text only",
    "NullMultimodalTokenizer": "Crystal reads text only: NullTokenizer",
    "SFTTokenizer": "chat templates are fine-tuning's: pretraining reads documents (CrystalTokenizer or "
    "HuggingFaceTokenizer)",
}


def help_text(f: MegatronFlag) -> str:
    if f.agrees is False:
        return f"refused: {f.does}"
    if isinstance(f.agrees, tuple):
        return f"accepted as {', '.join(map(str, f.agrees))}: {f.does}"
    return f"accepted: {f.does}"


def add_to_parser(parser) -> None:
    group = parser.add_argument_group(
        "Megatron-LM flags for what this project always does (accepted) or does not do (refused in one line with "
        "the equivalent); docs/training.md has the table"
    )
    for f in FLAGS:
        if f.value is SWITCH:
            group.add_argument(f.flag, action="store_true", help=help_text(f))
        else:
            group.add_argument(f.flag, type=f.value, nargs=f.nargs, metavar=f.dest.upper(), help=help_text(f))


def problem(dest: str, value, crystal) -> str | None:
    """The one-line refusal of a given table flag, or None when it agrees with the run."""
    f = BY_DEST[dest]
    shown = f.flag if f.value is SWITCH else f"{f.flag} {' '.join(map(str, value)) if f.nargs else value}"
    agrees = f.agrees(crystal) if callable(f.agrees) else f.agrees
    if callable(agrees):
        ok = agrees(value)
    elif isinstance(agrees, tuple):
        ok = value in agrees
    elif isinstance(agrees, bool):
        ok = agrees
    else:  # the preset's one value
        ok = value == agrees
        if not ok:
            return (
                f"{shown}: {f.does} is {agrees}: the flag may only restate it (--model and its shape flags, such as "
                "--hidden-size, set the model)"
            )
    return None if ok else f"{shown}: refused: {f.does}"


def check(given: dict, crystal) -> dict:
    """Refuse the given table flags that disagree with the run; returns the fields they stand for."""
    from megatron_ext.training.run_config import ArgumentError

    implied = {}
    if given.get("calculate_per_token_loss") and given.get("loss_normalization") == "positions":
        raise ArgumentError("--calculate-per-token-loss and --loss-normalization positions: give one of them")
    for dest, value in given.items():
        if dest not in BY_DEST:
            continue
        line = problem(dest, value, crystal)
        if line:
            raise ArgumentError(line)
        f = BY_DEST[dest]
        if f.implies:
            field, wanted = f.implies
            if given.get(field, wanted) != wanted:
                raise ArgumentError(f"{f.flag} means --{field.replace('_', '-')} {wanted}; drop one of them")
            implied[field] = wanted
    return implied


def table_markdown() -> str:
    """docs/training.md's table, from the rows above (a test holds the page to it)."""
    lines = ["| Megatron-LM flag | here |", "|---|---|"]
    lines += [f"| `{f.flag}` | {help_text(f)} |" for f in FLAGS]
    lines += [f"| `--tokenizer-type {name}` | refused: {why} |" for name, why in REFUSED_TOKENIZER_TYPES.items()]
    return "\n".join(lines)
