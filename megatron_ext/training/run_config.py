"""The run's configuration after validation: frozen, typed, in sections.

arguments.validate builds it from Megatron-LM's flags and the phases file; nothing downstream of the
command line sees the argparse Namespace. Field names are the flags' (--lr-decay-iters is
optimizer.lr_decay_iters) so that one maps to the other without a table. Values the run derives (the
data-parallel size, the virtual pipeline size, the kernel path, the first phase's lr) live here too, so
there is one place to read them and none to write them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the command line's checks import no Megatron-Core (they run in a second)
    from megatron_ext.data.phases_config import PhasesConfig
    from megatron_ext.kernels.selection import KernelPath
    from megatron_ext.model.crystal_config import CrystalConfig
    from megatron_ext.model.crystal_gpt import ParallelLayout


@dataclass(frozen=True)
class ModelSection:
    model: str  # the preset's name
    crystal: CrystalConfig  # the preset with the overrides and the tokenizer's vocabulary size
    make_vocab_size_divisible_by: int
    mup_scale_bias_lr: bool

    @property
    def padded_vocab(self) -> int:
        from megatron_ext.model.crystal_gpt import padded_vocab_size

        return padded_vocab_size(self.crystal.vocab_size, self.make_vocab_size_divisible_by)


@dataclass(frozen=True)
class LayoutSection:
    tensor_model_parallel_size: int
    pipeline_model_parallel_size: int
    virtual_pipeline_model_parallel_size: int | None
    data_parallel_size: int
    sequence_parallel: bool  # False at TP 1, as in Megatron-LM
    use_distributed_optimizer: bool
    distributed_backend: str
    micro_batch_size: int

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


@dataclass(frozen=True)
class OptimizerSection:
    """The optimizer and the step schedule. With --phases the lr fields are the first phase's (what the
    scheduler is built with); each phase applies its own when it starts."""

    train_iters: int
    global_batch_size: int  # the first phase's with --phases
    exit_interval: int | None
    lr: float
    min_lr: float
    lr_warmup_iters: int
    lr_decay_iters: int
    lr_decay_style: str
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    clip_grad: float
    seed: int
    max_skipped_steps: int
    loss_spike_window: int
    loss_spike_sigma: float


@dataclass(frozen=True)
class DataSection:
    data_path: tuple[str, ...] | None
    blend: tuple[list[str], list[float] | None] | None  # --data-path parsed: prefixes, weights (None: equal)
    mock_data: bool
    phases: str | None  # the phases file's path
    phases_config: PhasesConfig | None
    tokenizer_type: str
    tokenizer_model: str | None
    split: str
    data_cache_path: str | None
    index_cache_dir: str | None  # the phases' source indices (data/index_cache.py); None: in memory
    num_workers: int
    # The one tokenizer of the process (None without --tokenizer-model): the datasets, FIM and the checks
    # share it instead of each loading the model file again.
    tokenizer: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class CheckpointSection:
    save: str | None
    load: str | None
    ckpt_step: int | None
    finetune: bool
    override_opt_param_scheduler: bool
    use_checkpoint_opt_param_scheduler: bool
    save_interval: int | None
    keep_last_checkpoints: int | None


@dataclass(frozen=True)
class LoggingSection:
    eval_interval: int
    eval_iters: int  # a blend's validation batches
    eval_samples_per_source: int  # with --phases
    eval_results_jsonl: str | None  # every evaluation figure, one record each
    eval_tasks: tuple  # ((task, question cap or None), ...): evaluation/tasks.py
    run_name: str  # the "run" of those records
    log_interval: int
    tensorboard_dir: str | None
    metrics_jsonl: str | None
    log_data_hash: bool


@dataclass(frozen=True)
class KernelSection:
    bf16: bool
    path: KernelPath  # the kernels chosen for this machine (megatron_ext/kernels/selection.py)


@dataclass(frozen=True)
class ProfileSection:
    """--profile: a PyTorch profiler trace of steps (profile_step_start, profile_step_end]."""

    profile_step_start: int
    profile_step_end: int
    profile_ranks: list[int]


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection
    layout: LayoutSection
    optimizer: OptimizerSection
    data: DataSection
    checkpoint: CheckpointSection
    logging: LoggingSection
    kernels: KernelSection
    profile: ProfileSection | None = None

    @property
    def crystal(self) -> CrystalConfig:
        return self.model.crystal

    def replace(self, **sections) -> RunConfig:
        """A copy with some sections' fields replaced, e.g. replace(kernels={"path": other})."""
        return dataclasses.replace(
            self, **{name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        )


def section(cls, values: Any, **derived):
    """cls filled from the attributes of `values` (the parsed flags) of the same name, and `derived`."""
    filled = {f.name: getattr(values, f.name) for f in dataclasses.fields(cls) if hasattr(values, f.name)}
    return cls(**{**filled, **derived})  # a field in neither is a TypeError naming it
