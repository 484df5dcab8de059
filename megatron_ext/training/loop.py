"""The training loop: build, (resume,) step with Megatron-Core's pipeline schedules, log, evaluate, save."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.timers import Timers

from megatron_ext import accelerators, checkpoint_files, checkpointing, cpu_compat, megatron_workarounds
from megatron_ext.atomic_files import write_text_atomically
from megatron_ext.data.index_cache import IndexCacheError
from megatron_ext.data.phased_dataset import ROW_COUNTS
from megatron_ext.data.phases_config import PhasesConfigError
from megatron_ext.evaluation import eval_set
from megatron_ext.kernels.fp8_linear import end_fp8_step
from megatron_ext.model.crystal_config import get_preset
from megatron_ext.model.crystal_gpt import build_model, transformer_config
from megatron_ext.training import distributed, faults, memory_report, phase_lr, restarts, stragglers
from megatron_ext.training.batches import datasets, feeds, readers
from megatron_ext.training.callbacks import StepResult, build_callbacks
from megatron_ext.training.faults import StopRequest, UpdateGuard, collective_failure
from megatron_ext.training.optimizer import build_optimizer, group_rates_line
from megatron_ext.training.run_config import RunConfig


def loss_func(
    loss_mask: torch.Tensor,
    source_id: torch.Tensor | None,
    num_sources: int,
    scored: tuple | None,
    per_position: bool,
    output_tensor: torch.Tensor,
):
    """Summed token loss and its divisor's share; the schedule and finalize_model_grads divide by the
    global sum of the shares (calculate_per_token_loss): the unmasked tokens, or with per_position
    (--loss-normalization positions) every position. With phases, also [loss, tokens] per source, from
    each sample's source id. In an evaluation (scored: slot ids, label bytes, number of slots), the slot
    table of evaluation/eval_set.py."""
    mask = loss_mask.float()
    masked = output_tensor.float() * mask  # [micro batch, sequence]
    loss = masked.sum()
    num_tokens = mask.sum().to(torch.int)
    if per_position:
        num_tokens = torch.full_like(num_tokens, mask.numel())
    report = {"lm loss": torch.stack([loss.detach(), mask.sum()])}
    if scored is not None:
        slot, label_bytes, num_slots = scored
        report["slots"] = eval_set.slot_table(output_tensor.detach(), mask, label_bytes, slot, num_slots)
    elif source_id is not None:
        per_sample = torch.stack((masked.detach().sum(dim=1), mask.sum(dim=1)), dim=1)
        report["source loss"] = torch.zeros(num_sources, 2, device=per_sample.device).index_add_(
            0, source_id, per_sample
        )
    return loss, num_tokens, report


def sample_hash(tokens: torch.Tensor) -> int:
    """40 bits of a sample's SHA-1: summed over a step's samples they cannot overflow int64."""
    return int.from_bytes(hashlib.sha1(tokens.cpu().numpy().tobytes()).digest()[:5], "little")


def make_forward_step(
    device: torch.device,
    num_sources: int = 0,
    data_hashes: list | None = None,
    num_slots: int | None = None,
    timers=None,
    packed: bool = False,
    row_counts: torch.Tensor | None = None,
    per_position: bool = False,
):
    """data_hashes: when given, the hashes of the samples this rank is the designated reader of (the model
    chunk that embeds them, on tensor-parallel rank 0) are appended to it. row_counts: when given, [sources,
    phased_dataset.ROW_COUNTS], to which the same reader adds its samples' counts.
    num_slots: an evaluation's.
    timers: Megatron-Core's, to time the wait for each batch (level 2, as Megatron-LM's batch-generator).
    packed: rows hold several requests (evaluation/eval_set.py): each attends only to itself, the mask
    derived from the position ids, which the chunks between the first and the last stage get alone.
    per_position: --loss-normalization positions (loss_func)."""

    def attention_mask(position_ids):
        return ~eval_set.packed_attention_mask(position_ids) if packed else None  # Megatron: True = masked

    def forward_step(data_iterator, model):
        if data_iterator is None:  # a chunk between the first and the last stage: its input is the activations
            return model(None, None, None), None
        if timers is not None:
            timers("batch-generator", log_level=2).start()
        batch = next(data_iterator)
        if timers is not None:
            timers("batch-generator").stop()
        if "tokens" not in batch:  # such a chunk in a packed evaluation: the positions, for the mask and RoPE
            position_ids = batch["position_ids"].to(device)
            return model(None, position_ids, attention_mask(position_ids)), None
        reader = getattr(model, "module", model).pre_process and parallel_state.get_tensor_model_parallel_rank() == 0
        if data_hashes is not None and reader:
            data_hashes.extend(sample_hash(t) for t in batch["tokens"])
        if row_counts is not None and reader:
            row_counts.index_add_(0, batch["source_id"].to(device), batch["row_counts"].to(device))
        tokens, labels, loss_mask, position_ids = (
            batch[k].to(device, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")
        )
        source_id = batch["source_id"].to(device) if "source_id" in batch else None
        scored = None
        if num_slots is not None:
            scored = (batch["slot"].to(device), batch["label_bytes"].to(device), num_slots)
        output = model(tokens, position_ids, attention_mask(position_ids), labels=labels)
        return output, partial(loss_func, loss_mask, source_id, num_sources, scored, per_position)

    return forward_step


def _reduce_loss(losses_reduced: list[dict], key: str = "source loss") -> tuple[float | None, torch.Tensor | None]:
    """Global per-token loss on the last pipeline stage (None elsewhere), and with phases the global
    per-source report under `key` ([loss sum, tokens] of training; a validation's columns)."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None, None
    total = torch.stack([d["lm loss"] for d in losses_reduced]).sum(dim=0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    by_source = None
    if losses_reduced and key in losses_reduced[0]:
        by_source = torch.stack([d[key] for d in losses_reduced]).sum(dim=0)
        torch.distributed.all_reduce(by_source, group=parallel_state.get_data_parallel_group())
    return (total[0] / total[1]).item(), by_source


class Trainer:
    def __init__(self, run: RunConfig, device: torch.device):
        self.run, self.crystal, self.device = run, run.crystal, device
        kernels = run.kernels
        self.config = transformer_config(
            self.crystal,
            run.layout.model_layout(),
            bf16=kernels.bf16,
            use_cpu_initialization=device.type == "cpu",
            path=kernels.path,
            recompute=run.recompute.transformer_options(),
        )
        self.padded_vocab = run.model.padded_vocab
        chunks = [c.to(device) for c in build_model(self.crystal, self.config, self.padded_vocab, kernels.path)]
        layout = run.layout
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=not layout.grad_reduce_in_bf16,
            use_distributed_optimizer=layout.use_distributed_optimizer,
            overlap_grad_reduce=layout.overlap_grad_reduce,
            overlap_param_gather=layout.overlap_param_gather,
            bucket_size=layout.ddp_bucket_size,
        )
        self.model = [
            DistributedDataParallel(self.config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]
        self.optimizer, self.scheduler = build_optimizer(run, self.model)
        # gloo pairs point-to-point messages per peer in posting order. With PP=2 the previous and next
        # stage are one peer, and the batched exchange of the interleaved schedule would pair an
        # activation with a gradient; the unbatched path orders by rank parity and splits directions.
        self.config.batch_p2p_comm = run.layout.distributed_backend != "gloo"
        self.config.finalize_model_grads_func = finalize_model_grads
        log = run.logging
        self.stragglers = None  # --log-straggler: it times each step up to the gradient sync (stragglers.py)
        if log.log_straggler:
            self.stragglers = stragglers.StragglerDetector(
                self.config, log.straggler_minmax_count, log.straggler_threshold
            )
        self.config.grad_scale_func = self.optimizer.scale_loss
        no_sync = [m.no_sync for m in self.model]
        self.config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        if layout.overlap_grad_reduce:  # the schedule starts each chunk's reduction as its backward ends
            grad_sync = [m.start_grad_sync for m in self.model]
            self.config.grad_sync_func = grad_sync if len(grad_sync) > 1 else grad_sync[0]
        self.timers = None
        if run.logging.timing_log_level:  # Megatron-Core's timers, in its schedules, gradient sync and optimizer
            self.timers = Timers(run.logging.timing_log_level, "minmax")
            self.config.timers = self.timers
            for inner in megatron_workarounds.inner_optimizers(self.optimizer):
                inner.config.timers = self.timers
        self.forward_backward = get_forward_backward_func()
        self.iteration, self.num_zeros_in_grad = 0, None  # the latter: the last step's, with --log-num-zeros-in-grad
        # Before any DataLoader worker forks, so that the workers inherit the handler.
        self.stop = StopRequest(run.optimizer.exit_duration_in_mins)
        self.callbacks: list = []  # the loop's side work (callbacks.build_callbacks), told of each save
        ckpt = run.checkpoint
        self.checkpoints = None
        if ckpt.save:
            self.checkpoints = checkpointing.CheckpointSaver(
                ckpt.save, ckpt.keep_last_checkpoints, ckpt.ckpt_fully_parallel_save, ckpt.async_save,
                on_complete=self._checkpoint_complete, retain_interval=ckpt.save_retain_interval,
                persistent_worker=ckpt.use_persistent_ckpt_worker, hash_files=ckpt.verify_integrity,
            )  # fmt: skip
        opt = run.optimizer
        self.guard = UpdateGuard(opt.max_skipped_steps, device, opt.loss_spike_window, opt.loss_spike_sigma)

    def set_data(self, feed: feeds.DataFeed) -> None:
        if not isinstance(feed, feeds.DataFeed):  # a feed missing a member fails here, not mid-run
            raise TypeError(f"{type(feed).__name__} does not implement feeds.DataFeed")
        self.feed = feed
        self.data_hashes = [] if self.run.logging.log_data_hash else None
        # What happened to the rows (phased_dataset.ROW_COUNTS: rewritten runs, HDF5 rows whose labels are not
        # the next inputs), counted on the samples' designated readers, summed each step.
        config = self.run.data.phases_config if feed.phase is not None else None
        phases, sources = (config.phases, config.sources.values()) if config else ((), ())
        counted = any(p.fim or p.span_corruption for p in phases) or any(s.is_hdf5 for s in sources)
        shape = (len(feed.source_names), len(ROW_COUNTS))
        self.row_counts = torch.zeros(shape, dtype=torch.int64, device=self.device) if counted else None
        self.forward_step = make_forward_step(
            self.device,
            len(feed.source_names),
            self.data_hashes,
            timers=self.timers,
            row_counts=self.row_counts,
            per_position=self.run.optimizer.loss_normalization == "positions",
        )

    def train_iterators(self, steps: int) -> list:
        """One per model chunk (the interleaved schedule draws from each): the training batches of the
        next `steps` steps where the chunk takes them (readers.chunk_iterators), None elsewhere."""
        return readers.chunk_iterators(self.model, lambda: self.feed.train_batches(steps), self.device)

    def step_data_hash(self) -> int | None:
        """The sum over all ranks of the last training step's sample hashes."""
        if self.data_hashes is None:
            return None
        total = torch.tensor([sum(self.data_hashes)], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(total)
        return int(total.item())

    def _count_rows(self) -> None:
        """The step's row counts, summed over all ranks (only the designated readers add to them), into the
        feed's books (data_state.json, the checkpoint)."""
        if self.row_counts is None:
            return
        total = self.row_counts.clone()
        torch.distributed.all_reduce(total)
        self.feed.add_row_counts(total.cpu())
        self.row_counts.zero_()

    def _run(self, iterators: list, forward_only: bool, global_batch_size: int, forward_step=None) -> list[dict]:
        """One step's micro-batches through the pipeline schedule; iterators: one per model chunk (the
        interleaved schedule draws from each)."""
        return self.forward_backward(
            forward_step_func=forward_step or self.forward_step,
            data_iterator=iterators if len(iterators) > 1 else iterators[0],
            model=self.model,
            num_microbatches=self.run.layout.num_microbatches(global_batch_size),
            seq_length=self.crystal.seq_length,
            micro_batch_size=self.run.layout.micro_batch_size,
            forward_only=forward_only,
        )

    def train_step(self, iterators: list) -> tuple[float | None, torch.Tensor | None, float | None, str | None]:
        """(loss, per-source [loss sum, tokens] or None, grad norm, why the update was skipped) of one
        optimizer step. The guard may skip the update (grad norm None): non-finite gradients on any rank,
        or a loss spike."""
        if self.stragglers is not None:
            self.stragglers.work.step_started()
        for m in self.model:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.data_hashes is not None:
            self.data_hashes.clear()  # what evaluation read is not part of the step
        losses = self._run(iterators, forward_only=False, global_batch_size=self.feed.step_batch_size())
        self._return_cached_memory(1)
        self._count_rows()
        loss, by_source = _reduce_loss(losses)
        skipped = self.guard.check(self.model, loss, self.stop.requested() is not None)
        grad_norm, update_successful, self.num_zeros_in_grad = None, False, None
        if not skipped:
            if self.timers is not None:
                self.timers("optimizer", log_level=1).start()
            update_successful, grad_norm, self.num_zeros_in_grad = self.optimizer.step()
            if self.timers is not None:
                self.timers("optimizer").stop()
            if update_successful:  # in the scheduler's unit: samples with --train-samples, else steps
                self.scheduler.step(increment=self.run.optimizer.scheduler_steps()[2])
        end_fp8_step(self.model, applied=update_successful)
        self._return_cached_memory(2)
        return loss, by_source, grad_norm, skipped

    def _return_cached_memory(self, level: int) -> None:
        """--empty-unused-memory-level: as Megatron-LM's train_step, 1 after the forward-backward (and each
        evaluation), 2 also after the optimizer step."""
        if self.run.memory.empty_unused_memory_level >= level and self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def parameters_gathered(self):
        """With --overlap-param-gather the updated parameters are gathered by forward pre-hooks as the next
        training forward runs; an evaluation or a save needs them now, so the hooks are off around both
        (gathering first), as in Megatron-LM."""
        if not self.run.layout.overlap_param_gather:
            yield
            return
        for m in self.model:
            m.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            for m in self.model:
                m.enable_forward_pre_hook()

    @torch.no_grad()
    def evaluate(self, evaluation: eval_set.EvalSet) -> list[eval_set.Figure] | None:
        """An evaluation set's figures, forward only through the pipeline schedule (any layout); on the
        reading ranks of the last pipeline stage, None elsewhere."""
        with self.parameters_gathered():
            figures = self._evaluate(evaluation)
        self._return_cached_memory(1)
        return figures

    def _evaluate(self, evaluation: eval_set.EvalSet) -> list[eval_set.Figure] | None:
        self.config.timers = None  # an evaluation is side work, timed on its own line, not a step's part
        for m in self.model:
            m.eval()
        its = readers.chunk_iterators(
            self.model,
            # Read in this process: an evaluation's rows are cheap (requests in memory, held-out samples from
            # memory-mapped indices), and a worker process per set per evaluation cost ~0.3 s each to start.
            lambda: datasets.micro_batches(evaluation, 0, self.run, num_workers=0),
            self.device,
            positions=(lambda: datasets.positions_only(evaluation, self.run)) if evaluation.packed else None,
        )
        forward_step = make_forward_step(self.device, num_slots=evaluation.num_slots, packed=evaluation.packed)
        losses = []
        for _ in range(evaluation.steps):
            losses.extend(self._run(its, True, evaluation.batch_size, forward_step))
        end_fp8_step(self.model, applied=False)
        for m in self.model:
            m.train()
        self.config.timers = self.timers
        _, slots = _reduce_loss(losses, key="slots")
        if slots is None or not readers.is_reader():  # the sets' rows are on the reading ranks
            return None
        return evaluation.figures(slots.cpu().numpy())

    def current_lr(self) -> float:
        return next(g["lr"] for g in self.optimizer.param_groups if g.get("default_config", True))

    def states(self) -> dict:
        """Everything a checkpoint saves, by name, in order (the optimizer's entries refer to the model's)."""
        return {
            "model": checkpointing.ModelState(self.model),
            "optimizer": checkpointing.OptimizerState(self.optimizer),
            "opt_param_scheduler": self.scheduler,
            "data": self.feed,
            "update_guard": self.guard,
        }

    def save(self, side_files: dict | None = None) -> float:
        """Save a checkpoint, with side_files ({name: text}, rank 0's) beside it; the callbacks are told
        (post_checkpoint_saved) when it is complete, which with --async-save is after a background write.
        Returns the seconds the step waited for it."""
        started = time.perf_counter()
        data, tokenizer = self.run.data, None
        if data.tokenizer_model:
            tokenizer = {"type": data.tokenizer_type, "model": os.path.abspath(data.tokenizer_model)}
        metadata = checkpointing.checkpoint_metadata(self.crystal, self.padded_vocab, tokenizer)
        with self.parameters_gathered():
            path = self.checkpoints.save(self.iteration, self.states(), metadata, side_files)
        seconds = time.perf_counter() - started
        if self.checkpoints.in_flight is not None:
            distributed.print_rank_0(
                f"checkpoint {path}: writing in the background; the step waited {seconds:.2f} s "
                f"({self.checkpoints.gather_seconds:.2f} s of it gathering the state to write)"
            )
        else:
            hashing = (
                f" ({self.checkpoints.hash_seconds:.2f} s of it hashing its files)"
                if self.checkpoints.hash_files
                else ""
            )
            distributed.print_rank_0(f"saved checkpoint {path} in {seconds:.1f} s{hashing}")
        return seconds

    def _checkpoint_complete(self, path: str) -> None:
        for callback in self.callbacks:
            callback.post_checkpoint_saved(self, path)

    def load(self) -> None:
        wanted = phase_lr.saved_schedule(self.scheduler.state_dict())  # the flags' schedule, before the load
        ckpt = self.run.checkpoint
        self.iteration = 0
        if ckpt.load:
            self.iteration = checkpointing.load_checkpoint(
                ckpt.load,
                self.states(),
                self.crystal,
                self.padded_vocab,
                step=ckpt.ckpt_step,
                weights_only=ckpt.finetune,
                fully_parallel=ckpt.ckpt_fully_parallel_load,
                skip=frozenset({"optimizer", "opt_param_scheduler"} if ckpt.no_load_optim else ()),
                verify=ckpt.verify_integrity,
            )
            if ckpt.no_load_optim and self.iteration:
                distributed.print_rank_0(
                    "--no-load-optim: a fresh optimizer state and lr schedule (from its step 0), as Megatron-LM"
                )
        note = self.feed.resume_note
        if note:
            distributed.print_rank_0(f"warning: {note}")
        if self.iteration:
            phase_lr.check_resumed_schedule(self.run, self.scheduler, wanted, self.feed)
            distributed.print_rank_0(f"resumed from {ckpt.load} at iteration {self.iteration}")
        elif ckpt.load and checkpoint_files.checkpoint_path(ckpt.load, ckpt.ckpt_step, readers=None) is not None:
            distributed.print_rank_0(f"took the weights of {ckpt.load}: iteration 0, fresh optimizer and schedule")
        elif ckpt.pretrained_checkpoint:  # as Megatron-LM: the pretrained weights while --load holds none yet
            checkpointing.load_checkpoint(
                ckpt.pretrained_checkpoint, self.states(), self.crystal, self.padded_vocab, weights_only=True,
                verify=ckpt.verify_integrity,
            )  # fmt: skip
            distributed.print_rank_0(
                f"took the weights of --pretrained-checkpoint {ckpt.pretrained_checkpoint}"
                + (f" ({ckpt.load} holds no checkpoint yet)" if ckpt.load else "")
                + ": iteration 0, fresh optimizer and schedule"
            )
        else:
            distributed.print_rank_0(f"{ckpt.load} holds no checkpoint: starting fresh")


def _describe_path(run: RunConfig) -> str:
    device = "CPU (Megatron-Core CPU compatibility layer)" if cpu_compat.is_active() else torch.cuda.get_device_name()
    return (
        f"kernel path: {run.kernels.path.describe()}\ndevice: {device}; backend: {run.layout.distributed_backend}; "
        f"precision: {'bf16' if run.kernels.bf16 else 'fp32'}; optional accelerators: {accelerators.found()}"
        + ("; deterministic mode (deterministic kernels only)" if run.kernels.deterministic_mode else "")
    )


def pretrain(run: RunConfig) -> int:
    """Train with the configuration arguments.validate returned."""
    faults.mark_run_start()
    try:
        megatron_workarounds.apply()
    except megatron_workarounds.UnsupportedMegatronVersion as e:
        print(f"pretrain_crystal.py: error: {e}", file=sys.stderr)
        return 2
    device = distributed.initialize(run)
    ckpt = run.checkpoint
    attempt = restarts.Attempt.under_torchrun(ckpt.save, ckpt.max_restarts_from_one_checkpoint)
    if attempt is not None:
        attempt.begin()

    def fail(line: str, code: int, everywhere: bool = False) -> int:
        """One line (rank 0's, or each rank's own where only it knows), kept for a restart's report."""
        if everywhere:
            print(line, file=sys.stderr, flush=True)
        else:
            distributed.print_rank_0(line, error=True)
        if attempt is not None:
            attempt.ended(line, code)
        return code

    try:
        return _train(run, device, attempt)
    except (checkpoint_files.CheckpointError, PhasesConfigError, IndexCacheError) as e:
        return fail(f"pretrain_crystal.py: error: {e}", 2)
    except faults.ReplicasDiverged as e:
        return fail(f"pretrain_crystal.py: error: {e}", 5)
    except RuntimeError as e:
        failure = collective_failure(e)
        if failure is None:
            if attempt is not None:
                attempt.ended(f"{type(e).__name__}: {e}")
            raise
        kind, waited_in = failure
        rank, minutes = torch.distributed.get_rank(), run.layout.distributed_timeout_minutes
        if kind == "timeout":
            what = f"waited longer than --distributed-timeout-minutes {minutes} in {waited_in}: another rank stopped "
            what += "answering (hung, stopped, or its node lost)"
        else:
            what = f"lost another rank in {waited_in}: its process ended (see its error) or its node was lost"
        line = f"pretrain_crystal.py: error: rank {rank} {what}; the job ends; resume from the last checkpoint"
        return fail(line, 4, everywhere=True)
    except Exception as e:
        if attempt is not None:
            attempt.ended(f"{type(e).__name__}: {e}")
        raise
    finally:
        distributed.shutdown()


def _train(run: RunConfig, device: torch.device, attempt: restarts.Attempt | None) -> int:
    trainer = Trainer(run, device)
    layout, opt = run.layout, run.optimizer
    distributed.print_rank_0(
        f"model {run.model.preset}: {run.crystal.num_parameters():,} parameters | "
        f"TP {layout.tensor_model_parallel_size} PP {layout.pipeline_model_parallel_size} "
        f"VP {layout.virtual_pipeline_model_parallel_size or 1} "
        f"DP {layout.data_parallel_size} SP {layout.sequence_parallel} dist-opt {layout.use_distributed_optimizer} | "
        f"{layout.num_microbatches(opt.global_batch_size)} micro-batches of {layout.micro_batch_size} per step"
        + (" (phase 1's batch)" if run.data.phases else "")
    )
    distributed.print_rank_0(_describe_path(run))
    distributed.print_rank_0(group_rates_line(run))
    preset, crystal = get_preset(run.model.preset), run.crystal
    if crystal.hidden_size != preset.hidden_size:
        distributed.print_rank_0(
            f"muP at hidden size {crystal.hidden_size} ({run.model.preset}: {preset.hidden_size}; base width "
            f"{preset.hidden_size * preset.mup_width_scale:g}): width scale {crystal.mup_width_scale:g}, hidden "
            f"init std {crystal.init_std:.6g}, hidden matrices' lr x {crystal.mup_width_scale:g}, output multiplier "
            f"{crystal.output_multiplier:.6g}"
        )
    for line in memory_report.predicted_lines(run) + restarts.warnings(run.checkpoint.save, run.checkpoint.load):
        distributed.print_rank_0(line)
    if run.checkpoint.save and torch.distributed.get_rank() == 0:
        os.makedirs(run.checkpoint.save, exist_ok=True)
        path = os.path.join(run.checkpoint.save, "run_config.json")
        write_text_atomically(path, run.to_json())
        print(f"configuration (flags as given and every resolved value): {path}", flush=True)
    setup = readers.SetupCost()
    with setup:
        feed = feeds.build(run)
        trainer.set_data(feed)
    if run.checkpoint.load or run.checkpoint.pretrained_checkpoint:
        trainer.load()
    if run.data.start_point:
        _start_at(run, trainer, feed)
    if attempt is not None:
        stop = attempt.resumed(trainer.iteration)
        if stop is not None:  # exit 0: the one end torchrun does not restart (restarts.py)
            distributed.print_rank_0(f"pretrain_crystal.py: error: {stop}", error=True)
            return 0
    with setup:
        train_its = trainer.train_iterators(opt.train_iters - trainer.iteration)
    setup.report(feed.reads)

    callbacks = trainer.callbacks = build_callbacks(run, trainer)
    try:
        return _loop(run, trainer, feed, train_its, callbacks)
    except BaseException as error:
        for callback in callbacks:
            callback.on_error(trainer, error)
        raise
    finally:
        for callback in callbacks:
            callback.close()
        trainer.stop.close()


def _start_at(run: RunConfig, trainer: Trainer, feed) -> None:
    """--phases-start, for a run at iteration 0 (a resumed one continues its checkpoint: the same command
    requeues)."""
    if trainer.iteration:
        distributed.print_rank_0(f"--phases-start {run.data.phases_start}: not taken, the run resumed its checkpoint")
        return
    phase, step = run.data.start_point
    note = feed.start_at(phase, step)
    trainer.iteration = run.data.phases_config.start_iteration(phase, step)
    distributed.print_rank_0(f"{note}: iteration {trainer.iteration}, {feed.consumed_samples} samples in")


def _loop(run: RunConfig, trainer: Trainer, feed, train_its: list, callbacks: list) -> int:
    phase, stopped_by_signal = None, False
    opt = run.optimizer
    while trainer.iteration < opt.train_iters:
        if feed.step_phase() != phase:
            phase = feed.step_phase()
            _enter_phase(run, trainer, feed, phase)
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
                f"{skipped}; --max-skipped-steps {opt.max_skipped_steps}); stopping without saving. Resume from "
                "the last checkpoint, e.g. with a lower --lr or after inspecting the data (tools/data_trace.py)",
                error=True,
            )
            return 3
        if opt.exit_interval and trainer.iteration % opt.exit_interval == 0:
            break
        if trainer.guard.stop_agreed:
            distributed.print_rank_0(
                f"stop requested ({trainer.stop.signalled or 'by another rank'}): saving at "
                f"iteration {trainer.iteration} and exiting; a run with the same --load resumes here"
            )
            stopped_by_signal = True
            break
    for callback in callbacks:
        callback.post_train(trainer, stopped_by_signal)
    return 0


def _enter_phase(run: RunConfig, trainer: Trainer, feed, phase: int) -> None:
    """The switch happens here, inside the job: the next phase's lr schedule (phase_lr.enter_phase), its
    batch size and blend from the next sample on."""
    phase_lr.enter_phase(trainer.scheduler, feed, run.checkpoint.use_checkpoint_opt_param_scheduler,
                         run.optimizer.weight_decay)  # fmt: skip
    fim = ", ".join(f"{n} rate {f.rate} spm {f.spm_rate}" for n, f in feed.phase.fim.items()) or "none"
    spans = ", ".join(f"{n} rate {c.rate}" for n, c in feed.phase.span_corruption.items())
    distributed.print_rank_0(
        f"phase {feed.phase_name} ({phase + 1}/{len(run.data.phases_config.phases)}) from "
        f"iteration {trainer.iteration + 1}: global batch {feed.step_batch_size()}, "
        f"blend {feed.phase.blend}, FIM {fim}" + (f", span corruption {spans}" if spans else "")
    )
