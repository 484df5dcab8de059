"""AdamW with Crystal's muP parameter groups, and the learning-rate schedule.

Groups (the released CrystalCoder grouping):
- hidden matrices (QKV, attention out, fc1, fc2): lr x width scale, weight decay;
- embeddings (tied with the LM head): base lr, weight decay;
- biases and LayerNorm parameters: base lr (x width scale with --mup-scale-bias-lr), no weight decay.
Megatron-Core's OptimizerParamScheduler computes each group's lr from that group's own max_lr / min_lr,
so the width scale is applied by scaling both.
"""

from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer import param_group_identifier_keys
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_ext.training.run_config import RunConfig


def is_hidden_matrix(param: torch.nn.Parameter, name: str) -> bool:
    return param.dim() == 2 and "word_embeddings" not in name and "output_layer" not in name


def is_bias_or_norm(param: torch.nn.Parameter, name: str) -> bool:
    return param.dim() == 1


def mup_param_group_overrides(run: RunConfig) -> dict:
    """Overrides of Megatron-Core's default group (base lr, weight decay), one per distinct setting.

    Megatron-Core 0.16.1 identifies a group in a checkpoint by (wd_mult, lr_mult, is_expert_parallel,
    is_decoupled_lr) alone, and its plain optimizer's loader breaks when two groups share that key (it
    hands both the same saved group). So the hidden matrices get a group of their own only when their
    lr differs from the base lr: at the muP base width (scale 1, crystal-tiny) they share the default
    group with the embeddings. lr_mult carries the scale for that identification only; max_lr / min_lr
    do the scaling (the 0.16.1 scheduler ignores lr_mult).
    """
    scale, opt = run.crystal.mup_width_scale, run.optimizer
    scaled_lr = {"max_lr": opt.lr * scale, "min_lr": opt.min_lr * scale, "lr_mult": scale} if scale != 1.0 else {}
    no_decay = {"wd_mult": 0.0, **(scaled_lr if run.model.mup_scale_bias_lr else {})}
    overrides = {ParamKey(with_name_predicate=ParamWithNamePredicate("bias_or_norm", is_bias_or_norm)): no_decay}
    if scaled_lr:
        overrides[ParamKey(with_name_predicate=ParamWithNamePredicate("mup_hidden_matrix", is_hidden_matrix))] = (
            scaled_lr
        )
    return overrides


def group_rates_line(run: RunConfig) -> str:
    """The start-up line of each parameter group's peak and floor lr: Megatron-LM's --lr is the lr, this
    project's is muP's base lr, which the hidden matrices take x the width scale (a ported --lr 1.5e-4 would
    train them at 9.4e-6 on crystal-7b)."""
    scale, opt = run.crystal.mup_width_scale, run.optimizer
    bias = opt.lr * scale if run.model.mup_scale_bias_lr else opt.lr
    floor = opt.min_lr * scale if run.model.mup_scale_bias_lr else opt.min_lr
    return (
        f"lr per parameter group (muP, width scale {scale:g}; the phases file's lr scales alike): hidden matrices "
        f"{opt.lr * scale:.4g} -> {opt.min_lr * scale:.4g} (--lr x {scale:g}); embedding {opt.lr:.4g} -> "
        f"{opt.min_lr:.4g}; biases and norms {bias:.4g} -> {floor:.4g}, no weight decay"
    )


def check_group_keys_unique(optimizer) -> None:
    """Each group's checkpoint identity must be its own (see mup_param_group_overrides)."""
    keys = [tuple(g.get(k) for k in param_group_identifier_keys) for g in optimizer.param_groups]
    if len(set(keys)) != len(keys):
        raise ValueError(f"parameter groups share a checkpoint key {param_group_identifier_keys}: {keys}")


def build_optimizer(run: RunConfig, model_chunks: list):
    opt, bf16 = run.optimizer, run.kernels.bf16
    config = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=run.layout.use_distributed_optimizer,
        log_num_zeros_in_grad=run.logging.log_num_zeros_in_grad,
    )
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=mup_param_group_overrides(run))
    check_group_keys_unique(optimizer)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.scheduler_steps()[0],
        lr_decay_steps=opt.scheduler_steps()[1],
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=opt.train_iters * opt.scheduler_steps()[2],
        wd_incr_style="constant",
    )
    return optimizer, scheduler
