"""Where the metrics stream is written (training/metrics.py records it): the console's log line and
validation line, TensorBoard, the --metrics-jsonl lines and the eval_results.jsonl records. Each sink
receives every step's values and every evaluation's figures, and writes what it shows; none computes a
figure another shows. They live on the logging rank only.
"""

from __future__ import annotations

import json
import os

from megatron_ext.evaluation.records import append_records, figure_records
from megatron_ext.training.metrics import format_duration, mfu_text

BY_SOURCE = "lm loss by source/"  # + source name: the step's mean loss over that source's tokens
TOKENS_BY_SOURCE = "tokens by source/"  # + source name: the loss tokens that mean is over
TIME, TIME_MIN = "time/", "time-min/"  # + timer name: ms per step, the slowest and the fastest rank's
STRAGGLER = "straggler/"  # + fastest-s, median-s, slowest-s, slowest-rank, slowest-over-median (stragglers.py)
MEMORY = "memory/"  # + allocated-gib, reserved-gib, peak-allocated-gib (training/memory_report.py)


def sources_in(values: dict) -> list[str]:
    """The sources present in a step (those with loss tokens in it)."""
    return [k[len(TOKENS_BY_SOURCE) :] for k in values if k.startswith(TOKENS_BY_SOURCE)]


class Sink:
    def write_step(self, step: int, values: dict, context: dict) -> None:
        pass

    def write_figures(self, step: int, figures: list, context: dict) -> None:
        pass

    def close(self) -> None:
        pass


def memory_text(values: dict) -> str | None:
    """ "memory (GiB) allocated 41.2 | reserved 44.0 | peak 52.3": the logging rank's, on a GPU."""
    if MEMORY + "allocated-gib" not in values:
        return None
    parts = (("allocated", "allocated-gib"), ("reserved", "reserved-gib"), ("peak", "peak-allocated-gib"))
    return "memory (GiB) " + " | ".join(f"{label} {values[MEMORY + key]:.1f}" for label, key in parts)


def format_figures(figures) -> str:
    """ "valid loss 4.1234 | valid/text loss 4.0 bpb 1.2 | arc_easy acc 0.25 acc_norm 0.27", task by task."""
    tasks: dict[str, list[str]] = {}
    for f in figures:
        tasks.setdefault(f.task, []).append(f"{f.metric} {f.value:.4f}")
    return " | ".join(f"{task} {' '.join(parts)}" for task, parts in tasks.items())


class ConsoleSink(Sink):
    """The log line every --log-interval steps (the loss averaged over them, per source over their tokens),
    the line of each skipped update, and the validation line with its cost."""

    def __init__(self, train_iters: int, seq_length: int, fp8: bool, timing_log_option: str = "minmax"):
        self.train_iters, self.seq_length, self.fp8 = train_iters, seq_length, fp8
        self.timing_log_option = timing_log_option
        self._reset()

    def _reset(self) -> None:
        self.steps, self.loss_sum, self.source_sums = 0, 0.0, {}

    def write_step(self, step: int, values: dict, context: dict) -> None:
        self.steps += 1
        self.loss_sum += values.get("lm loss", 0.0)
        for name in sources_in(values):
            sums = self.source_sums.setdefault(name, [0.0, 0.0])
            sums[0] += values[BY_SOURCE + name] * values[TOKENS_BY_SOURCE + name]
            sums[1] += values[TOKENS_BY_SOURCE + name]
        if "tokens-per-second" in values:  # a log step
            print(self._line(step, values, context), flush=True)
            timers = self._timers_line(values)
            if timers:
                print(timers, flush=True)
            self._reset()
        if context.get("skipped"):
            print(
                f"iteration {step}: {context['skipped']} (lm loss {values.get('lm loss')}): update skipped "
                f"({context['skipped_in_a_row']} in a row, {context['skipped_in_all']} in all)",
                flush=True,
            )

    def _line(self, step: int, values: dict, context: dict) -> str:
        by_source = " ".join(f"{n} {t / c:.4f}" for n, (t, c) in self.source_sums.items() if c)
        tflops = values.get("tflops-per-gpu")
        parts = [
            f"iteration {step:>7d}/{self.train_iters}",
            f"phase {context['phase']}" if context.get("phase") else None,
            f"consumed tokens {int(values['consumed-tokens']):,}",
            f"lm loss {self.loss_sum / self.steps:.6f}" if "lm loss" in values else None,
            f"by source {by_source}" if by_source else None,
            f"lr {values['learning-rate']:.4e}",
            f"grad norm {values['grad-norm']:.4f}" if "grad-norm" in values else None,
            f"params norm {values['params-norm']:.4f}" if "params-norm" in values else None,
            f"num zeros {int(values['num-zeros']):,}" if "num-zeros" in values else None,
            f"tokens/s {values['tokens-per-second']:,.0f}",
            f"step time {values['step-time-ms']:.1f} ms",
            f"ETA {format_duration(values['eta-seconds'])}",
            f"TFLOP/s/GPU {tflops:.1f}" if tflops is not None else None,
            mfu_text(tflops, self.fp8) if tflops is not None else None,
            memory_text(values),
        ]
        return " | ".join(p for p in parts if p)

    def _timers_line(self, values: dict) -> str | None:
        """Where a step's time went, by Megatron-Core's timers (--timing-log-level)."""
        names = [k[len(TIME) :] for k in values if k.startswith(TIME)]
        if not names:
            return None
        if self.timing_log_option == "max":
            parts = [f"{n} {values[TIME + n]:.1f}" for n in names]
            return "time per step (ms, slowest rank) | " + " | ".join(parts)
        parts = [f"{n} {values[TIME_MIN + n]:.1f}-{values[TIME + n]:.1f}" for n in names]
        return "time per step (ms, fastest-slowest rank) | " + " | ".join(parts)

    def write_figures(self, step: int, figures: list, context: dict) -> None:
        seconds, trained = context["seconds"], context["trained_seconds"]
        cost = f"{seconds:.1f} s ({100 * seconds / trained:.1f}% of the {trained:.1f} s trained since the last)"
        print(f"validation at iteration {step} | {format_figures(figures)} | {cost}", flush=True)


class ScalarSink(Sink):
    """A dashboard's scalars: every value under its name and each figure as eval/<task>/<metric>, with the
    evaluation's seconds. Counts and ids are not curves, and the fastest rank's time is on the log line only;
    the timers (the slowest rank's) only with --log-timers-to-tensorboard, the GPU memory figures only with
    --log-memory-to-tensorboard. TensorBoard and W&B receive the
    same scalars; a subclass says only how one is written."""

    def __init__(self, timers: bool = False, memory: bool = False):
        self.skipped = (TOKENS_BY_SOURCE, "data-hash", TIME_MIN) + (() if timers else (TIME,))
        self.skipped += () if memory else (MEMORY,)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        raise NotImplementedError

    def write_step(self, step: int, values: dict, context: dict) -> None:
        scalars = {name: value for name, value in values.items() if not name.startswith(self.skipped)}
        self.write_scalars(step, scalars)

    def write_figures(self, step: int, figures: list, context: dict) -> None:
        scalars = {f"eval/{f.task}/{f.metric}": f.value for f in figures}
        self.write_scalars(step, {**scalars, "eval/seconds": context["seconds"]})


class TensorBoardSink(ScalarSink):
    """--tensorboard-dir."""

    def __init__(self, directory: str, timers: bool = False, memory: bool = False):
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(timers, memory)
        self.writer = SummaryWriter(directory)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink(ScalarSink):
    """--wandb-project: the same scalars to Weights & Biases (WANDB_MODE=offline keeps them in the run
    directory under --wandb-save-dir, for `wandb sync` later). config: the run's resolved configuration."""

    def __init__(
        self,
        project: str,
        name: str | None,
        directory: str,
        config: dict,
        timers: bool = False,
        memory: bool = False,
        entity: str | None = None,
    ):
        import wandb

        super().__init__(timers, memory)
        os.makedirs(directory, exist_ok=True)
        self.run = wandb.init(project=project, entity=entity, name=name, dir=directory, config=config)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class JsonlSink(Sink):
    """--metrics-jsonl: one JSON object per step: iteration, lm_loss, grad_norm (null for a skipped update),
    lr; with phases also phase, source_losses and source_tokens (the sources present in the step); with
    --log-data-hash, data_hash; with --log-params-norm, params_norm at log steps; with --log-num-zeros-in-grad,
    num_zeros_in_grad; with --log-straggler, straggler (the ranks' spread) at log steps."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # as TensorBoard does
        self.file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write_step(self, step: int, values: dict, context: dict) -> None:
        record = {
            "iteration": step,
            "lm_loss": values.get("lm loss"),
            "grad_norm": values.get("grad-norm"),
            "lr": values["learning-rate"],
        }
        if context.get("phase"):
            sources = sources_in(values)
            record.update(
                phase=context["phase"],
                source_losses={n: values[BY_SOURCE + n] for n in sources},
                source_tokens={n: int(values[TOKENS_BY_SOURCE + n]) for n in sources},
            )
        if "data-hash" in values:
            record["data_hash"] = values["data-hash"]
        if "params-norm" in values:
            record["params_norm"] = values["params-norm"]
        if "num-zeros" in values:
            record["num_zeros_in_grad"] = int(values["num-zeros"])
        straggler = {k.removeprefix(STRAGGLER): v for k, v in values.items() if k.startswith(STRAGGLER)}
        if straggler:  # --log-straggler, at log steps
            record["straggler"] = straggler
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class EvalResultsSink(Sink):
    """eval_results.jsonl: one record per figure (evaluation/records.py, as tools/evaluate.py writes them)."""

    def __init__(self, path: str, run_name: str):
        self.path, self.run_name = path, run_name

    def write_figures(self, step: int, figures: list, context: dict) -> None:
        records = figure_records(
            figures,
            run=self.run_name,
            phase=context.get("phase"),
            iteration=step,
            tokens=context["tokens"],
            checkpoint=None,
            phase_start_tokens=context.get("phase_start_tokens"),
        )
        append_records(self.path, records)
