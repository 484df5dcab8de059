"""The learning-rate schedule on Megatron-Core's OptimizerParamScheduler: each phase's own (Crystal
restarts warmup at every phase), and what a resumed run may take from its checkpoint.

A schedule is the scheduler's fields {max_lr, min_lr, lr_warmup_steps, lr_decay_steps, lr_decay_style,
start_wd}. Its step count is the number of applied updates since the phase (or run) began: a skipped
update does not advance it, so a resumed run takes the count from the checkpoint, never from the data
position.
"""

from __future__ import annotations

from megatron_ext.checkpoint_files import CheckpointError
from megatron_ext.data.phases_config import PhaseSpec
from megatron_ext.training import distributed

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


def check_resumed_schedule(run, scheduler, wanted: dict, feed) -> None:
    """After a resume: a schedule (the flags', or the phase in progress in the phases file) that differs
    from the checkpoint's is refused unless the user chose, as in Megatron-LM: the new one
    (--override-opt-param-scheduler) or the saved one (--use-checkpoint-opt-param-scheduler). Either way the
    step count is the checkpoint's (updates applied, skipped ones not counted). Without phases the chosen
    schedule is applied here; with phases, by enter_phase as the loop enters the phase in progress.
    wanted: the flags' schedule (the scheduler's before the load)."""
    ckpt, phases = run.checkpoint, run.data.phases
    saved, steps = saved_schedule(scheduler.state_dict()), scheduler.num_steps
    if phases:
        if feed.resume_note is not None or feed.step_in_phase() == 0:
            return  # the next step starts a phase (or an edited file's phase): its own schedule from 0
        wanted = phase_schedule(feed.phase, run.optimizer.weight_decay)
        names = {k: f"{phases}: phases[{feed.step_phase()}].{v}" for k, v in PHASE_KEYS.items()}
        names["start_wd"] = FLAG_NAMES["start_wd"]
    else:
        names = FLAG_NAMES
    changed = differences(saved, wanted, names)
    if changed and not (ckpt.override_opt_param_scheduler or ckpt.use_checkpoint_opt_param_scheduler):
        raise CheckpointError(
            f"--load {ckpt.load}: the lr schedule differs from the checkpoint's: {'; '.join(changed)}. Pass "
            f"--override-opt-param-scheduler to go on with the new one from its step {steps}, or "
            "--use-checkpoint-opt-param-scheduler to keep the saved one"
        )
    if not phases and not ckpt.use_checkpoint_opt_param_scheduler:
        apply_schedule(scheduler, wanted, steps)
    if changed:
        kept = "kept the checkpoint's" if ckpt.use_checkpoint_opt_param_scheduler else "overridden"
        distributed.print_rank_0(f"lr schedule {kept}: {'; '.join(changed)}")


def enter_phase(scheduler, feed, keep_checkpoint_schedule: bool, weight_decay: float) -> None:
    """The schedule as the loop enters the phase of its next step. At the phase's start: its own, from step
    0. Inside it, which happens only on the first step after a resume: from the checkpoint's step count
    (the updates applied in it, not the data position), or the checkpoint's schedule itself with
    --use-checkpoint-opt-param-scheduler; after a resume that could not be exact (an edited phases file:
    feed.resume_note), from the data position in the phase."""
    inside, exact = feed.step_in_phase() > 0, feed.resume_note is None
    if inside and exact and keep_checkpoint_schedule:
        return
    apply_phase(scheduler, feed.phase, scheduler.num_steps if inside and exact else feed.step_in_phase(), weight_decay)
