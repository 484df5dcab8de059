"""The run's configuration: every flag of pretrain_crystal.py, with its default and its one-line doc, in sections.

The one source of the command line. A section's fields are its flags (field name = flag name, as
Megatron-LM's ArgumentGroupFactory builds argparse from its dataclasses; arguments.build_parser does it
here), each with its default and the docstring under it, unless marked `derived()`: a value the run works
out (the model config, the data-parallel size, the kernel path), which has no flag. Each section checks
its own fields in __post_init__ (one line naming the flag); arguments.validate keeps the checks that span
sections, resolves the defaults that depend on other flags (a phases file sets the lr schedule) and fills
the derived fields. The result is frozen; nothing downstream of the command line sees argparse.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from megatron_ext.checkpoint_files import TRACKER
from megatron_ext.kernels.fp8_scaling import FORMATS, RECIPES
from megatron_ext.kernels.selection import ATTENTION_BACKENDS, TE_ONLY_RECIPES
from megatron_ext.tokenizer.crystal_tokenizer import DEFAULT_TOKENIZER_TYPE, TOKENIZER_TYPES
from megatron_ext.training.megatron_flags import REFUSED_TOKENIZER_TYPES

if TYPE_CHECKING:  # the command line's checks import no Megatron-Core (they run in a second)
    from megatron_ext.data.phases_config import PhasesConfig
    from megatron_ext.kernels.selection import KernelPath
    from megatron_ext.model.crystal_config import CrystalConfig
    from megatron_ext.model.crystal_gpt import ParallelLayout


class ArgumentError(ValueError):
    """A bad command line; the message is one line that names the flag."""


def require(condition: Any, message: str) -> None:
    if not condition:
        raise ArgumentError(message)


def option(default: Any, *, choices=None, flag: str | None = None, aliases: tuple[str, ...] = ()) -> Any:
    """A flag field with more than a default: its choices, a flag name other than the field's, aliases."""
    return field(default=default, metadata={"choices": choices, "flag": flag, "aliases": aliases})


def derived(*, compare: bool = True, default: Any = dataclasses.MISSING) -> Any:
    """A value the run works out, not a flag (arguments.validate fills it)."""
    return field(default=default, compare=compare, metadata={"derived": True})


def flag_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]


def flag_name(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def default_of(cls, name: str) -> Any:
    """A flag's default, for the tools and the sweep planner that share it (one place to change it)."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


@functools.cache
def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source (as Sphinx reads attribute
    docstrings; Python keeps none at run time)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """model"""

    preset: str = option("crystal-tiny", flag="model")
    """the model preset (crystal-7b, crystal-1b, crystal-tiny, crystal-test); the shape flags override it"""
    num_layers: int | None = None
    """override the preset's number of layers"""
    hidden_size: int | None = None
    """override the preset's hidden size"""
    num_attention_heads: int | None = None
    """override the preset's number of attention heads"""
    ffn_hidden_size: int | None = None
    """override the preset's FFN width"""
    seq_length: int | None = None
    """override the preset's sequence length"""
    vocab_size: int | None = None
    """override the vocabulary size (before padding; default: the tokenizer's, else the preset's)"""
    make_vocab_size_divisible_by: int = 128
    """pad the vocabulary to a multiple of this, the same at every TP size (32032 -> 32128)"""
    mup_scale_bias_lr: bool = False
    """also scale the lr of biases and norms by the muP width scale (LLM360's Megatron port did)"""
    crystal: CrystalConfig = derived()
    """the preset with the overrides and the tokenizer's vocabulary size"""

    @property
    def padded_vocab(self) -> int:
        from megatron_ext.model.crystal_gpt import padded_vocab_size

        return padded_vocab_size(self.crystal.vocab_size, self.make_vocab_size_divisible_by)


@dataclass(frozen=True, kw_only=True)
class LayoutSection:
    """parallelism"""

    tensor_model_parallel_size: int = 1
    """tensor-parallel size (TP)"""
    pipeline_model_parallel_size: int = 1
    """pipeline-parallel size (PP)"""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """layers per model chunk; enables the interleaved 1F1B schedule"""
    num_virtual_stages_per_pipeline_rank: int | None = None
    """model chunks per pipeline stage: the other way to ask for the interleaved schedule (Megatron-LM's; give one of
    the two)"""
    sequence_parallel: bool = False
    """split the activations outside tensor-parallel regions along the sequence (off at TP 1, as in Megatron-LM)"""
    use_distributed_optimizer: bool = False
    """shard the optimizer state over data-parallel ranks (Megatron-Core's distributed optimizer)"""
    distributed_backend: str | None = option(None, choices=("nccl", "gloo"))
    """process-group backend (default: nccl with CUDA, gloo without)"""
    micro_batch_size: int = 1
    """samples per micro-batch and data-parallel rank"""
    overlap_grad_reduce: bool = False
    """overlap the data-parallel gradient reduction with the backward pass, bucket by bucket"""
    overlap_param_gather: bool = False
    """with --use-distributed-optimizer: overlap the all-gather of updated parameters with the next forward"""
    ddp_bucket_size: int | None = None
    """elements per gradient-reduction bucket (default: Megatron-Core's, max(4e7, 1e6 x DP) with overlap, one bucket
    without)"""
    grad_reduce_in_bf16: bool = False
    """reduce gradients in bf16 instead of fp32 (half the bytes on the wire; needs --bf16)"""
    distributed_timeout_minutes: float = 10
    """how long a collective waits for the other ranks before the job ends (a fraction of a minute is accepted)"""
    check_weight_hash_across_dp_replicas_interval: int | None = None
    """every this many steps, compare a hash of every parameter across the data-parallel replicas (Megatron-Core's
    check_param_hashes_across_dp_replicas) and end the job in one line when they differ: silent corruption on one GPU
    shows as diverged replicas"""
    virtual_pipeline_model_parallel_size: int | None = derived()
    """model chunks per pipeline stage (None: no interleaving)"""
    data_parallel_size: int = derived()
    """world size / (TP x PP)"""

    def __post_init__(self):
        require(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")
        require(self.pipeline_model_parallel_size >= 1, "--pipeline-model-parallel-size must be >= 1")
        require(self.micro_batch_size >= 1, "--micro-batch-size must be >= 1")
        require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather needs --use-distributed-optimizer (the plain optimizer gathers no parameters)",
        )
        require(self.ddp_bucket_size is None or self.ddp_bucket_size >= 1, "--ddp-bucket-size must be >= 1")
        require(self.distributed_timeout_minutes > 0, "--distributed-timeout-minutes must be > 0")
        require(
            self.check_weight_hash_across_dp_replicas_interval is None
            or self.check_weight_hash_across_dp_replicas_interval >= 1,
            "--check-weight-hash-across-dp-replicas-interval must be >= 1",
        )

    def num_microbatches(self, global_batch_size: int) -> int:
        """Per step and data-parallel rank; a phase's batch size changes it, so it is asked, not stored."""
        return global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def model_layout(self) -> ParallelLayout:
        from megatron_ext.model.crystal_gpt import ParallelLayout

        return ParallelLayout(
            tensor_model_parallel_size=self.tensor_model_parallel_size,
            pipeline_model_parallel_size=self.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=self.virtual_pipeline_model_parallel_size,
            sequence_parallel=self.sequence_parallel,
        )


# Megatron-Core 0.16.1's recomputable submodules, and why this model refuses the ones it refuses.
RECOMPUTE_MODULES = {
    "core_attn": None,
    "mlp": "Megatron-Core 0.16.1's MLP recomputation does not end in backward on Crystal's MLP (its fc2 bias is "
    "returned through CheckpointFunction); use --recompute-granularity full",
    "layernorm": "Megatron-Core 0.16.1 recomputes layer norms only through Transformer Engine's "
    "CheckpointWithoutOutput, and with TE Crystal's layer norms are fused into the following linear",
    "moe": "Crystal has no MoE layers",
    "moe_act": "Crystal has no MoE layers",
    "shared_experts": "Crystal has no MoE layers",
    "mla_up_proj": "Crystal has no multi-latent attention",
}


@dataclass(frozen=True, kw_only=True)
class RecomputeSection:
    """activation recomputation (Megatron-Core's TransformerConfig.recompute_*)"""

    recompute_granularity: str | None = option(None, choices=("full", "selective"))
    """full: keep only each recomputed unit's input and redo its forward in backward (with --recompute-method and
    --recompute-num-layers); selective: redo the --recompute-modules only"""
    recompute_method: str | None = option(None, choices=("uniform", "block"))
    """with full: uniform recomputes every layer, in units of --recompute-num-layers; block recomputes the first
    --recompute-num-layers layers of each model chunk"""
    recompute_num_layers: int | None = None
    """with full: layers per recomputed unit (uniform), or layers recomputed per model chunk (block)"""
    recompute_activations: bool = False
    """selective recomputation of the core attention (= --recompute-granularity selective)"""
    recompute_modules: tuple[str, ...] = ("core_attn",)
    """with selective: the submodules to recompute (this model: core_attn)"""

    def __post_init__(self):
        granularity = self.granularity
        require(
            not (self.recompute_activations and self.recompute_granularity == "full"),
            "--recompute-activations is --recompute-granularity selective; it cannot go with full",
        )
        if granularity == "full":
            require(self.recompute_method, "--recompute-granularity full needs --recompute-method uniform or block")
            require(
                self.recompute_num_layers is not None and self.recompute_num_layers >= 1,
                f"--recompute-method {self.recompute_method} needs --recompute-num-layers N >= 1",
            )
        else:
            require(
                self.recompute_method is None and self.recompute_num_layers is None,
                "--recompute-method and --recompute-num-layers need --recompute-granularity full",
            )
        for module in self.recompute_modules:
            require(
                module in RECOMPUTE_MODULES, f"--recompute-modules {module}: not one of {', '.join(RECOMPUTE_MODULES)}"
            )
            reason = RECOMPUTE_MODULES[module]
            require(granularity != "selective" or reason is None, f"--recompute-modules {module}: {reason}")

    @property
    def granularity(self) -> str | None:
        return "selective" if self.recompute_activations else self.recompute_granularity

    def transformer_options(self) -> dict:
        """The TransformerConfig fields (empty without recomputation)."""
        if self.granularity is None:
            return {}
        options = {"recompute_granularity": self.granularity}
        if self.granularity == "full":
            options.update(recompute_method=self.recompute_method, recompute_num_layers=self.recompute_num_layers)
        else:
            options["recompute_modules"] = list(self.recompute_modules)
        return options


@dataclass(frozen=True, kw_only=True)
class OptimizerSection:
    """batch and schedule (with --phases the lr fields and the batch size are the first phase's: what the
    scheduler is built with; each phase applies its own when it starts)"""

    global_batch_size: int = 8
    """samples per step; with --phases, the batch size of phases that give none"""
    train_iters: int = 100
    """steps to train (with --phases default: the phases' total; fewer stops the run early)"""
    exit_duration_in_mins: float | None = None
    """stop (saving first, with --save, and leaving the stop marker the SLURM launcher requeues on) at the first
    step after this many minutes since the process started, every rank at the same step (Megatron-LM's)"""
    exit_interval: int | None = None
    """stop (saving first, with --save) once the iteration is a multiple of this"""
    max_skipped_steps: int = 5
    """stop after this many consecutive steps whose gradients were not finite (each is skipped)"""
    loss_spike_window: int = 0
    """skip the update of a step whose loss exceeds mean + k sigma of the last this many applied steps (0: off); such
    steps count towards --max-skipped-steps"""
    loss_spike_sigma: float = 6.0
    """k of --loss-spike-window"""
    lr: float = 1.2e-2
    """muP's base learning rate (Crystal's phase 1): the embedding's, biases' and norms'; the hidden matrices
    train at --lr x the width scale (0.0625 on crystal-7b: Megatron-LM's --lr 1.5e-4 would give them 9.4e-6);
    the start-up line prints every group's. With --phases the file sets it"""
    min_lr: float = 0.0
    """the lr at the end of the decay"""
    lr_warmup_iters: int = 0
    """linear warm-up steps"""
    lr_decay_iters: int | None = None
    """decay length (default: --train-iters)"""
    lr_decay_style: str = option("linear", choices=("constant", "linear", "cosine", "inverse-square-root"))
    """the lr decay's shape"""
    train_samples: int | None = None
    """samples to train, instead of --train-iters (Megatron-LM's sample-based schedule): the run takes
    train_samples // --global-batch-size steps and its lr schedule counts samples (--lr-warmup-samples,
    --lr-decay-samples)"""
    lr_warmup_samples: int = 0
    """with --train-samples: linear warm-up over this many samples"""
    lr_decay_samples: int | None = None
    """with --train-samples: decay length in samples (default: --train-samples)"""
    lr_warmup_fraction: float | None = None
    """the warm-up as a fraction of the decay length, instead of --lr-warmup-iters or --lr-warmup-samples"""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay"""
    adam_beta1: float = 0.9
    """Adam's beta1"""
    adam_beta2: float = 0.95
    """Adam's beta2"""
    adam_eps: float = 1e-9
    """Adam's epsilon"""
    clip_grad: float = 1.0
    """gradient-norm clipping"""
    loss_normalization: str = option("tokens", choices=("tokens", "positions"))
    """what the summed token losses of a step are divided by: tokens, the tokens whose loss counts (Megatron-LM's
    --calculate-per-token-loss); positions, every position of the step's samples, masked or not (Cerebras's
    loss_scaling batch_size with loss_weight 1/seq-length, as Crystal trained). The logged lm loss is per token
    either way; the two differ only where a loss mask is 0 (padding of HDF5 samples)"""
    seed: int = 1234
    """random seed (initialisation, data order, FIM draws)"""

    def __post_init__(self):
        require(self.global_batch_size >= 1, "--global-batch-size must be >= 1")
        require(self.train_iters >= 1, "--train-iters must be >= 1")
        require(self.max_skipped_steps >= 1, "--max-skipped-steps must be >= 1")
        require(
            self.exit_duration_in_mins is None or self.exit_duration_in_mins > 0, "--exit-duration-in-mins must be > 0"
        )
        require(
            self.loss_spike_window == 0 or self.loss_spike_window >= 2, "--loss-spike-window must be 0 (off) or >= 2"
        )
        require(self.loss_spike_sigma > 0, "--loss-spike-sigma must be > 0")
        samples = self.train_samples is not None
        for name in ("lr_warmup_samples", "lr_decay_samples") if not samples else ("lr_warmup_iters",):
            given = getattr(self, name) not in (0, None)
            require(not given, f"--{name.replace('_', '-')} {getattr(self, name)}: " + (
                "with --train-samples the schedule counts samples: use --lr-warmup-samples" if samples
                else "needs --train-samples (a sample-based schedule); iteration-based: its -iters flag"))  # fmt: skip
        require(
            self.lr_warmup_fraction is None or (self.lr_warmup_iters == 0 and self.lr_warmup_samples == 0),
            "--lr-warmup-fraction: give one of it, --lr-warmup-iters and --lr-warmup-samples",
        )
        require(
            self.lr_warmup_fraction is None or 0 <= self.lr_warmup_fraction < 1,
            f"--lr-warmup-fraction {self.lr_warmup_fraction} must lie in [0, 1)",
        )
        warmup, decay, _ = self.scheduler_steps()
        unit = "samples" if samples else "iters"
        require(0 <= warmup < decay, f"the warm-up ({warmup:g} {unit}) must be below the decay length ({decay} {unit})")
        require(0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must lie in [0, --lr {self.lr}]")

    def scheduler_steps(self) -> tuple[float, int, int]:
        """(warm-up, decay length, increment per step) in the lr scheduler's unit: samples with --train-samples,
        as Megatron-LM (which counts samples always, the same schedule as iterations for a fixed batch);
        iterations otherwise. A --lr-warmup-fraction warm-up may end between steps, as in Megatron-LM."""
        if self.train_samples is not None:
            decay = self.lr_decay_samples if self.lr_decay_samples is not None else self.train_samples
            warmup = self.lr_warmup_samples if self.lr_warmup_fraction is None else self.lr_warmup_fraction * decay
            return warmup, decay, self.global_batch_size
        decay = self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters
        warmup = self.lr_warmup_iters if self.lr_warmup_fraction is None else self.lr_warmup_fraction * decay
        return warmup, decay, 1


LR_FIELDS = (  # a phases file sets these
    "lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style", "train_samples", "lr_warmup_samples",
    "lr_decay_samples", "lr_warmup_fraction",
)  # fmt: skip


# --deterministic-mode's environment: the first value is set where the variable is unset, a given one must be among
# these (Megatron-LM's megatron/training/determinism.py: Tree's reduction order is not fixed, NVLS's neither).
DETERMINISTIC_ENVIRONMENT = {
    "CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8"),
    "NCCL_ALGO": ("Ring", "CollnetDirect", "CollnetChain", "^NVLS"),
    "NVTE_ALLOW_NONDETERMINISTIC_ALGO": ("0",),
}


@dataclass(frozen=True, kw_only=True)
class KernelSection:
    """kernels (megatron_ext/kernels/selection.py)"""

    bf16: bool = False
    """bf16 mixed precision (GPU); CPU runs train in fp32"""
    transformer_impl: str = option("auto", choices=("auto", "transformer_engine", "local"))
    """auto: Transformer Engine's layers when TE imports and a GPU is present, else the local spec with this project's
    kernels"""
    attention_backend: str = option("auto", choices=ATTENTION_BACKENDS)
    """local spec: auto/flash = torch SDPA, unfused/local = Megatron-Core's DotProductAttention; TE: passed to TE"""
    fp8_format: str | None = option(None, choices=FORMATS)
    """train the linear layers in FP8 (H100-class GPUs); hybrid: e4m3 forward, e5m2 gradients"""
    fp8_recipe: str = option("delayed", choices=RECIPES + TE_ONLY_RECIPES)
    """delayed: scales from an amax history; tensorwise: from the current amax (mxfp8 and blockwise: TE only)"""
    fp8_amax_history_len: int = 1024
    """steps of amax history for delayed scaling"""
    fp8_margin: int = 0
    """scale down by 2^margin below the largest representable"""
    fp8_cpu_emulation: bool = False
    """allow --fp8-format on CPU (torch._scaled_mm's CPU kernel): for tests, not for speed"""
    rope_fusion: bool = True
    """the fused rotary kernel (Triton, on a GPU); --no-rope-fusion: PyTorch's rotary ops"""
    deterministic_mode: bool = False
    """bitwise-reproducible steps (Megatron-LM's): torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG :4096:8
    and NCCL_ALGO Ring unless set to a deterministic value; slower on a GPU (CPU steps are deterministic anyway)"""
    path: KernelPath = derived()
    """the kernels chosen for this machine"""

    def __post_init__(self):
        require(self.fp8_amax_history_len >= 1, "--fp8-amax-history-len must be >= 1")
        require(self.fp8_margin >= 0, "--fp8-margin must be >= 0")
        if self.deterministic_mode:
            for name, accepted in DETERMINISTIC_ENVIRONMENT.items():
                given = os.environ.get(name)
                values = given.split(",") if name == "NCCL_ALGO" and given else [given]
                require(
                    given is None or set(values) <= set(accepted),
                    f"--deterministic-mode: {name}={given} is not deterministic; use {' or '.join(accepted)}",
                )


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """data"""

    data_path: tuple[str, ...] | None = None
    """Megatron blend: [w1] prefix1 [w2 prefix2 ...]"""
    mock_data: bool = False
    """Megatron-Core's MockGPTDataset instead of --data-path"""
    phases: str | None = None
    """phases file (YAML): sources, and phases with their blend, FIM rates, lr schedule and batch size; instead of
    --data-path, and the --lr* flags are refused beside it"""
    tokenizer_type: str = option(
        DEFAULT_TOKENIZER_TYPE, choices=(*TOKENIZER_TYPES, "NullTokenizer", *REFUSED_TOKENIZER_TYPES)
    )
    """CrystalTokenizer: a SentencePiece .model plus Crystal's specials; HuggingFaceTokenizer: a tokenizer.json;
    NullTokenizer (Megatron-LM's): none, the ids as they are (with --mock-data or ready ids; --vocab-size)"""
    tokenizer_model: str | None = None
    """SentencePiece .model (or tokenizers .json); sets the vocabulary size"""
    split: str = "969,30,1"
    """train,valid,test split of --data-path documents"""
    data_cache_path: str | None = None
    """where the dataset indices are built once and memory-mapped (Megatron-Core's for --data-path; with --phases, the
    sources' under phases/; default with --phases: data_cache in --save)"""
    num_workers: int = 2
    """DataLoader workers per reading rank"""
    phases_start: str | None = None
    """with --phases: begin at PHASE:STEP, a phase (its name or 1-based number) after STEP of its steps, with that
    step's data position, iteration and lr (e.g. phase2-code:12000 beside the import of LLM360's
    CrystalCoder_phase2_checkpoint_012000); taken when the run starts at iteration 0, not when it resumes"""
    blend: tuple[list[str], list[float] | None] | None = derived()
    """--data-path parsed: prefixes, weights (None: equal)"""
    phases_config: PhasesConfig | None = derived()
    """the phases file, checked"""
    start_point: tuple[int, int] | None = derived(default=None)
    """--phases-start resolved: (phase index, steps done in it)"""
    index_cache_dir: str | None = derived()
    """the phases' source indices (data/index_cache.py); None: in memory"""
    tokenizer: Any = derived(compare=False, default=None)
    """the process's one tokenizer (None without --tokenizer-model), shared by the datasets, FIM and the checks"""

    def __post_init__(self):
        require(
            sum(map(bool, (self.data_path, self.mock_data, self.phases))) == 1,
            "give exactly one of --data-path, --mock-data and --phases",
        )
        require(self.num_workers >= 0, "--num-workers must be >= 0")
        require(
            self.tokenizer_type not in REFUSED_TOKENIZER_TYPES,
            f"--tokenizer-type {self.tokenizer_type}: refused: {REFUSED_TOKENIZER_TYPES.get(self.tokenizer_type)}",
        )
        require(
            self.tokenizer_type != "NullTokenizer" or not self.tokenizer_model,
            f"--tokenizer-type NullTokenizer reads no file: drop --tokenizer-model {self.tokenizer_model}",
        )
        parts = re.split(r"[,/]", self.split.replace(" ", ""))
        require(
            len(parts) <= 3 and all(re.fullmatch(r"\d+(\.\d*)?|\.\d+", x) for x in parts)
            and sum(map(float, parts)) > 0,
            f"--split {self.split}: expected up to three non-negative proportions train,valid,test (e.g. 969,30,1), "
            "not all zero",
        )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class CheckpointSection:
    """checkpoints"""

    save: str | None = None
    """checkpoint directory"""
    load: str | None = None
    """checkpoint directory to resume from; one with no checkpoint, or none yet, starts fresh with a line
    saying so (Megatron-LM's behaviour, which first launches of --save = --load scripts rely on)"""
    exit_on_missing_checkpoint: bool = False
    """with --load: refuse to start when it holds no checkpoint, instead of starting fresh (Megatron-LM)"""
    ckpt_step: int | None = None
    """with --load: resume from this iteration's checkpoint (default: the latest)"""
    finetune: bool = False
    """with --load: take the model weights only; optimizer, scheduler and iteration start afresh"""
    no_load_optim: bool = False
    """with --load: resume the weights, the iteration and the data position, but not the optimizer's state nor the
    lr scheduler's (Megatron-LM's meaning: the lr schedule starts again from its step 0)"""
    pretrained_checkpoint: str | None = None
    """the weights to start from when --load holds no checkpoint yet (or without --load), as in Megatron-LM: fresh
    optimizer and schedule, iteration 0 (e.g. tools/convert_from_hf.py's import); with --save = --load a requeued
    job resumes its own checkpoint instead"""
    override_opt_param_scheduler: bool = option(False, aliases=("--override-opt_param-scheduler",))
    """with --load: train on with this run's lr schedule (flags, or the phases file) where it differs from the
    checkpoint's (refused otherwise)"""
    use_checkpoint_opt_param_scheduler: bool = option(False, aliases=("--use-checkpoint-opt_param-scheduler",))
    """with --load: keep the checkpoint's lr schedule, whatever the flags say"""
    save_interval: int | None = None
    """save every this many steps (default: only at the end when --save is given)"""
    keep_last_checkpoints: int | None = None
    """remove older checkpoints, keeping this many (default: all)"""
    save_retain_interval: int | None = None
    """remove each checkpoint once the next is complete unless its iteration is a multiple of this (Megatron-LM's; a
    multiple of --save-interval); with --keep-last-checkpoints the newest ones are kept too"""
    use_persistent_ckpt_worker: bool = False
    """with --async-save: one background writer process for the whole run instead of one per save (Megatron-Core's
    persistent AsyncCallsQueue)"""
    ckpt_fully_parallel_save: bool = True
    """each data-parallel rank writes its share of the checkpoint (Megatron-LM's default); with
    --no-ckpt-fully-parallel-save the first data-parallel rank of each model-parallel group writes all of it"""
    ckpt_fully_parallel_load: bool = False
    """each data-parallel rank reads a share of the checkpoint and they exchange the rest, instead of every rank
    reading all of it"""
    verify_integrity: bool = True
    """hash every file of a checkpoint as it is saved (its integrity.json, Megatron-Core's manifest) and check the
    hashes before a checkpoint is trusted: a resume passes over one whose bytes changed, with a line naming the
    file, for the newest that verifies (Megatron-LM's flag; on by default here, --no-verify-integrity: neither)"""
    max_restarts_from_one_checkpoint: int = 2
    """under torchrun --max-restarts: how many restarts in a row may resume at one iteration; the next stops the job
    in one line (its failure repeats before the next save) instead of restarting it again"""
    async_save: bool = False
    """write checkpoints in a background process while training goes on; the tracker (the resume point) moves
    only when every rank's write is complete, and the run's last save waits for it"""

    def __post_init__(self):
        if self.load is not None:
            require(not os.path.exists(self.load) or os.path.isdir(self.load), f"--load {self.load}: not a directory")
            require(
                not self.exit_on_missing_checkpoint or os.path.isfile(os.path.join(self.load, TRACKER)),
                f"--load {self.load}: no checkpoint there (no {TRACKER}), and --exit-on-missing-checkpoint is given",
            )
        require(self.load or not self.exit_on_missing_checkpoint, "--exit-on-missing-checkpoint needs --load")
        if self.pretrained_checkpoint is not None:
            require(
                os.path.isfile(os.path.join(self.pretrained_checkpoint, TRACKER)),
                f"--pretrained-checkpoint {self.pretrained_checkpoint}: no checkpoint there (no {TRACKER})",
            )
        if self.ckpt_step is not None:
            require(self.load is not None, "--ckpt-step needs --load")
            require(
                os.path.isdir(os.path.join(self.load, f"iter_{self.ckpt_step:07d}")),
                f"--ckpt-step {self.ckpt_step}: {self.load} has no iter_{self.ckpt_step:07d}",
            )
        require(
            not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
            "give at most one of --override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler",
        )
        require(
            self.keep_last_checkpoints is None or self.keep_last_checkpoints >= 1,
            "--keep-last-checkpoints must be >= 1",
        )
        require(self.max_restarts_from_one_checkpoint >= 1, "--max-restarts-from-one-checkpoint must be >= 1")
        require(self.save or not self.async_save, "--async-save needs --save")
        if self.save_interval is not None:
            require(self.save, "--save-interval needs --save")
            require(self.save_interval >= 1, "--save-interval must be >= 1")
        if self.save_retain_interval is not None:
            require(self.save_interval is not None, "--save-retain-interval needs --save-interval")
            require(
                self.save_retain_interval >= 1 and self.save_retain_interval % self.save_interval == 0,
                f"--save-retain-interval {self.save_retain_interval} must be a multiple of --save-interval "
                f"{self.save_interval}",
            )
        require(
            self.async_save or not self.use_persistent_ckpt_worker, "--use-persistent-ckpt-worker needs --async-save"
        )


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    """evaluation"""

    eval_interval: int = 0
    """evaluate every this many steps (0: no evaluation)"""
    eval_iters: int = 10
    """with --data-path / --mock-data: validation batches per evaluation; 0: no validation (Megatron-LM's meaning;
    with --phases too), the --eval-tasks still run"""
    eval_samples_per_source: int = 32
    """with --phases: held-out samples of each source per evaluation, the same ones every time"""
    eval_tasks: str | None = None
    """downstream tasks scored by log-likelihood at each evaluation, each with an optional cap on its questions: e.g.
    arc_easy,piqa,hellaswag:1000,humaneval_gold,infill_single_gold:200 (megatron_ext/evaluation/tasks.py lists them)"""
    run_name: str | None = None
    """the run's name in evaluation records (default: the directory holding --save)"""
    eval_results_jsonl: str | None = None
    """append every evaluation figure here, one JSON record each (default: eval_results.jsonl in --save)"""
    eval_pack_requests: bool = True
    """pack the tasks' requests several to a row, each attending only to itself (equal figures, a fraction of the rows);
    --no-eval-pack-requests: one per row. Not on the Transformer Engine attention path (one per row there)"""
    tasks: tuple = derived()
    """--eval-tasks parsed: ((task, question cap or None), ...)"""

    @property
    def validates(self) -> bool:
        """Whether an evaluation scores held-out data (--eval-iters 0: the tasks only)."""
        return self.eval_iters > 0

    def __post_init__(self):
        require(self.eval_interval >= 0, "--eval-interval must be >= 0")
        require(self.eval_iters >= 0, "--eval-iters must be >= 0 (0: no validation)")
        require(self.eval_samples_per_source >= 1, "--eval-samples-per-source must be >= 1")


@dataclass(frozen=True, kw_only=True)
class LoggingSection:
    """logging"""

    log_interval: int = 10
    """print the log line every this many steps"""
    tensorboard_dir: str | None = None
    """write TensorBoard scalars here"""
    metrics_jsonl: str | None = None
    """append one JSON line per step (loss, grad norm, lr) to this file"""
    log_num_zeros_in_grad: bool = False
    """the count of zero gradient entries at each step (Megatron-LM's; Megatron-Core's optimizer counts them): on the
    log line, TensorBoard, W&B and --metrics-jsonl"""
    log_validation_ppl_to_tensorboard: bool = False
    """with each validation loss, its perplexity exp(loss) (Megatron-LM's flag): TensorBoard, W&B, the log line and
    eval_results.jsonl"""
    log_straggler: bool = False
    """name the ranks slower than the others (Megatron-LM's flag): each rank's own work a step (batch, forward,
    backward, up to the gradient sync) all-gathered every --log-interval steps; a rank over --straggler-threshold
    times the others' median is named with its host (training/stragglers.py); the spread goes to TensorBoard, W&B
    and --metrics-jsonl (straggler/*)"""
    straggler_minmax_count: int = 1
    """with --log-straggler: name up to this many of the slowest ranks (Megatron-LM's)"""
    straggler_threshold: float = 1.5
    """with --log-straggler: a rank is named when its own work a step is over this many times the median of the
    others' over a log interval"""
    log_params_norm: bool = False
    """the parameters' L2 norm at each log step (Megatron-LM's): on the log line, TensorBoard, W&B and
    --metrics-jsonl; one norm over the model and a reduction over the model-parallel ranks per log step"""
    timing_log_level: int = option(0, choices=(0, 1, 2))
    """Megatron-Core's timers on the log line: 1: a step's parts (forward-backward, gradient reduction, parameter
    gather, optimizer); 2: also each micro-batch's forward and backward compute and the data wait"""
    timing_log_option: str = option("minmax", choices=("max", "minmax"))
    """the timers over ranks: the slowest rank's, or the fastest and the slowest"""
    log_timers_to_tensorboard: bool = False
    """write the timers to TensorBoard too (time/<name>, ms per step, the slowest rank's)"""
    log_memory_to_tensorboard: bool = False
    """write the logging rank's GPU memory (allocated, reserved, peak; on the log line in any case) to TensorBoard
    and W&B too (memory/<name>, GiB)"""
    log_data_hash: bool = False
    """add a hash of each step's input tokens to --metrics-jsonl: the same whatever the layout, so two runs (or a run
    and its resumption) can be shown to read the same data"""

    wandb_project: str | None = None
    """also write the TensorBoard scalars to this Weights & Biases project, from the logging rank (needs the wandb
    extra; WANDB_MODE=offline keeps the run on disk)"""
    wandb_exp_name: str | None = None
    """the run's name in W&B (default: --run-name's default, the directory holding --save)"""
    wandb_save_dir: str | None = None
    """W&B's local run directory (default: wandb in --save, else in the working directory)"""
    wandb_entity: str | None = None
    """the W&B team or user the run is logged under (default: the API key's)"""

    def __post_init__(self):
        require(self.log_interval >= 1, "--log-interval must be >= 1")
        require(self.straggler_minmax_count >= 1, "--straggler-minmax-count must be >= 1")
        require(self.straggler_threshold > 1, "--straggler-threshold must be > 1 (a ratio to the others' median)")
        if self.wandb_project is not None:
            import importlib.util

            require(
                importlib.util.find_spec("wandb") is not None,
                "--wandb-project needs the wandb package: pip install 'crystal-megatron[wandb]' (or pip install wandb)",
            )
        else:
            require(
                self.wandb_exp_name is None and self.wandb_save_dir is None and self.wandb_entity is None,
                "--wandb-exp-name, --wandb-save-dir and --wandb-entity need --wandb-project",
            )


@dataclass(frozen=True, kw_only=True)
class ProfileSection:
    """profiling"""

    profile: bool = False
    """profile the steps after --profile-step-start up to --profile-step-end on the --profile-ranks, as Megatron-LM:
    bracketed by the CUDA profiler API, for `nsys profile --capture-range=cudaProfilerApi` (GPU); with
    --use-pytorch-profiler, a PyTorch profiler trace (Chrome trace) in --tensorboard-dir (or --save, or the
    working directory)"""
    use_pytorch_profiler: bool = False
    """with --profile: record a PyTorch profiler trace instead of bracketing with the CUDA profiler API"""
    profile_step_start: int = 10
    """the step after which the trace starts"""
    profile_step_end: int = 12
    """the last step traced"""
    profile_ranks: tuple[int, ...] = (0,)
    """the ranks that record a trace"""

    def __post_init__(self):
        require(self.profile or not self.use_pytorch_profiler, "--use-pytorch-profiler needs --profile")
        require(
            not self.profile or 0 <= self.profile_step_start < self.profile_step_end,
            f"--profile-step-start {self.profile_step_start} must be below --profile-step-end {self.profile_step_end}",
        )


@dataclass(frozen=True, kw_only=True)
class MemorySection:
    """memory housekeeping (Megatron-LM's flags)"""

    manual_gc: bool = False
    """turn Python's automatic garbage collection off and collect at chosen steps instead, on every rank at once
    (automatic collections, at random times on each rank, make the ranks wait for each other)"""
    manual_gc_interval: int = 0
    """with --manual-gc: collect every this many steps (0: only at the start and around evaluations)"""
    manual_gc_eval: bool = True
    """with --manual-gc: collect after each evaluation (--no-manual-gc-eval: not)"""
    empty_unused_memory_level: int = option(0, choices=(0, 1, 2))
    """return the CUDA allocator's unused cache: 1 after each forward-backward and evaluation, 2 also after each
    optimizer step (Megatron-LM's places); 0: never. It costs the next allocations; a help against fragmentation"""

    def __post_init__(self):
        require(self.manual_gc_interval >= 0, "--manual-gc-interval must be >= 0")
        require(self.manual_gc or not self.manual_gc_interval, "--manual-gc-interval needs --manual-gc")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelSection
    layout: LayoutSection
    recompute: RecomputeSection
    optimizer: OptimizerSection
    kernels: KernelSection
    data: DataSection
    checkpoint: CheckpointSection
    eval: EvalSection
    logging: LoggingSection
    profile: ProfileSection
    memory: MemorySection
    flags: dict = field(default_factory=dict, compare=False)
    """the flags as given on the command line (what run_config.json re-validates)"""

    @property
    def crystal(self) -> CrystalConfig:
        return self.model.crystal

    @property
    def world_size(self) -> int:
        layout = self.layout
        return layout.tensor_model_parallel_size * layout.pipeline_model_parallel_size * layout.data_parallel_size

    def replace(self, **sections) -> RunConfig:
        """A copy with some sections' fields replaced, e.g. replace(kernels={"path": other})."""
        return dataclasses.replace(
            self, **{name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        )

    def to_json(self) -> str:
        """The flags as given and the world size (what reproduces this configuration), and every resolved
        value for people to read."""
        resolved = {}
        for name in SECTION_CLASSES:
            values = getattr(self, name)
            resolved[name] = {f.name: _plain(getattr(values, f.name)) for f in dataclasses.fields(values) if f.compare}
        return json.dumps({"world_size": self.world_size, "flags": self.flags, "resolved": resolved}, indent=1) + "\n"


# The sections by name, in the order of RunConfig's fields (and of --help).
SECTION_CLASSES = {f.name: globals()[f.type] for f in dataclasses.fields(RunConfig) if f.name != "flags"}


def _plain(value):
    """A resolved value as JSON: dataclasses as their fields, enums by name, the rest as text."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.repr}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "name", None) or str(value)
