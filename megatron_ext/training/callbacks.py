"""Side work of the training loop as callbacks: the training's metrics, evaluation, checkpoint saving,
profiling. The loop calls post_step after every step, post_train when it ends normally (not after a fatal
error), on_error when it raised, and close on every callback however it ends (a `finally`), so files and
writers are closed even when a step raises; the trainer calls post_checkpoint_saved after each save. A
callback writes nothing itself: it records into the metrics stream (training/metrics.py), whose sinks
write (training/metric_sinks.py); none reads another's fields. OLMo-core's Callback is the model.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch

from megatron_ext.atomic_files import write_text_atomically
from megatron_ext.kernels.selection import CoreAttention
from megatron_ext.training import distributed, faults, memory_report
from megatron_ext.training.batches import readers
from megatron_ext.training.metric_sinks import (
    BY_SOURCE,
    TIME,
    TIME_MIN,
    TOKENS_BY_SOURCE,
    ConsoleSink,
    EvalResultsSink,
    JsonlSink,
    TensorBoardSink,
    WandbSink,
)
from megatron_ext.training.metrics import SIDE_WORK, Metrics, Throughput, timer_figures
from megatron_ext.training.run_config import CheckpointSection, RunConfig

STOP_MARKER = "stopped_by_signal"  # in --save: this run stopped on a signal, after saving (holds the iteration)


@dataclass(frozen=True)
class StepResult:
    iteration: int  # the step just taken, from 1
    loss: float | None  # the global loss, on the last pipeline stage (None elsewhere)
    lr: float
    grad_norm: float | None  # None: the update was skipped
    skipped: str | None  # why the update was skipped
    global_batch_size: int
    phase_name: str | None
    source_losses: dict[str, tuple[float, float]] | None  # source -> (summed loss, tokens), with --phases
    data_hash: int | None


class Callback:
    """Side work of the loop. Hooks: post_step after every step; post_checkpoint_saved after every save (on
    every rank, the checkpoint complete); post_train when the loop ends normally; on_error when a step or
    a hook raised (before the error propagates); close always (a `finally`)."""

    def post_step(self, trainer, step: StepResult) -> None:
        pass

    def post_checkpoint_saved(self, trainer, path: str) -> None:
        pass

    def post_train(self, trainer, stopped_by_signal: bool) -> None:
        pass

    def on_error(self, trainer, error: BaseException) -> None:
        pass

    def close(self) -> None:
        pass


def params_norm(model_chunks: list) -> float:
    """The L2 norm of the model's parameters, each counted once (Megatron-LM's calc_params_l2_norm): the
    tied embedding's second copy and tensor-parallel duplicates (norms, biases) left out, the squares summed
    over the model-parallel ranks by Megatron-Core's gradient-norm function, applied to the parameters."""
    from megatron.core import parallel_state
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    params = [
        p.detach().float()
        for chunk in model_chunks
        for p in chunk.parameters()
        if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p)
    ]
    return get_grad_norm_fp32(params, 2, parallel_state.get_model_parallel_group())


class MetricsCallback(Callback):
    """The training's source of the metrics stream: each step's values (loss, lr, grad norm, per-source loss,
    data hash), and at log steps the throughput, the consumed tokens and the data feed's scalars; then the
    step is logged to the sinks. It owns the stream and closes its sinks."""

    def __init__(self, run: RunConfig, trainer, metrics: Metrics, logging_rank: bool):
        self.metrics, self.feed, self.logging_rank = metrics, trainer.feed, logging_rank
        self.log_interval, self.train_iters = run.logging.log_interval, run.optimizer.train_iters
        self.seq_length, self.window_steps = run.crystal.seq_length, 0
        self.log_params_norm = run.logging.log_params_norm
        self.throughput = Throughput(
            run.crystal,
            trainer.padded_vocab,
            torch.distributed.get_world_size(),
            self.train_iters,
            fp8=run.kernels.path.fp8 is not None,
        )

    def post_step(self, trainer, step: StepResult) -> None:
        record, it = self.metrics.record, step.iteration
        if step.loss is not None:
            record("lm loss", step.loss)
        record("learning-rate", step.lr)
        if step.grad_norm is not None:
            record("grad-norm", step.grad_norm)
        if getattr(trainer, "num_zeros_in_grad", None) is not None:  # --log-num-zeros-in-grad
            record("num-zeros", trainer.num_zeros_in_grad)
        for name, (total, tokens) in (step.source_losses or {}).items():
            if tokens:  # sources present in the step
                record(BY_SOURCE + name, total / tokens)
                record(TOKENS_BY_SOURCE + name, tokens)
        if step.data_hash is not None:
            record("data-hash", step.data_hash)
        self.throughput.step(step.global_batch_size * self.seq_length, self.metrics.values.get(SIDE_WORK, 0.0))
        self.window_steps += 1
        if it % self.log_interval == 0 or it == self.train_iters:
            for name, value in self.throughput.figures(it).items():
                record(name, value)
            if trainer.timers is not None:  # a collective: every rank at the same steps
                for name, (fastest, slowest) in timer_figures(trainer.timers, self.window_steps).items():
                    record(f"{TIME}{name}", slowest)
                    record(f"{TIME_MIN}{name}", fastest)
            self.window_steps = 0
            if getattr(trainer, "stragglers", None) is not None:  # a collective: every rank at the same steps
                spread, named = trainer.stragglers.check(it)
                for name, value in spread.items():
                    record(name, value)
                for line in named if self.logging_rank else ():
                    print(line, flush=True)
            for name, value in memory_report.measured().items():  # on a GPU
                record(name, value)
            if self.log_params_norm:  # a collective over the model-parallel ranks: every rank at the same steps
                record("params-norm", params_norm(trainer.model))
            record("consumed-tokens", self.feed.consumed_samples * self.seq_length)
            for name, value in self.feed.scalars().items() if self.logging_rank else ():
                record(name, value)  # the logging rank reads data: it has the sources' positions
        context = {"phase": step.phase_name, "skipped": step.skipped}
        if step.skipped:
            context.update(skipped_in_a_row=trainer.guard.consecutive, skipped_in_all=trainer.guard.total)
        self.metrics.log_step(it, context)

    def close(self) -> None:
        self.metrics.close()


class EvaluationCallback(Callback):
    """Validation and the downstream tasks every --eval-interval steps, logged as figures (the console line
    with its cost against the training time since the last, TensorBoard, eval_results.jsonl)."""

    def __init__(self, run: RunConfig, metrics: Metrics):
        self.run, self.metrics = run, metrics
        self.interval, self.seq_length = run.eval.eval_interval, run.crystal.seq_length
        self.since = time.perf_counter()
        self._validation = None
        # The tasks are built before the first step, so that an evaluation's cost on the log line is its own.
        self._tasks = self._build_tasks()

    def post_step(self, trainer, step: StepResult) -> None:
        if step.iteration % self.interval or trainer.guard.exhausted:  # a run stopping on skips: no side work
            return
        sets = self.sets(trainer)
        if not sets:  # --eval-iters 0 and no tasks: nothing to evaluate (Megatron-LM's meaning)
            return
        started = time.perf_counter()
        figures = []
        for evaluation in sets:
            figures += trainer.evaluate(evaluation) or []
        if self.run.logging.log_validation_ppl_to_tensorboard:  # Megatron-LM's "validation ppl"
            figures += [f._replace(metric="ppl", value=math.exp(min(f.value, 700.0)), stderr=None)
                        for f in figures if f.metric == "loss" and f.task.startswith("valid")]  # fmt: skip
        seconds = time.perf_counter() - started
        trained, self.since = max(started - self.since, 1e-9), time.perf_counter()
        self.metrics.record(SIDE_WORK, seconds, reduce="sum")
        context = {
            "phase": step.phase_name,
            "phase_start_tokens": self.phase_start(step),
            "tokens": trainer.feed.consumed_samples * self.seq_length,
            "seconds": seconds,
            "trained_seconds": trained,
        }
        self.metrics.log_figures(step.iteration, figures, context)

    def phase_start(self, step: StepResult) -> int | None:
        """Tokens read before the current phase began (for the report's phase boundaries)."""
        config = self.run.data.phases_config
        if config is None or step.phase_name is None:
            return None
        names = [p.name for p in config.phases]
        before = config.phases[: names.index(step.phase_name)]
        return sum(p.iters * p.global_batch_size for p in before) * self.seq_length

    def sets(self, trainer) -> list:
        """The held-out samples (built at the first evaluation; none with --eval-iters 0), then the tasks."""
        if self._validation is None and self.run.eval.validates:
            self._validation = trainer.feed.validation_set()
        held_out = [self._validation] if self.run.eval.validates else []
        return [s for s in (*held_out, *self._tasks) if s.num_slots]

    def _build_tasks(self) -> list:
        """The downstream tasks' sets, on every rank (a pipeline stage without data needs a packed set's
        positions); one line says how they were packed."""
        from megatron_ext.evaluation.tasks import build_task_set

        run = self.run
        packed = run.eval.eval_pack_requests and run.kernels.path.attention != CoreAttention.TRANSFORMER_ENGINE
        if run.eval.tasks and run.eval.eval_pack_requests and not packed:
            # TE's attention takes packed rows as THD with packed_seq_params only, which is not wired here.
            distributed.print_rank_0("evaluation: one request per row (packing needs the local attention path)")
        tasks = []
        for name, cap in run.eval.tasks:
            task = build_task_set(
                name, cap, run.data.tokenizer, self.seq_length, run.optimizer.global_batch_size, packed
            )
            if task.truncated:
                distributed.print_rank_0(
                    f"warning: {name}: {task.truncated} of {task.num_slots} continuations are longer than the "
                    f"sequence length {self.seq_length}; they are scored on the part that fits"
                )
            tasks.append(task)
        if tasks:
            requests, rows = sum(t.num_slots for t in tasks), sum(len(t.rows) for t in tasks)
            distributed.print_rank_0(
                f"evaluation: {len(tasks)} task(s), {requests:,} requests in {rows:,} rows of {self.seq_length} "
                f"({'packed, ' if packed else ''}{requests / max(rows, 1):.1f} a row)"
            )
        return tasks


class CheckpointCallback(Callback):
    """Saves every --save-interval steps and at the end of the run, with what the run has read so far beside
    each checkpoint (data_state.json, for people, as of the save); after a stop signal, also the marker that
    the SLURM launch script requeues on (examples/slurm/launch.sh: the job exits 0 here). With --async-save
    it completes each background write after the step in which it finished, waits for the one in flight at
    the end of the run (and on a stop signal), and stops it after an error (the tracker stays at the
    previous checkpoint)."""

    def __init__(self, checkpoint: CheckpointSection, metrics: Metrics, saver):
        self.save_dir, self.interval, self.metrics, self.saver = (
            checkpoint.save,
            checkpoint.save_interval,
            metrics,
            saver,
        )

    def _due(self, iteration: int) -> bool:
        return bool(self.interval) and iteration % self.interval == 0

    def _save(self, trainer) -> float:
        books = trainer.feed.bookkeeping_json(trainer.iteration) if torch.distributed.get_rank() == 0 else None
        return trainer.save({"data_state.json": books} if books else None)  # per source and per phase

    def post_step(self, trainer, step: StepResult) -> None:
        self.saver.poll()
        if self._due(step.iteration) and not trainer.guard.exhausted:  # stopping on skips: without saving
            self.metrics.record(SIDE_WORK, self._save(trainer), reduce="sum")

    def post_train(self, trainer, stopped_by_signal: bool) -> None:
        if not self._due(trainer.iteration):
            self._save(trainer)
        self.saver.wait()
        if stopped_by_signal and torch.distributed.get_rank() == 0:
            write_text_atomically(os.path.join(self.save_dir, STOP_MARKER), str(trainer.iteration))

    def on_error(self, trainer, error: BaseException) -> None:
        self.saver.close(abort=True)

    def close(self) -> None:
        self.saver.close()  # a run ending on skipped steps keeps the checkpoint being written


class ProfilerCallback(Callback):
    """--profile: steps (start, end] on the chosen ranks (Megatron-LM's --profile-step-* flags), bracketed by
    the CUDA profiler API (cudaProfilerStart / Stop: `nsys profile --capture-range=cudaProfilerApi` records
    just them), or with --use-pytorch-profiler under torch.profiler, written as a Chrome trace
    (chrome://tracing, Perfetto, TensorBoard's profiler plugin); stopped in close() if the run ends inside
    the window."""

    def __init__(self, run: RunConfig, directory: str):
        self.section, self.directory, self.profiler = run.profile, directory, None
        self.active = torch.distributed.get_rank() in self.section.profile_ranks
        self.cuda_range = False  # the CUDA profiler API's capture is open

    def post_step(self, trainer, step: StepResult) -> None:
        if not self.active:
            return
        if not self.section.use_pytorch_profiler:
            if step.iteration == self.section.profile_step_start:
                torch.cuda.cudart().cudaProfilerStart()
                self.cuda_range = True
            elif step.iteration == self.section.profile_step_end and self.cuda_range:
                self.close()
            return
        if step.iteration == self.section.profile_step_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
        elif step.iteration == self.section.profile_step_end and self.profiler is not None:
            self.close()

    def on_error(self, trainer, error: BaseException) -> None:
        if self.profiler is not None:  # close() writes the trace of the failing steps: what one wants to read
            print(
                f"profile: the run failed ({type(error).__name__}) inside the profiled steps; writing them", flush=True
            )

    def close(self) -> None:
        if self.cuda_range:
            torch.cuda.cudart().cudaProfilerStop()
            self.cuda_range = False
            s = self.section
            print(f"profile: steps {s.profile_step_start + 1}-{s.profile_step_end} bracketed by the CUDA profiler API")
        if self.profiler is None:
            return
        self.profiler.stop()
        os.makedirs(self.directory, exist_ok=True)
        s = self.section
        path = os.path.join(
            self.directory,
            f"profile_rank{torch.distributed.get_rank()}_steps{s.profile_step_start + 1}-{s.profile_step_end}.json",
        )
        self.profiler.export_chrome_trace(path)
        self.profiler = None
        print(f"profile of steps {s.profile_step_start + 1}-{s.profile_step_end}: {path}", flush=True)


class DataWorkersCallback(Callback):
    """After the first step, once the DataLoader workers have served batches: the memory each holds of
    its own (readers.report_workers)."""

    def __init__(self, num_workers: int):
        self.num_workers, self.reported = num_workers, False

    def post_step(self, trainer, step: StepResult) -> None:
        if not self.reported:
            self.reported = True
            readers.report_workers(self.num_workers)


class GarbageCollectionCallback(Callback):
    """--manual-gc (Megatron-LM's): Python's automatic collection off for the run, a collection on every rank
    at the same steps instead (every --manual-gc-interval steps, and after each evaluation unless
    --no-manual-gc-eval); automatic collection is turned back on at close."""

    def __init__(self, run: RunConfig):
        import gc

        self.gc, self.interval, self.eval_interval = gc, run.memory.manual_gc_interval, 0
        if run.memory.manual_gc_eval:
            self.eval_interval = run.eval.eval_interval
        gc.disable()
        gc.collect()
        distributed.print_rank_0(
            "garbage collection: manual, "
            + (f"every {self.interval} steps" if self.interval else "not between steps")
            + (f" and after each evaluation (every {self.eval_interval})" if self.eval_interval else "")
        )

    def post_step(self, trainer, step: StepResult) -> None:
        it = step.iteration
        if (self.interval and it % self.interval == 0) or (self.eval_interval and it % self.eval_interval == 0):
            self.gc.collect()

    def close(self) -> None:
        self.gc.enable()


class ReplicaHashCallback(Callback):
    """--check-weight-hash-across-dp-replicas-interval: every N steps, before any evaluation or save reads the
    weights, the data-parallel replicas compare their parameters (faults.check_replicas_agree)."""

    def __init__(self, interval: int):
        self.interval = interval
        distributed.print_rank_0(f"data-parallel replicas' parameters compared by hash every {interval} steps")

    def post_step(self, trainer, step: StepResult) -> None:
        if step.iteration % self.interval == 0:
            faults.check_replicas_agree(trainer.model, step.iteration)


def build_callbacks(run: RunConfig, trainer) -> list[Callback]:
    """The run's callbacks, and the metrics stream with its sinks on the logging rank."""
    logging_rank = distributed.is_logging_rank()
    sinks = []
    if logging_rank:
        fp8 = run.kernels.path.fp8 is not None
        sinks.append(ConsoleSink(run.optimizer.train_iters, run.crystal.seq_length, fp8, run.logging.timing_log_option))
        log = run.logging
        if log.tensorboard_dir:
            sinks.append(
                TensorBoardSink(log.tensorboard_dir, log.log_timers_to_tensorboard, log.log_memory_to_tensorboard)
            )
        if log.wandb_project:
            config = json.loads(run.to_json())
            sinks.append(WandbSink(log.wandb_project, log.wandb_exp_name, log.wandb_save_dir, config,
                                   log.log_timers_to_tensorboard, log.log_memory_to_tensorboard,
                                   log.wandb_entity))  # fmt: skip
        if run.logging.metrics_jsonl:
            sinks.append(JsonlSink(run.logging.metrics_jsonl))
        if run.eval.eval_interval and run.eval.eval_results_jsonl:
            sinks.append(EvalResultsSink(run.eval.eval_results_jsonl, run.eval.run_name))
    metrics = Metrics(sinks)
    callbacks: list[Callback] = [MetricsCallback(run, trainer, metrics, logging_rank)]
    if run.layout.check_weight_hash_across_dp_replicas_interval:  # first: before anything reads the weights
        callbacks.append(ReplicaHashCallback(run.layout.check_weight_hash_across_dp_replicas_interval))
    if run.eval.eval_interval:
        callbacks.append(EvaluationCallback(run, metrics))
    if run.memory.manual_gc:  # after the evaluation: its collection follows it
        callbacks.append(GarbageCollectionCallback(run))
    if run.data.num_workers:
        callbacks.append(DataWorkersCallback(run.data.num_workers))
    if run.checkpoint.save:
        callbacks.append(CheckpointCallback(run.checkpoint, metrics, trainer.checkpoints))
    if run.profile.profile:
        callbacks.append(ProfilerCallback(run, run.logging.tensorboard_dir or run.checkpoint.save or os.getcwd()))
    return callbacks
