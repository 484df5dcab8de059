"""What the training loop asks of its data, for both kinds of run:
- BlendFeed: --data-path / --mock-data, Megatron-Core's GPTDataset (one blend, one batch size);
- PhaseFeed: --phases, the phase schedule over per-source streams (phase switches inside the run,
  per-phase batch size and lr, per-source positions and bookkeeping in the checkpoint).
Both keep Megatron's sample order, so the samples of a step do not depend on the parallel layout.
Only the reading ranks (training/readers.py) build datasets; on the others a feed keeps the step
count, the phase schedule and the checkpointed state, which need no data.
"""

from __future__ import annotations

import json
from typing import Protocol, runtime_checkable

from megatron_ext.data.phased_dataset import ROW_COUNTS
from megatron_ext.data.run_transforms import OUTCOMES
from megatron_ext.training.batches import datasets, readers
from megatron_ext.training.run_config import RunConfig


@runtime_checkable
class DataFeed(Protocol):
    """What the trainer, the loop and the callbacks ask of a run's data, whichever kind. A checkpoint
    stores it by name ("data") through state_dict / load_state_dict."""

    consumed_samples: int
    source_names: list[str]  # sources with their own loss (empty for a plain blend)
    phase_name: str | None
    resume_note: str | None  # what changed since the checkpoint, when a resume could not be exact
    reads: bool  # this rank built the datasets (a reading rank)

    def step_batch_size(self) -> int: ...
    def step_phase(self) -> int | None: ...
    def step_in_phase(self) -> int:
        """Steps of the current phase already taken (0 at its start, and always without phases)."""

    @property
    def phase(self):
        """The current phase's PhaseSpec (None without phases): its lr schedule, blend and FIM."""

    def train_batches(self, steps: int):
        """This data-parallel rank's micro-batches of the next `steps` steps (on a reading rank)."""

    def validation_set(self):
        """The held-out samples every evaluation scores (evaluation/validation.py), built once; on every
        rank the same number of batches, data only on the reading ranks."""

    def advance(self) -> None: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict | None) -> None: ...
    def bookkeeping_json(self, iteration: int) -> str | None: ...
    def scalars(self) -> dict[str, float]: ...


class BlendFeed:
    phase_name = phase = None
    source_names: list[str] = []

    def scalars(self) -> dict[str, float]:
        return {}

    def __init__(self, run: RunConfig):
        self.run = run
        self.train, self.valid = datasets.build_datasets(run, readers.is_reader())
        self.reads = self.train is not None
        self.consumed_samples = 0
        self._validation = None  # built at the first evaluation

    def step_batch_size(self) -> int:
        return self.run.optimizer.global_batch_size

    def step_phase(self) -> int | None:
        return None

    def step_in_phase(self) -> int:
        return 0

    def train_batches(self, steps: int):
        return datasets.micro_batches(self.train, self.consumed_samples, self.run)

    def validation_set(self):
        """The first --eval-iters batches of Megatron's validation split, the same at every evaluation
        (Megatron-LM reads on through the split, so two evaluations score different samples)."""
        if self._validation is None:
            from megatron_ext.evaluation.validation import BlendValidation

            run = self.run
            local = None
            if self.reads:
                table = _byte_table(run)
                local = BlendValidation(self.valid, run.eval.eval_iters, self.step_batch_size(), table)
            self._validation = readers.everywhere(local)
        return self._validation

    def advance(self) -> None:
        self.consumed_samples += self.step_batch_size()

    resume_note = None

    def state_dict(self) -> dict:
        """Megatron's datasets resume from the consumed sample count alone."""
        return {"consumed_samples": self.consumed_samples, "schedule": None}

    def load_state_dict(self, state: dict | None) -> None:
        self.consumed_samples = state["consumed_samples"] if state else 0

    def bookkeeping_json(self, iteration: int) -> str | None:
        """A plain blend keeps no per-source books: Megatron's datasets know only consumed samples."""
        return None


class PhaseFeed:
    def __init__(self, run: RunConfig):
        from megatron_ext.data.phase_schedule import PhaseSchedule

        self.run, self.config = run, run.data.phases_config
        built = readers.build_on_readers(lambda: datasets.build_phased_datasets(run))
        self.train, self.valid = built or (None, None)
        self.reads = built is not None
        self.schedule = PhaseSchedule(self.config)
        self.source_names = self.config.source_names
        self.consumed_samples = 0
        self.resume_note: str | None = None
        self._validation = None  # built at the first evaluation
        # Per source, phased_dataset.ROW_COUNTS (Trainer adds each step's).
        self.row_counts = {name: [0] * len(ROW_COUNTS) for name in self.source_names}
        self.row_counts_since: int | None = None  # set when resumed from a checkpoint that had no counts

    def add_row_counts(self, counts) -> None:
        """counts: [sources, ROW_COUNTS], one step's over all ranks."""
        for name, row in zip(self.source_names, counts.tolist()):
            self.row_counts[name] = [a + b for a, b in zip(self.row_counts[name], row)]

    def step_phase(self) -> int:
        """The phase of the step about to run (the last phase once all are done)."""
        return self.schedule.next_step_phase()

    @property
    def phase_name(self) -> str:
        return self.config.phases[self.step_phase()].name

    def step_in_phase(self) -> int:
        if self.schedule.at_phase_end():
            return 0
        return self.schedule.state.phase_sample // self.schedule.phase.global_batch_size

    @property
    def phase(self):
        return self.config.phases[self.step_phase()]

    def step_batch_size(self) -> int:
        return self.schedule.next_step_batch_size()

    def train_batches(self, steps: int):
        self.train.open_epochs(self.schedule.state.positions)
        return datasets.phased_micro_batches(self.train, self.schedule, steps, self.run)

    def validation_set(self):
        """Every source on the same held-out samples at every evaluation, in batches of the run's first
        global batch size (the layout accepts it)."""
        if self._validation is None:
            from megatron_ext.evaluation.validation import PhasesValidation

            run = self.run
            n, batch = run.eval.eval_samples_per_source, run.optimizer.global_batch_size
            local = PhasesValidation(self.valid, n, batch, _byte_table(run)) if self.valid is not None else None
            self._validation = readers.everywhere(local)
        return self._validation

    def advance(self) -> None:
        """After a step. This schedule is the run's record (checkpoints, phase switches); the samplers
        walk copies of it, ahead of training by the DataLoader's prefetch."""
        gbs = self.step_batch_size()
        self.schedule.take(gbs)
        self.consumed_samples += gbs

    def state_dict(self) -> dict:
        schedule = self.schedule.state_dict()
        return {"consumed_samples": self.consumed_samples, "schedule": schedule, "row_counts": self.row_counts}

    def start_at(self, phase: int, step: int) -> str:
        """--phases-start: the stream as an uninterrupted run holds it after `step` steps of phase `phase`. The
        lr follows from the data position in the phase (resume_note set: phase_lr.enter_phase)."""
        self.schedule.advance_to(phase, step)
        self.consumed_samples = sum(p.samples for p in self.config.phases[:phase]) + step * self.phase.global_batch_size
        name = self.config.phases[phase].name
        self.resume_note = f"started at phase {name} after its step {step} (--phases-start)"
        return self.resume_note

    def load_state_dict(self, state: dict | None) -> None:
        """The saved stream; resume_note says what changed when the phases file was edited since."""
        from megatron_ext.data.phase_schedule import PhaseSchedule

        self.consumed_samples = state["consumed_samples"] if state else 0
        if not state or state["schedule"] is None:  # a blend's checkpoint: the phases start from the top
            return
        # A checkpoint from before the counts: they count from this resume on (data_state.json says so).
        saved = state.get("row_counts") or {}
        self.row_counts_since = None if "row_counts" in state else self.consumed_samples
        for name in self.source_names:
            if name in saved:
                self.row_counts[name] = list(saved[name])
        self.schedule, self.resume_note = PhaseSchedule.from_state_dict(
            self.config, state["schedule"], self.consumed_samples
        )

    def bookkeeping(self, iteration: int) -> dict:
        """Per source: samples, tokens, documents and epochs consumed; per phase: the realised mixture."""
        state = self.schedule.state
        sources = {
            stream.spec.name: stream.consumed(state.positions[stream.spec.name]) for stream in self.train.streams
        }
        for name, used in sources.items():  # the runs FIM or span corruption chose (data/run_transforms.py)
            counts = dict(zip(ROW_COUNTS, self.row_counts[name]))
            used["rewritten_runs"] = {k: counts[k] for k in OUTCOMES}
            if self.config.sources[name].is_hdf5:
                used.update({k: counts[k] for k in ROW_COUNTS[len(OUTCOMES) :]})
            if self.row_counts_since is not None:
                used["rewritten_runs"]["counted_from_sample"] = self.row_counts_since
        files: dict[str, dict] = {}  # over all sources: a file two sources read counts both
        for name, used in sources.items():
            for prefix, documents in used["documents_per_file"].items():
                entry = files.setdefault(prefix, {"documents_read": 0, "sources": []})
                entry["documents_read"] += documents
                entry["sources"].append(name)
        mixture = {}
        for phase, counts in zip(self.config.phases, state.realised):
            total = sum(counts.values())
            if total:
                mixture[phase.name] = {
                    "samples": total,
                    "share": {n: c / total for n, c in counts.items()},
                    "target": phase.blend,
                }
        return {
            "iteration": iteration,
            "consumed_samples": self.consumed_samples,
            "phase": self.phase_name,
            "phases_file": self.config.path,
            "seed": self.config.seed,
            "sources": sources,
            "files": files,
            "realised_mixture": mixture,
            "schedule": self.schedule.state_dict(),
        }

    def scalars(self) -> dict[str, float]:
        """For TensorBoard: the phase, each source's tokens and epochs read, the current phase's mixture."""
        state = self.schedule.state
        out = {"data/phase": float(self.step_phase())}
        for stream in self.train.streams:
            used = stream.consumed(state.positions[stream.spec.name])
            out[f"data/tokens/{stream.spec.name}"] = float(used["tokens"])
            out[f"data/epochs/{stream.spec.name}"] = used["epochs"]
        counts = state.realised[state.phase] if state.phase < len(state.realised) else {}
        total = sum(counts.values())
        out.update({f"data/mixture/{name}": c / total for name, c in counts.items() if total})
        return out

    def bookkeeping_json(self, iteration: int) -> str:
        return json.dumps(self.bookkeeping(iteration), indent=2)


def _byte_table(run: RunConfig):
    """Token -> UTF-8 bytes of the run's tokenizer (None without one: no bits per byte)."""
    from megatron_ext.evaluation.token_bytes import token_bytes

    return token_bytes(run.data.tokenizer, run.model.padded_vocab) if run.data.tokenizer else None


def build(run: RunConfig) -> DataFeed:
    if not run.data.phases_config:
        return BlendFeed(run)
    from megatron_ext.data.phases_config import overlapping_sources
    from megatron_ext.training.distributed import print_rank_0

    for line in overlapping_sources(run.data.phases_config):
        print_rank_0(f"warning: {line}")
    return PhaseFeed(run)
