"""A sweep file and the runs it stands for.

  name: code_share                       # the sweep's directory: <output>/<name>
  base: examples/phases/demo.yaml        # the phases file every run derives from
  seq_length: 256                        # of the runs (token budgets, the phases files' checks)
  global_batch_size: 8                   # for phases that give none (as pretrain_crystal.py's flag)
  tokens: 614400                         # optional: every run's phase lengths scaled to this budget
  axes:                                  # the cross product of these values (or `variants:` below)
    phases[1].blend.code: [0.0, 0.25, 0.5, 0.75, 1.0]   # the other sources rescaled to 1 - value
    seed: [1, 2]
  variants:                              # instead of axes: named runs, each a map of the same overrides
    text_only: {phases[1].blend: {text: 1.0}}
  swarm: {phases: [1], sources: [text, code], concentration: 8, runs: 20}   # or: mixtures from a prior (swarm.py)
  train: [--model, crystal-tiny, --tokenizer-model, data/demo/crystal_demo.model, ...]
  nproc: 2                               # processes per run on this machine
  eval_interval: 100                     # in-loop evaluation of every run
  eval_tasks: humaneval_gold:32          # in-loop tasks (pretrain_crystal.py --eval-tasks)
  end_tasks: arc_easy:100,infill_single:100   # tools/evaluate.py on each run's final checkpoint
  slurm: {nodes: 1, gpus_per_node: 8, time: "24:00:00", model: crystal-1b, tp: 1, pp: 1, micro_batch: 4}

An override path is `seed`, `validation_fraction`, or `phases[i].` followed by `blend.<source>` (a share:
the phase's other sources are rescaled to keep their proportions and sum to 1), `blend` (a whole mapping),
`fim.<source>.fim_rate` / `fim.<source>.fim_spm_rate`, `iters`, `global_batch_size`, or `lr.<key>`.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from functools import partial

import yaml

from megatron_ext.atomic_files import write_text_atomically
from megatron_ext.sweeps import swarm as swarms
from megatron_ext.sweeps.keys import check_keys
from megatron_ext.sweeps.swarm import Swarm
from megatron_ext.training.run_config import OptimizerSection, default_of

SWEEP_KEYS = {"name", "base", "seq_length", "global_batch_size", "tokens", "axes", "variants", "swarm", "train",
              "nproc", "eval_interval", "eval_tasks", "end_tasks", "slurm", "seed"}  # fmt: skip
_PHASE = re.compile(r"^phases\[(\d+)\]$")


class SweepError(ValueError):
    """A bad sweep file; the message is one line naming the file and key."""


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict  # path -> value
    phases: dict  # the derived phases file's content
    tokens: int  # its token budget (all phases)
    mixture: dict = field(default_factory=dict)  # a swarm's run: feature ("phases[i].<source>") -> weight


@dataclass(frozen=True)
class Sweep:
    path: str
    name: str
    base: str
    directory: str
    seq_length: int
    global_batch_size: int
    seed: int
    variants: list[Variant]
    axes: dict = field(default_factory=dict)  # path -> values (empty with explicit variants)
    train: list[str] = field(default_factory=list)
    nproc: int = 1
    eval_interval: int | None = None
    eval_tasks: str | None = None
    end_tasks: str | None = None
    slurm: dict = field(default_factory=dict)
    swarm: Swarm | None = None

    def variant_dir(self, variant: Variant) -> str:
        return os.path.join(self.directory, variant.name)

    def phases_file(self, variant: Variant) -> str:
        return os.path.join(self.variant_dir(variant), "phases.yaml")


def load_sweep(path: str, output_root: str = "runs/sweeps") -> Sweep:
    from megatron_ext.data.phases_config import read_yaml_mapping

    raw = read_yaml_mapping(path, SweepError, f"{path}: no such sweep file")
    check_keys(raw, SWEEP_KEYS, ("name", "base", "seq_length"), path, SweepError)
    if sum(k in raw for k in ("axes", "variants", "swarm")) != 1:
        raise SweepError(
            f"{path}: give exactly one of 'axes' (a cross product), 'variants' (named runs) and 'swarm' (mixtures "
            "drawn from a prior)"
        )
    base = raw["base"] if os.path.isabs(raw["base"]) else os.path.normpath(raw["base"])
    base_phases = read_yaml_mapping(base, SweepError, f"{path}: base {base}: no such phases file")
    seq, gbs = (
        int(raw["seq_length"]),
        int(raw.get("global_batch_size", default_of(OptimizerSection, "global_batch_size"))),
    )
    budget = raw.get("tokens")
    named: list[tuple[str, dict]] = []
    mixtures: dict[str, dict] = {}
    axes = raw.get("axes") or {}
    swarm = None
    if "swarm" in raw:
        try:
            swarm = swarms.parse(raw["swarm"], base_phases, f"{path}: swarm")
            derive = partial(_derived, base_phases, seq=seq, gbs=gbs, budget=budget, where=path)
            drawn = swarms.draw(swarm, base_phases, _epochs_of(swarm, base_phases, derive, seq, gbs, path))
        except swarms.SwarmError as e:
            raise SweepError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
        for name, overrides, mixture in swarms.variants(swarm, base_phases, drawn):
            named.append((name, overrides))
            mixtures[name] = mixture
    elif axes:
        for axis, values in axes.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{path}: axes.{axis}: expected a non-empty list of values")
        for combo in itertools.product(*axes.values()):
            overrides = dict(zip(axes, combo))
            named.append(("_".join(_short(p, v, axes[p]) for p, v in overrides.items()), overrides))
    else:
        if not isinstance(raw["variants"], dict) or not raw["variants"]:
            raise SweepError(f"{path}: variants: expected a mapping of run names to overrides")
        named = [(str(n), dict(o or {})) for n, o in raw["variants"].items()]
    variants = []
    for name, overrides in named:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise SweepError(f"{path}: variant name {name!r}: letters, digits and _.+- only")
        phases = _derived(base_phases, overrides, seq, gbs, budget, f"{path}: {name}")
        variants.append(Variant(name, overrides, phases, _tokens(phases, seq, gbs), mixtures.get(name, {})))
    if len({v.name for v in variants}) != len(variants):
        raise SweepError(f"{path}: two variants share a name")
    return Sweep(
        path=path,
        name=str(raw["name"]),
        base=base,
        directory=os.path.join(output_root, str(raw["name"])),
        seq_length=seq,
        global_batch_size=gbs,
        seed=int(raw.get("seed", default_of(OptimizerSection, "seed"))),
        variants=variants,
        axes=axes,
        train=[str(a) for a in raw.get("train", [])],
        nproc=int(raw.get("nproc", 1)),
        eval_interval=raw.get("eval_interval"),
        eval_tasks=raw.get("eval_tasks"),
        end_tasks=raw.get("end_tasks"),
        slurm=dict(raw.get("slurm") or {}),
        swarm=swarm,
    )


def _derived(base_phases: dict, overrides: dict, seq: int, gbs: int, budget, where: str) -> dict:
    """The base phases with a variant's overrides, in iterations, scaled to the token budget."""
    phases = copy.deepcopy(base_phases)
    for key, value in overrides.items():
        _apply(phases, key, value, f"{where}: {key}")
    _to_iters(phases, seq, gbs)
    if budget is not None:
        _scale_to_tokens(phases, int(budget), seq, gbs, where)
    return phases


def _epochs_of(swarm: Swarm, base_phases: dict, derive, seq: int, gbs: int, path: str):
    """For a swarm with epoch caps: mixture -> {source: epochs its run reads}, from the sources' sizes."""
    if not swarm.max_epochs:
        return None
    try:
        sizes = swarms.source_tokens(base_phases, swarm.max_epochs, seq)
    except (OSError, ValueError) as e:
        raise SweepError(f"{path}: swarm.max_epochs: cannot read the sources' sizes: {e}") from None

    def epochs_of(mixture: dict) -> dict:
        overrides = {f"phases[{p}].blend": swarms.blend_of(swarm, base_phases, p, mixture) for p in swarm.phases}
        return swarms.epochs(derive(overrides), sizes, seq, gbs)

    return epochs_of


def _short(path: str, value, values: list) -> str:
    """A stable name part: the path's last word and the value (a mapping: its position in the axis)."""
    word = path.split(".")[-1]
    if isinstance(value, dict):
        return f"{word}{values.index(value)}"
    if isinstance(value, float):
        value = f"{value:g}"
    return f"{word}{value}"


def _apply(phases: dict, path: str, value, where: str) -> None:
    parts = path.split(".")
    if parts[0] in ("seed", "validation_fraction") and len(parts) == 1:
        phases[parts[0]] = value
        return
    match = _PHASE.match(parts[0])
    if not match or len(parts) < 2:
        raise SweepError(f"{where}: not an override path (seed, validation_fraction, phases[i].<key>...)")
    index = int(match.group(1))
    if index >= len(phases.get("phases", [])):
        raise SweepError(f"{where}: the base file has {len(phases.get('phases', []))} phases")
    phase = phases["phases"][index]
    key, rest = parts[1], parts[2:]
    if key == "blend" and len(rest) == 1:
        _set_share(phase, rest[0], float(value), where)
    elif key == "blend" and not rest:
        if not isinstance(value, dict):
            raise SweepError(f"{where}: a whole blend is a mapping of sources to weights")
        phase["blend"] = dict(value)
    elif key == "fim" and len(rest) == 2 and rest[1] in ("fim_rate", "fim_spm_rate"):
        phase.setdefault("fim", {}).setdefault(rest[0], {})[rest[1]] = value
    elif key == "span_corruption" and len(rest) == 2 and rest[1] in ("rate", "max_spans", "max_ratio"):
        phase.setdefault("span_corruption", {}).setdefault(rest[0], {})[rest[1]] = value
    elif key in ("iters", "global_batch_size") and not rest:
        phase.pop("tokens", None)
        phase[key] = value
    elif key == "lr" and len(rest) == 1:
        phase.setdefault("lr", {})[rest[0]] = value
    else:
        raise SweepError(f"{where}: cannot override phases[{index}].{'.'.join(parts[1:])}")


def _set_share(phase: dict, source: str, share: float, where: str) -> None:
    if not 0.0 <= share <= 1.0:
        raise SweepError(f"{where}: a share must lie in [0, 1]")
    blend = {k: float(v) for k, v in phase.get("blend", {}).items()}
    others = {k: v for k, v in blend.items() if k != source}
    rest = sum(others.values())
    if share < 1.0 and rest <= 0:
        raise SweepError(f"{where}: no other source in the blend to take the remaining {1 - share:g}")
    new = {k: v * (1.0 - share) / rest for k, v in others.items()} if rest > 0 else {}
    new[source] = share
    phase["blend"] = {k: new[k] for k in [*blend, source] if k in new}  # the base file's order, then the new one


def _to_iters(phases: dict, seq: int, gbs: int) -> None:
    for phase in phases["phases"]:
        if "tokens" in phase:
            phase["iters"] = math.ceil(float(phase.pop("tokens")) / (phase.get("global_batch_size", gbs) * seq))


def _tokens(phases: dict, seq: int, gbs: int) -> int:
    return sum(int(p["iters"]) * int(p.get("global_batch_size", gbs)) * seq for p in phases["phases"])


def _scale_to_tokens(phases: dict, budget: int, seq: int, gbs: int, where: str) -> None:
    """Phase lengths (and their lr warmup and decay lengths) scaled in proportion; the last phase takes
    the rounding, so every variant reads the budget to within one step of its last phase."""
    total = _tokens(phases, seq, gbs)
    factor = budget / total
    done = 0
    for i, phase in enumerate(phases["phases"]):
        step = int(phase.get("global_batch_size", gbs)) * seq
        old = int(phase["iters"])
        new = max(1, round(old * factor)) if i < len(phases["phases"]) - 1 else max(1, round((budget - done) / step))
        phase["iters"] = new
        done += new * step
        lr = phase.get("lr", {})
        for key in ("warmup_iters", "decay_iters"):
            if key in lr:
                lr[key] = max(1 if lr[key] else 0, round(lr[key] * new / old))
    if abs(done - budget) > max(int(p.get("global_batch_size", gbs)) * seq for p in phases["phases"]):
        raise SweepError(f"{where}: cannot meet the token budget {budget} in whole steps")


def write_phases_files(sweep: Sweep, tokenizer=None, check: bool = True) -> list[str]:
    """Each variant's phases file (atomically), checked like any phases file (check=False: not here, e.g.
    a SLURM script previewed away from the cluster's corpus); returns their paths."""
    from megatron_ext.data.fim import FimTokenIds
    from megatron_ext.data.phases_config import PhasesConfigError, load_phases
    from megatron_ext.data.span_corruption import sentinel_count

    has_fim = tokenizer is not None and FimTokenIds.of(tokenizer) is not None
    sentinels = sentinel_count(tokenizer)
    paths = []
    for variant in sweep.variants:
        path = sweep.phases_file(variant)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        phases = copy.deepcopy(variant.phases)
        _absolute_prefixes(phases)
        text = f"# {variant.name}: {sweep.base} with {variant.overrides} (tools/sweep.py, {sweep.path})\n"
        text += yaml.safe_dump(phases, sort_keys=False)
        write_text_atomically(path, text)
        try:
            if check:
                load_phases(path, sweep.seq_length, sweep.global_batch_size, sweep.seed, has_fim, sentinels)
        except PhasesConfigError as e:
            raise SweepError(f"{variant.name}: {e}") from None
        paths.append(path)
    return paths


def _absolute_prefixes(phases: dict) -> None:
    """Relative prefixes (and HDF5 directories) stay as the base file means them (relative to the working
    directory, as pretrain_crystal.py reads them): made absolute, the derived file works from its own
    directory. ${VAR} paths are left for the run to expand."""
    for source in phases.get("sources", {}).values():
        for key in ("prefixes", "hdf5"):
            if key in source:
                source[key] = [p if os.path.isabs(p) or p.startswith("$") else os.path.abspath(p) for p in source[key]]
