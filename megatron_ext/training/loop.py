"""The training loop: build, (resume,) step with Megatron-Core's pipeline schedules, log, evaluate, save."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_ext import accelerators, cpu_compat, megatron_workarounds
from megatron_ext.data.phases_config import PhasesConfigError
from megatron_ext.kernels.fp8_linear import end_fp8_step
from megatron_ext.model.crystal_config import CrystalConfig
from megatron_ext.model.crystal_gpt import ParallelLayout, build_model, padded_vocab_size, transformer_config
from megatron_ext.training import checkpointing, data_feed, distributed, phase_lr
from megatron_ext.training.callbacks import StepResult, build_callbacks
from megatron_ext.training.faults import StopRequest, UpdateGuard
from megatron_ext.training.optimizer import build_optimizer


def loss_func(loss_mask: torch.Tensor, source_id: torch.Tensor | None, num_sources: int, output_tensor: torch.Tensor):
    """Summed token loss and token count; the schedule and finalize_model_grads divide by the global
    token count (calculate_per_token_loss). With phases, also [loss, tokens] per source, from each
    sample's source id."""
    mask = loss_mask.float()
    masked = output_tensor.float() * mask  # [micro batch, sequence]
    loss = masked.sum()
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss.detach(), mask.sum()])}
    if source_id is not None:
        per_sample = torch.stack((masked.detach().sum(dim=1), mask.sum(dim=1)), dim=1)
        report["source loss"] = torch.zeros(num_sources, 2, device=per_sample.device).index_add_(
            0, source_id, per_sample
        )
    return loss, num_tokens, report


def sample_hash(tokens: torch.Tensor) -> int:
    """40 bits of a sample's SHA-1: summed over a step's samples they cannot overflow int64."""
    return int.from_bytes(hashlib.sha1(tokens.cpu().numpy().tobytes()).digest()[:5], "little")


def make_forward_step(device: torch.device, num_sources: int = 0, data_hashes: list | None = None):
    """data_hashes: when given, the hashes of the samples this rank is the designated reader of (the model
    chunk that embeds them, on tensor-parallel rank 0) are appended to it."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        reader = getattr(model, "module", model).pre_process and parallel_state.get_tensor_model_parallel_rank() == 0
        if data_hashes is not None and reader:
            data_hashes.extend(sample_hash(t) for t in batch["tokens"])
        tokens, labels, loss_mask, position_ids = (
            batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")
        )
        source_id = batch["source_id"].to(device) if "source_id" in batch else None
        output = model(tokens, position_ids, None, labels=labels)
        return output, partial(loss_func, loss_mask, source_id, num_sources)

    return forward_step


def _reduce_loss(losses_reduced: list[dict]) -> tuple[float | None, torch.Tensor | None]:
    """Global per-token loss on the last pipeline stage (None elsewhere), and with phases the global
    [loss sum, tokens] per source."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None, None
    total = torch.stack([d["lm loss"] for d in losses_reduced]).sum(dim=0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    by_source = None
    if losses_reduced and "source loss" in losses_reduced[0]:
        by_source = torch.stack([d["source loss"] for d in losses_reduced]).sum(dim=0)
        torch.distributed.all_reduce(by_source, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item(), by_source


class Trainer:
    def __init__(self, args: argparse.Namespace, crystal: CrystalConfig, device: torch.device):
        self.args, self.crystal, self.device = args, crystal, device
        layout = ParallelLayout(
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
            sequence_parallel=args.sequence_parallel,
        )
        self.config = transformer_config(
            crystal, layout, bf16=args.bf16, use_cpu_initialization=device.type == "cpu", path=args.kernel_path
        )
        self.padded_vocab = padded_vocab_size(crystal.vocab_size, args.make_vocab_size_divisible_by)
        chunks = [c.to(device) for c in build_model(crystal, self.config, self.padded_vocab, args.kernel_path)]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer
        )
        self.model = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.optimizer, self.scheduler = build_optimizer(args, crystal, self.model)
        # gloo pairs point-to-point messages per peer in posting order. With PP=2 the previous and next
        # stage are one peer, and the batched exchange of the interleaved schedule would pair an
        # activation with a gradient; the unbatched path orders by rank parity and splits directions.
        self.config.batch_p2p_comm = args.distributed_backend != "gloo"
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [m.no_sync for m in self.model]
        self.config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.forward_backward = get_forward_backward_func()
        self.iteration = 0
        # With --phases after a resume inside a phase: the applied updates of that phase so far (the
        # checkpoint's schedule step count), for the loop's first phase set-up.
        self.resumed_phase_steps: int | None = None
        self.stop = StopRequest()  # before any DataLoader worker forks, so that the workers inherit the handler
        self.guard = UpdateGuard(args.max_skipped_steps, device, args.loss_spike_window, args.loss_spike_sigma)

    def set_data(self, feed) -> None:
        self.feed = feed
        self.data_hashes = [] if self.args.log_data_hash else None
        self.forward_step = make_forward_step(self.device, len(feed.source_names), self.data_hashes)

    def step_data_hash(self) -> int | None:
        """The sum over all ranks of the last training step's sample hashes."""
        if self.data_hashes is None:
            return None
        total = torch.tensor([sum(self.data_hashes)], dtype=torch.int64)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def _run(self, iterators: list, forward_only: bool, global_batch_size: int) -> list[dict]:
        """One step's micro-batches through the pipeline schedule; iterators: one per model chunk (the
        interleaved schedule draws from each)."""
        return self.forward_backward(
            forward_step_func=self.forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model,
            num_microbatches=global_batch_size // (self.args.micro_batch_size * self.args.data_parallel_size),
            seq_length=self.crystal.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, iterators: list) -> tuple[float | None, torch.Tensor | None, float | None, str | None]:
        """(loss, per-source [loss sum, tokens] or None, grad norm, why the update was skipped) of one
        optimizer step. The guard may skip the update (grad norm None): non-finite gradients on any rank,
        or a loss spike."""
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.data_hashes is not None:
            self.data_hashes.clear()  # what evaluation read is not part of the step
        losses = self._run(iterators, forward_only=False, global_batch_size=self.feed.step_batch_size())
        loss, by_source = _reduce_loss(losses)
        skipped = self.guard.check(self.model, loss, self.iteration + 1, self.stop.signalled is not None)
        grad_norm, update_successful = None, False
        if not skipped:
            update_successful, grad_norm, _ = self.optimizer.step()
            if update_successful:
                self.scheduler.step(increment=1)
        end_fp8_step(self.model, applied=update_successful)
        return loss, by_source, grad_norm, skipped

    @torch.no_grad()
    def evaluate(self, eval_round: int) -> tuple[float | None, torch.Tensor | None]:
        for m in self.model:
            m.eval()
        its = self.feed.eval_iterators(len(self.model), eval_round)
        losses = []
        for _ in range(self.args.eval_iters):
            losses.extend(self._run(its, forward_only=True, global_batch_size=self.feed.step_batch_size()))
        end_fp8_step(self.model, applied=False)
        for m in self.model:
            m.train()
        return _reduce_loss(losses)

    def current_lr(self) -> float:
        return next(g["lr"] for g in self.optimizer.param_groups if g.get("default_config", True))

    def stateful_parts(self) -> dict:
        """Everything besides the model, optimizer and scheduler that a checkpoint saves, by name."""
        return {"data": self.feed, "update_guard": self.guard}

    def save(self) -> float:
        """Save a checkpoint; returns the seconds it took."""
        started = time.perf_counter()
        tokenizer = None
        if self.args.tokenizer_model:
            tokenizer = {"type": self.args.tokenizer_type, "model": os.path.abspath(self.args.tokenizer_model)}
        feed = self.feed
        path = checkpointing.save_checkpoint(
            self.args.save,
            self.iteration,
            self.model,
            self.crystal,
            self.padded_vocab,
            self.optimizer,
            self.scheduler,
            parts=self.stateful_parts(),
            tokenizer=tokenizer,
            keep_last=self.args.keep_last_checkpoints,
        )
        books = feed.bookkeeping_json(self.iteration) if torch.distributed.get_rank() == 0 else None
        if books:  # what the run has read so far, for people: per source and per phase
            checkpointing.write_text_atomically(os.path.join(path, "data_state.json"), books)
        seconds = time.perf_counter() - started
        distributed.print_rank_0(f"saved checkpoint {path} in {seconds:.1f} s")
        return seconds

    def load(self) -> None:
        wanted = phase_lr.saved_schedule(self.scheduler.state_dict())  # the flags' schedule, before the load
        self.iteration = checkpointing.load_checkpoint(
            self.args.load,
            self.model,
            self.optimizer,
            self.scheduler,
            self.crystal,
            self.padded_vocab,
            step=self.args.ckpt_step,
            weights_only=self.args.finetune,
            parts=self.stateful_parts(),
        )
        note = self.feed.resume_note
        if note:
            distributed.print_rank_0(f"warning: {note}")
        if self.iteration:
            self._resume_schedule(wanted, exact_data=note is None)
            distributed.print_rank_0(f"resumed from {self.args.load} at iteration {self.iteration}")
        elif checkpointing.checkpoint_path(self.args.load, self.args.ckpt_step) is None:
            distributed.print_rank_0(f"{self.args.load} holds no checkpoint: starting fresh")
        else:
            distributed.print_rank_0(f"took the weights of {self.args.load}: iteration 0, fresh optimizer and schedule")

    def _resume_schedule(self, wanted: dict, exact_data: bool) -> None:
        """The lr schedule after a resume. A schedule (flags, or the phase in progress in the phases file)
        that differs from the checkpoint's is refused unless the user chose, as in Megatron-LM: the new one
        (--override-opt-param-scheduler) or the saved one (--use-checkpoint-opt-param-scheduler). Either
        way the step count is the checkpoint's: updates applied, skipped ones not counted."""
        args, scheduler = self.args, self.scheduler
        saved, steps = phase_lr.saved_schedule(scheduler.state_dict()), scheduler.num_steps
        if args.phases_config:
            if not exact_data or self.feed.step_in_phase() == 0:
                return  # the next step starts a phase (or an edited file's phase): its own schedule from 0
            index = self.feed.step_phase()
            wanted = phase_lr.phase_schedule(self.feed.phase, args.weight_decay)
            names = {k: f"{args.phases}: phases[{index}].{v}" for k, v in phase_lr.PHASE_KEYS.items()}
            names["start_wd"] = phase_lr.FLAG_NAMES["start_wd"]
        else:
            names = phase_lr.FLAG_NAMES
        changed = phase_lr.differences(saved, wanted, names)
        if changed and not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
            raise checkpointing.CheckpointError(
                f"--load {args.load}: the lr schedule differs from the checkpoint's: {'; '.join(changed)}. Pass "
                f"--override-opt-param-scheduler to go on with the new one from its step {steps}, or "
                "--use-checkpoint-opt-param-scheduler to keep the saved one"
            )
        if args.phases_config:
            self.resumed_phase_steps = steps  # the loop sets the phase up, or keeps the saved schedule
        elif not args.use_checkpoint_opt_param_scheduler:
            phase_lr.apply_schedule(scheduler, wanted, steps)
        if changed:
            kept = "kept the checkpoint's" if args.use_checkpoint_opt_param_scheduler else "overridden"
            distributed.print_rank_0(f"lr schedule {kept}: {'; '.join(changed)}")


def _describe_path(args: argparse.Namespace) -> str:
    device = "CPU (Megatron-Core CPU compatibility layer)" if cpu_compat.is_active() else torch.cuda.get_device_name()
    return (
        f"kernel path: {args.kernel_path.describe()}\ndevice: {device}; backend: {args.distributed_backend}; "
        f"precision: {'bf16' if args.bf16 else 'fp32'}; optional accelerators: {accelerators.found()}"
    )


def pretrain(args: argparse.Namespace, crystal: CrystalConfig) -> int:
    """Train with arguments already checked by arguments.validate."""
    try:
        megatron_workarounds.apply()
    except megatron_workarounds.UnsupportedMegatronVersion as e:
        print(f"pretrain_crystal.py: error: {e}", file=sys.stderr)
        return 2
    device = distributed.initialize(args)
    try:
        return _train(args, crystal, device)
    except (checkpointing.CheckpointError, PhasesConfigError) as e:
        distributed.print_rank_0(f"pretrain_crystal.py: error: {e}", error=True)
        return 2
    finally:
        distributed.shutdown()


def _train(args: argparse.Namespace, crystal: CrystalConfig, device: torch.device) -> int:
    trainer = Trainer(args, crystal, device)
    distributed.print_rank_0(
        f"model {args.model}: {crystal.num_parameters():,} parameters | TP {args.tensor_model_parallel_size} "
        f"PP {args.pipeline_model_parallel_size} VP {args.virtual_pipeline_model_parallel_size or 1} "
        f"DP {args.data_parallel_size} SP {args.sequence_parallel} dist-opt {args.use_distributed_optimizer} | "
        f"{args.num_microbatches} micro-batches of {args.micro_batch_size} per step"
    )
    distributed.print_rank_0(_describe_path(args))
    feed = data_feed.build(args, crystal)
    trainer.set_data(feed)
    if args.load:
        trainer.load()
    train_its = feed.train_iterators(len(trainer.model), args.train_iters - trainer.iteration)

    callbacks = build_callbacks(args, crystal, trainer)
    try:
        return _loop(args, trainer, feed, train_its, callbacks)
    finally:
        for callback in callbacks:
            callback.close()
        trainer.stop.close()


def _loop(args: argparse.Namespace, trainer: Trainer, feed, train_its: list, callbacks: list) -> int:
    phase, stopped_by_signal = None, False
    while trainer.iteration < args.train_iters:
        if feed.step_phase() != phase:
            phase = feed.step_phase()
            _enter_phase(args, trainer, feed, phase)
        lr, gbs, phase_name = trainer.current_lr(), feed.step_batch_size(), feed.phase_name
        loss, by_source, grad_norm, skipped = trainer.train_step(train_its)
        data_hash = trainer.step_data_hash()
        trainer.iteration += 1
        feed.advance()
        source_losses = None
        if by_source is not None:
            source_losses = {n: tuple(by_source[i].tolist()) for i, n in enumerate(feed.source_names)}
        step = StepResult(trainer.iteration, loss, lr, grad_norm, skipped, gbs, phase_name, source_losses, data_hash)
        for callback in callbacks:
            callback.post_step(trainer, step)
        if trainer.guard.exhausted:
            distributed.print_rank_0(
                f"pretrain_crystal.py: error: {trainer.guard.consecutive} consecutive steps were skipped (last: "
                f"{skipped}; --max-skipped-steps {args.max_skipped_steps}); stopping without saving. Resume from "
                "the last checkpoint, e.g. with a lower --lr or after inspecting the data (tools/data_trace.py)",
                error=True,
            )
            return 3
        if args.exit_interval and trainer.iteration % args.exit_interval == 0:
            break
        if trainer.guard.stop_agreed:
            distributed.print_rank_0(
                f"stop requested ({trainer.stop.signalled or 'signal on another rank'}): saving at "
                f"iteration {trainer.iteration} and exiting; a run with the same --load resumes here"
            )
            stopped_by_signal = True
            break
    for callback in callbacks:
        callback.post_train(trainer, stopped_by_signal)
    return 0


def _enter_phase(args: argparse.Namespace, trainer: Trainer, feed, phase: int) -> None:
    """The switch happens here, inside the job: the next phase's lr schedule from its step 0 (or from the
    resumed step), its batch size and blend from the next sample on."""
    steps, trainer.resumed_phase_steps = trainer.resumed_phase_steps, None
    if steps is None or not args.use_checkpoint_opt_param_scheduler:
        phase_lr.apply_phase(
            trainer.scheduler, feed.phase, feed.step_in_phase() if steps is None else steps, args.weight_decay
        )
    fim = ", ".join(f"{n} rate {f.rate} spm {f.spm_rate}" for n, f in feed.phase.fim.items()) or "none"
    distributed.print_rank_0(
        f"phase {feed.phase_name} ({phase + 1}/{len(args.phases_config.phases)}) from "
        f"iteration {trainer.iteration + 1}: global batch {feed.step_batch_size()}, "
        f"blend {feed.phase.blend}, FIM {fim}"
    )
