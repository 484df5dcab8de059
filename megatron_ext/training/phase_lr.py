"""The learning-rate schedule on Megatron-Core's OptimizerParamScheduler: each phase's own (Crystal
restarts warmup at every phase), and what a resumed run may take from its checkpoint.

A schedule is the scheduler's fields {max_lr, min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style,
start_wd}. Its step count is the number of applied updates since the phase (or run) began: a skipped
update does not advance it, so a resumed run takes the count from the checkpoint, never from the data
position.
"""

from __future__ import annotations

from megatron_ext.data.phases_config import PhaseSpec

FLAG_NAMES = {
    "max_lr": "--lr",
    "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters",
    "lr_decay_style": "--lr-decay-style",
    "start_wd": "--weight-decay",
}
PHASE_KEYS = {
    "max_lr": "lr.peak",
    "min_lr": "lr.min",
    "lr_warmup_steps": "lr.warmup_iters",
    "lr_decay_steps": "lr.decay_iters",
    "lr_decay_style": "lr.decay_style",
}


def phase_schedule(phase: PhaseSpec, weight_decay: float) -> dict:
    lr = phase.lr
    return {
        "max_lr": lr.peak,
        "min_lr": lr.min,
        "lr_warmup_steps": lr.warmup_iters,
        "lr_decay_steps": phase.decay_iters,
        "lr_decay_style": lr.decay_style,
        "start_wd": weight_decay,
    }


def apply_schedule(scheduler, schedule: dict, num_steps: int) -> None:
    """Set the scheduler (and every parameter group's peak and floor) to schedule, num_steps into it."""
    scheduler.init_lr = 0.0
    scheduler.max_lr, scheduler.min_lr = schedule["max_lr"], schedule["min_lr"]
    scheduler.lr_warmup_steps, scheduler.lr_decay_steps = schedule["lr_warmup_steps"], schedule["lr_decay_steps"]
    scheduler.lr_decay_style = schedule["lr_decay_style"]
    scheduler.start_wd = scheduler.end_wd = schedule["start_wd"]
    for group in scheduler.optimizer.param_groups:
        # muP groups carry their own max_lr / min_lr, scaled by lr_mult (see optimizer.py).
        if "max_lr" in group:
            group["max_lr"] = schedule["max_lr"] * group.get("lr_mult", 1.0)
            group["min_lr"] = schedule["min_lr"] * group.get("lr_mult", 1.0)
    scheduler.num_steps = 0
    scheduler.step(increment=num_steps)


def apply_phase(scheduler, phase: PhaseSpec, num_steps: int, weight_decay: float) -> None:
    apply_schedule(scheduler, phase_schedule(phase, weight_decay), num_steps)


def saved_schedule(scheduler_state: dict) -> dict:
    return {key: scheduler_state[key] for key in FLAG_NAMES}


def differences(saved: dict, wanted: dict, names: dict) -> list[str]:
    """'NAME WANTED (checkpoint: SAVED)' for each field where the run's schedule is not the saved one."""
    return [f"{names[k]} {wanted[k]} (checkpoint: {saved[k]})" for k in FLAG_NAMES if saved[k] != wanted[k]]
