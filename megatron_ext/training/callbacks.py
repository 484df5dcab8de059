"""Side work of the training loop as callbacks: metrics (log line, TensorBoard, --metrics-jsonl),
evaluation, checkpoint saving. The loop calls post_step after every step, post_train when it ends
normally (not after a fatal error), and close on every callback however it ends (a `finally`), so files
and writers are closed even when a step raises. OLMo-core's Callback is the model.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from megatron_ext import checkpointing
from megatron_ext.training import data_readers, distributed
from megatron_ext.training.metrics import TrainingLogger
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
    def post_step(self, trainer, step: StepResult) -> None:
        pass

    def post_train(self, trainer, stopped_by_signal: bool) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsCallback(Callback):
    """The log line and TensorBoard on the logging rank (on the last stage, which holds the loss), one JSON line
    per step, skip reports. Side work (saves, evaluations) reports its time through exclude()."""

    def __init__(self, run: RunConfig, trainer):
        self.feed, logging = trainer.feed, run.logging
        self.logging_rank = distributed.is_logging_rank()
        self.writer = None
        if self.logging_rank and logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(logging.tensorboard_dir)
        self.logger = TrainingLogger(
            run.crystal,
            trainer.padded_vocab,
            torch.distributed.get_world_size(),
            logging.log_interval,
            run.optimizer.train_iters,
            fp8=run.kernels.path.fp8 is not None,
            writer=self.writer,
        )
        self.jsonl = None
        if self.logging_rank and logging.metrics_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(logging.metrics_jsonl)), exist_ok=True)  # as TensorBoard does
            self.jsonl = open(logging.metrics_jsonl, "a")  # noqa: SIM115 - closed in close()

    def exclude(self, seconds: float) -> None:
        self.logger.exclude(seconds)

    def post_step(self, trainer, step: StepResult) -> None:
        if not self.logging_rank:
            return
        feed, it = self.feed, step.iteration
        line = self.logger.step(
            it, step.loss, step.lr, step.grad_norm, feed.consumed_samples, step.global_batch_size, step.phase_name,
            step.source_losses,
        )  # fmt: skip
        if line:
            print(line, flush=True)
            for tag, value in feed.scalars().items() if self.writer else ():
                self.writer.add_scalar(tag, value, it)
        if self.jsonl:
            record = {"iteration": it, "lm_loss": step.loss, "grad_norm": step.grad_norm, "lr": step.lr}
            if step.phase_name:  # per source with tokens in this step: mean loss, and the tokens it is over
                present = {n: (total, tokens) for n, (total, tokens) in step.source_losses.items() if tokens}
                record.update(
                    phase=step.phase_name,
                    source_losses={n: total / tokens for n, (total, tokens) in present.items()},
                    source_tokens={n: int(tokens) for n, (_, tokens) in present.items()},
                )
            if step.data_hash is not None:
                record["data_hash"] = step.data_hash
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if step.skipped:
            print(
                f"iteration {it}: {step.skipped} (lm loss {step.loss}): update skipped "
                f"({trainer.guard.consecutive} in a row, {trainer.guard.total} in all)",
                flush=True,
            )

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()


def format_figures(figures) -> str:
    """ "valid loss 4.1234 | valid/text loss 4.0 bpb 1.2 | arc_easy acc 0.25 acc_norm 0.27", task by task."""
    tasks: dict[str, list[str]] = {}
    for f in figures:
        tasks.setdefault(f.task, []).append(f"{f.metric} {f.value:.4f}")
    return " | ".join(f"{task} {' '.join(parts)}" for task, parts in tasks.items())


class EvaluationCallback(Callback):
    """Validation every --eval-interval steps: the log line (with its cost against the training time since
    the last one), TensorBoard (eval/<task>/<metric>) and one record per figure in --eval-results-jsonl."""

    def __init__(self, run: RunConfig, metrics: MetricsCallback):
        self.interval, self.metrics, self.seq_length = run.eval.eval_interval, metrics, run.crystal.seq_length
        self.run = run
        self.run_name = run.eval.run_name
        self.results = None
        if metrics.logging_rank and run.eval.eval_results_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(run.eval.eval_results_jsonl)), exist_ok=True)
            self.results = open(run.eval.eval_results_jsonl, "a")  # noqa: SIM115 - closed in close()
        self.since = time.perf_counter()
        self._sets = None

    def post_step(self, trainer, step: StepResult) -> None:
        if step.iteration % self.interval or trainer.guard.exhausted:  # a run stopping on skips: no side work
            return
        started = time.perf_counter()
        figures = []
        for evaluation in self.sets(trainer):
            figures += trainer.evaluate(evaluation) or []
        seconds = time.perf_counter() - started
        trained, self.since = max(started - self.since, 1e-9), time.perf_counter()
        self.metrics.exclude(seconds)
        if not self.metrics.logging_rank:
            return
        cost = f"{seconds:.1f} s ({100 * seconds / trained:.1f}% of the {trained:.1f} s trained since the last)"
        print(f"validation at iteration {step.iteration} | {format_figures(figures)} | {cost}", flush=True)
        writer = self.metrics.writer
        if writer:
            for f in figures:
                writer.add_scalar(f"eval/{f.task}/{f.metric}", f.value, step.iteration)
            writer.add_scalar("eval/seconds", seconds, step.iteration)
        if self.results:
            tokens = trainer.feed.consumed_samples * self.seq_length
            context = {"run": self.run_name, "phase": step.phase_name, "phase_start_tokens": self.phase_start(step)}
            for f in figures:
                record = {
                    **context, "iteration": step.iteration, "tokens": tokens, "checkpoint": None, "task": f.task,
                    "metric": f.metric, "value": f.value, "n": f.n, "stderr": f.stderr,
                }  # fmt: skip
                self.results.write(json.dumps(record) + "\n")
            self.results.flush()

    def phase_start(self, step: StepResult) -> int | None:
        """Tokens read before the current phase began (for the report's phase boundaries)."""
        config = self.run.data.phases_config
        if config is None or step.phase_name is None:
            return None
        names = [p.name for p in config.phases]
        before = config.phases[: names.index(step.phase_name)]
        return sum(p.iters * p.global_batch_size for p in before) * self.seq_length

    def sets(self, trainer) -> list:
        """The held-out samples, then the downstream tasks; built at the first evaluation."""
        if self._sets is None:
            from megatron_ext.evaluation.tasks import build_task_set

            run = self.run
            self._sets = [trainer.feed.validation_set()]
            for name, cap in run.eval.tasks:
                task = build_task_set(name, cap, run.data.tokenizer, self.seq_length, run.optimizer.global_batch_size)
                if task.truncated:
                    distributed.print_rank_0(
                        f"warning: {name}: {task.truncated} of {task.num_slots} continuations are longer than the "
                        f"sequence length {self.seq_length}; they are scored on the part that fits"
                    )
                self._sets.append(task)
        return [s for s in self._sets if s.num_slots]

    def close(self) -> None:
        if self.results:
            self.results.close()


class CheckpointCallback(Callback):
    """Saves every --save-interval steps and at the end of the run; after a stop signal, also leaves the
    marker that the SLURM launch script requeues on (examples/slurm/launch.sh: the job exits 0 here)."""

    def __init__(self, checkpoint: CheckpointSection, metrics: MetricsCallback):
        self.save_dir, self.interval, self.metrics = checkpoint.save, checkpoint.save_interval, metrics

    def _due(self, iteration: int) -> bool:
        return bool(self.interval) and iteration % self.interval == 0

    def post_step(self, trainer, step: StepResult) -> None:
        if self._due(step.iteration) and not trainer.guard.exhausted:  # stopping on skips: without saving
            self.metrics.exclude(trainer.save())

    def post_train(self, trainer, stopped_by_signal: bool) -> None:
        if not self._due(trainer.iteration):
            trainer.save()
        if stopped_by_signal and torch.distributed.get_rank() == 0:
            checkpointing.write_text_atomically(os.path.join(self.save_dir, STOP_MARKER), str(trainer.iteration))


class ProfilerCallback(Callback):
    """--profile: torch.profiler over steps (start, end] on the chosen ranks (Megatron-LM's --profile-step-*
    flags), written as a Chrome trace (chrome://tracing, Perfetto, TensorBoard's profiler plugin); stopped
    in close() if the run ends inside the window."""

    def __init__(self, run: RunConfig, directory: str):
        self.section, self.directory, self.profiler = run.profile, directory, None
        self.active = torch.distributed.get_rank() in self.section.profile_ranks

    def post_step(self, trainer, step: StepResult) -> None:
        if not self.active:
            return
        if step.iteration == self.section.profile_step_start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.start()
        elif step.iteration == self.section.profile_step_end and self.profiler is not None:
            self.close()

    def close(self) -> None:
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
    its own (data_readers.report_workers)."""

    def __init__(self, num_workers: int):
        self.num_workers, self.reported = num_workers, False

    def post_step(self, trainer, step: StepResult) -> None:
        if not self.reported:
            self.reported = True
            data_readers.report_workers(self.num_workers)


def build_callbacks(run: RunConfig, trainer) -> list[Callback]:
    metrics = MetricsCallback(run, trainer)
    callbacks: list[Callback] = [metrics]
    if run.eval.eval_interval:
        callbacks.append(EvaluationCallback(run, metrics))
    if run.data.num_workers:
        callbacks.append(DataWorkersCallback(run.data.num_workers))
    if run.checkpoint.save:
        callbacks.append(CheckpointCallback(run.checkpoint, metrics))
    if run.profile.profile:
        callbacks.append(ProfilerCallback(run, run.logging.tensorboard_dir or run.checkpoint.save or os.getcwd()))
    return callbacks
