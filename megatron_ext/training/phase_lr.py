"""Each phase's learning-rate schedule (Crystal restarts warmup at every phase) on Megatron-Core's
OptimizerParamScheduler: at a phase switch, and on resume, the scheduler takes the phase's warmup, peak,
minimum and decay, and counts steps from the phase's start."""

from __future__ import annotations

from megatron_ext.data.phases_config import PhaseSpec


def apply_phase(scheduler, phase: PhaseSpec, step_in_phase: int) -> None:
    lr = phase.lr
    scheduler.init_lr = 0.0
    scheduler.max_lr, scheduler.min_lr = lr.peak, lr.min
    scheduler.lr_warmup_steps, scheduler.lr_decay_steps = lr.warmup_iters, phase.decay_iters
    scheduler.lr_decay_style = lr.decay_style
    for group in scheduler.optimizer.param_groups:
        # muP groups carry their own max_lr / min_lr, scaled by lr_mult (see optimizer.py).
        if "max_lr" in group:
            group["max_lr"] = lr.peak * group.get("lr_mult", 1.0)
            group["min_lr"] = lr.min * group.get("lr_mult", 1.0)
    scheduler.num_steps = 0
    scheduler.step(increment=step_in_phase)
