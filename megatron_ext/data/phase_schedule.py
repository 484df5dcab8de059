"""Which source every global sample comes from, phase by phase, and each source's read position.

Within a phase, samples are assigned by Megatron-Core's blending rule (helpers.build_blending_indices):
sample i goes to the source with the largest error weight x max(i, 1) - count, the first on ties. Each
source's realised count therefore stays within one sample of weight x samples. The rule is run here
incrementally from its state (i, counts) rather than as Megatron's whole-array helper, whose arrays for a
phase of Crystal's size (452M samples) would take gigabytes; the tests hold the two to the same output.

A source's position (the number of its samples consumed) carries over from phase to phase, so a source
used again continues where it stopped. The state (phase, sample within the phase, the rule's counts, every
source's position) is a few integers, saved in each checkpoint: resuming continues the same stream.

A phase with `order: cerebras` (HDF5 sources) takes Cerebras's Mixture order instead (data/cerebras_order.py):
its samples are a function of the sample within the phase alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_ext.data.phases_config import PhasesConfig, PhasesConfigError


@dataclass(frozen=True)
class SampleRef:
    """One training sample: the phase, the source (index into the config's sources) and the source's
    sample number."""

    phase: int
    source: int
    index: int


@dataclass
class ScheduleState:
    phase: int = 0
    phase_sample: int = 0  # samples of the current phase already assigned
    segment_start: int = 0  # where the blending rule (re)started inside the phase
    counts: list[int] = field(default_factory=list)  # the rule's per-source counts since segment_start
    positions: dict[str, int] = field(default_factory=dict)  # per source name
    realised: list[dict[str, int]] = field(default_factory=list)  # per phase, per source name
    fingerprint: str = ""


class PhaseSchedule:
    def __init__(self, config: PhasesConfig, state: ScheduleState | None = None):
        self.config = config
        self.names = config.source_names
        self.state = state or self._fresh()

    def _fresh(self) -> ScheduleState:
        return ScheduleState(
            counts=[0] * len(self.names),
            positions={n: 0 for n in self.names},
            realised=[{} for _ in self.config.phases],
            fingerprint=self.config.fingerprint(),
        )

    @property
    def phase(self):
        return self.config.phases[self.state.phase]

    @property
    def finished(self) -> bool:
        return self.state.phase >= len(self.config.phases)

    def _weights(self) -> list[float]:
        return [self.phase.blend.get(n, 0.0) for n in self.names]

    def next(self) -> SampleRef:
        s = self.state
        if s.phase_sample == self.phase.samples:
            s.phase, s.phase_sample, s.segment_start, s.counts = s.phase + 1, 0, 0, [0] * len(self.names)
        if self.finished:
            raise StopIteration("the phases file's last phase is over")
        if self.phase.order == "cerebras":
            source, index = self._cerebras_next()
        else:
            i = max(s.phase_sample - s.segment_start, 1)
            errors = [w * i - c if w > 0 else float("-inf") for w, c in zip(self._weights(), s.counts)]
            source = max(range(len(errors)), key=errors.__getitem__)
            index = s.positions[self.names[source]]
        name = self.names[source]
        ref = SampleRef(s.phase, source, index)
        s.counts[source] += 1
        s.positions[name] += 1
        realised = s.realised[s.phase]
        realised[name] = realised.get(name, 0) + 1
        s.phase_sample += 1
        return ref

    def _cerebras_mixture(self):
        """The phase's Cerebras mixture and the positions of an epoch that are read (whole global batches)."""
        from megatron_ext.data.cerebras_order import mixture

        phase, sources = self.phase, self.config.sources
        mix = mixture(tuple(sources[n].samples for n in phase.blend), tuple(phase.blend.values()), phase.order_seed)
        per_epoch = len(mix) // phase.global_batch_size * phase.global_batch_size
        if per_epoch == 0:
            raise PhasesConfigError(
                f"{self.config.path}: phase {phase.name!r}: its Cerebras mixture holds {len(mix)} samples, fewer "
                f"than one global batch of {phase.global_batch_size}"
            )
        return mix, per_epoch

    def _cerebras_next(self) -> tuple[int, int]:
        """(source, its sample) at the phase's next position in Cerebras's order (data/cerebras_order.py)."""
        mix, per_epoch = self._cerebras_mixture()
        source, index = mix.at(self.state.phase_sample % per_epoch)
        return self.names.index(list(self.phase.blend)[source]), index

    def _cerebras_skip(self, n: int) -> None:
        """The state after n more samples of a Cerebras-ordered phase, as n calls of next() leave it."""
        mix, per_epoch = self._cerebras_mixture()
        s, first = self.state, self.state.phase_sample
        epochs, start = divmod(first, per_epoch)
        end_epochs, stop = divmod(first + n, per_epoch)
        counts = (end_epochs - epochs) * mix.source_counts(0, per_epoch) - mix.source_counts(0, start)
        counts += mix.source_counts(0, stop)
        realised = s.realised[s.phase]
        for name, count in zip(self.phase.blend, counts.tolist()):
            source = self.names.index(name)
            s.counts[source] += count
            s.positions[name] += count
            if count:
                realised[name] = realised.get(name, 0) + count
        s.phase_sample += n

    def advance_to(self, phase: int, step: int) -> None:
        """The state at the start of step `step` (0-based) of phase `phase`, from the current state: what an
        uninterrupted run's schedule holds there. A Cerebras-ordered phase is jumped over in one pass over its
        mixture; a blended one is replayed sample by sample (about a microsecond each)."""
        s = self.state
        target = step * self.config.phases[phase].global_batch_size
        while (s.phase, s.phase_sample) < (phase, target):
            if s.phase_sample == self.phase.samples:  # the switch next() makes
                s.phase, s.phase_sample, s.segment_start, s.counts = s.phase + 1, 0, 0, [0] * len(self.names)
                continue
            n = (target if s.phase == phase else self.phase.samples) - s.phase_sample
            if self.phase.order == "cerebras":
                self._cerebras_skip(n)
            else:
                self.take(n)

    def take(self, n: int) -> list[SampleRef]:
        return [self.next() for _ in range(n)]

    def at_phase_end(self) -> bool:
        return self.state.phase_sample == self.phase.samples

    # --- checkpoints -------------------------------------------------------------------------------
    def next_step_phase(self) -> int:
        """The phase of the step that starts at this state: the next one when the current phase is done
        (the last phase once all are)."""
        index = self.state.phase + (1 if self.at_phase_end() else 0)
        return min(index, len(self.config.phases) - 1)

    def next_step_batch_size(self) -> int:
        return self.config.phases[self.next_step_phase()].global_batch_size

    def state_dict(self) -> dict:
        s = self.state
        return {
            "phase": s.phase,
            "phase_sample": s.phase_sample,
            "segment_start": s.segment_start,
            "counts": list(s.counts),
            "positions": dict(s.positions),
            "realised": [dict(r) for r in s.realised],
            "fingerprint": s.fingerprint,
            "sources": list(self.names),
        }

    @classmethod
    def from_state_dict(
        cls, config: PhasesConfig, saved: dict, global_sample: int
    ) -> tuple["PhaseSchedule", str | None]:
        """The schedule at a checkpoint. With the same phases file the stream continues exactly. With an
        edited one, the phase is found anew from the global sample count, the blending rule restarts
        there with the new weights, and every source keeps its saved position (nothing is repeated or
        skipped). Returns (schedule, a note of what changed or None)."""
        schedule = cls(config)
        if saved["fingerprint"] == config.fingerprint() and saved["sources"] == schedule.names:
            schedule.state = ScheduleState(
                saved["phase"],
                saved["phase_sample"],
                saved["segment_start"],
                list(saved["counts"]),
                dict(saved["positions"]),
                [dict(r) for r in saved["realised"]],
                saved["fingerprint"],
            )
            return schedule, None
        s = schedule.state
        remaining = global_sample
        while s.phase < len(config.phases) and remaining >= config.phases[s.phase].samples:
            remaining -= config.phases[s.phase].samples
            s.phase += 1
        if s.phase < len(config.phases) and remaining % config.phases[s.phase].global_batch_size:
            phase = config.phases[s.phase]
            raise PhasesConfigError(
                f"{config.path}: phases[{s.phase}] ({phase.name!r}).global_batch_size {phase.global_batch_size}: the "
                f"checkpoint stands at sample {remaining} of this phase, not a whole number of its batches; keep "
                "the batch size of the phase in progress (edit later phases), or resume from a checkpoint at a "
                "step boundary of the new size"
            )
        s.phase_sample = s.segment_start = remaining
        s.positions.update({n: p for n, p in saved["positions"].items() if n in s.positions})
        note = (
            f"the phases file changed since this checkpoint: continuing in phase "
            f"{config.phases[s.phase].name if s.phase < len(config.phases) else '(none left)'} at its sample "
            f"{remaining} with the new weights; sources keep their positions {dict(s.positions)}"
        )
        return schedule, note
