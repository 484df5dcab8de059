"""A swarm: mixtures drawn from a prior around a base phases file's blends, for a regression to fit
(RegMix's Dirichlet-sampled proxies, Olmix's swarm) instead of a grid of shares.

  swarm:
    phases: [1]                        # the phases whose blend varies (each drawn independently)
    sources: [text, code]              # the sources whose weights vary; the others keep their base weights
    concentration: 8                   # Dirichlet alpha = concentration x the base weights of those sources
    bounds: {code: [0.05, 0.9]}        # optional: each varied source's weight within [low, high]
    max_epochs: {code: 4}              # optional: how many times a run may read a source (Olmix's cap)
    runs: 20                           # mixtures
    seeds: [1, 2]                      # optional: training seeds, each mixture trained with each
    seed: 0                            # the sampler's seed: the same file gives the same mixtures

The varied sources share the weight they have together in the base phase (the fixed ones keep theirs); a
draw outside the bounds or over a cap is drawn again (rejection sampling, so the accepted draws follow the
prior restricted to the allowed region). Each run is a variant `mix<k>` (`mix<k>_seed<s>` with seeds) whose
override is the phase's whole blend; its mixture, the regression's inputs, is {"phases[i].<source>": weight}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from megatron_ext.sweeps.keys import check_keys

SWARM_KEYS = {"phases", "sources", "concentration", "bounds", "max_epochs", "runs", "seeds", "seed"}
_MAX_DRAWS = 100_000


class SwarmError(ValueError):
    """A bad swarm section; one line naming the sweep file and key."""


@dataclass(frozen=True)
class Swarm:
    phases: tuple[int, ...]
    sources: tuple[str, ...]
    concentration: float
    bounds: dict  # source -> (low, high)
    max_epochs: dict  # source -> cap
    runs: int
    seeds: tuple[int, ...]  # training seeds; () = the sweep's one
    seed: int

    def feature(self, phase: int, source: str) -> str:
        return f"phases[{phase}].{source}"

    @property
    def features(self) -> list[str]:
        return [self.feature(p, s) for p in self.phases for s in self.sources]


def parse(raw, base: dict, where: str) -> Swarm:
    if not isinstance(raw, dict):
        raise SwarmError(f"{where}: a mapping of {', '.join(sorted(SWARM_KEYS))}")
    check_keys(raw, SWARM_KEYS, ("phases", "sources", "runs"), where, SwarmError)
    phases = raw["phases"] if isinstance(raw["phases"], list) else [raw["phases"]]
    count = len(base.get("phases", []))
    if not phases or not all(isinstance(p, int) and 0 <= p < count for p in phases):
        raise SwarmError(f"{where}.phases: phase indices of the base file (it has {count} phases)")
    sources = raw["sources"]
    if not isinstance(sources, list) or len(sources) < 2 or len(set(sources)) != len(sources):
        raise SwarmError(f"{where}.sources: a list of at least two distinct sources")
    for p in phases:
        blend = base["phases"][p].get("blend", {})
        missing = [s for s in sources if s not in base.get("sources", {})]
        if missing:
            raise SwarmError(f"{where}.sources: {missing[0]!r} is not a source of the base file")
        if sum(float(blend.get(s, 0.0)) for s in sources) <= 0:
            raise SwarmError(f"{where}: phases[{p}] gives the varied sources no weight to share")
    concentration = float(raw.get("concentration", 1.0))
    if not concentration > 0:
        raise SwarmError(f"{where}.concentration: must be > 0")
    bounds = {}
    for source, pair in (raw.get("bounds") or {}).items():
        ok = source in sources and isinstance(pair, list) and len(pair) == 2
        if not ok or not 0 <= float(pair[0]) < float(pair[1]) <= 1:
            raise SwarmError(f"{where}.bounds.{source}: [low, high] with 0 <= low < high <= 1, of a varied source")
        bounds[source] = (float(pair[0]), float(pair[1]))
    caps = {}
    for source, cap in (raw.get("max_epochs") or {}).items():
        if source not in base.get("sources", {}) or not float(cap) > 0:
            raise SwarmError(f"{where}.max_epochs.{source}: a positive number, for a source of the base file")
        caps[source] = float(cap)
    runs = raw["runs"]
    if not isinstance(runs, int) or runs < 2:
        raise SwarmError(f"{where}.runs: an integer >= 2 (a regression needs several mixtures)")
    seeds = raw.get("seeds", [])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise SwarmError(f"{where}.seeds: a list of integers")
    seed = int(raw.get("seed", 0))
    return Swarm(tuple(phases), tuple(sources), concentration, bounds, caps, runs, tuple(seeds), seed)


def prior(swarm: Swarm, base: dict, phase: int) -> np.ndarray:
    """The Dirichlet's alpha for a phase: concentration x the varied sources' base weights, normalised (a
    source at 0 in the base gets a small share, 1% of the mass, so that it can be drawn at all)."""
    blend = base["phases"][phase].get("blend", {})
    weights = np.array([float(blend.get(s, 0.0)) for s in swarm.sources])
    weights = np.maximum(weights / weights.sum(), 0.01)
    return swarm.concentration * weights / weights.sum()


def draw(swarm: Swarm, base: dict, epochs_of=None) -> list[dict[str, float]]:
    """swarm.runs mixtures (feature -> weight of the varied sources, summing to 1 in each phase), reproducible
    from swarm.seed. epochs_of(mixture) -> {source: epochs} checks the caps (None: no caps to check)."""
    rng = np.random.default_rng(swarm.seed)
    alphas = {p: prior(swarm, base, p) for p in swarm.phases}
    mixtures, tries = [], 0
    while len(mixtures) < swarm.runs:
        tries += 1
        if tries > _MAX_DRAWS:
            raise SwarmError(
                f"swarm: {len(mixtures)} of {_MAX_DRAWS:,} draws fell within the bounds and epoch caps; "
                "widen them or raise the concentration"
            )
        mixture = {}
        for p in swarm.phases:
            for source, w in zip(swarm.sources, rng.dirichlet(alphas[p])):
                mixture[swarm.feature(p, source)] = float(w)
        if not _within_bounds(swarm, mixture):
            continue
        if swarm.max_epochs and epochs_of is not None:
            epochs = epochs_of(mixture)
            if any(epochs.get(s, 0.0) > cap for s, cap in swarm.max_epochs.items()):
                continue
        mixtures.append(mixture)
    return mixtures


def _within_bounds(swarm: Swarm, mixture: dict) -> bool:
    return all(
        low <= mixture[swarm.feature(p, s)] <= high for s, (low, high) in swarm.bounds.items() for p in swarm.phases
    )


def blend_of(swarm: Swarm, base: dict, phase: int, mixture: dict) -> dict[str, float]:
    """The phase's whole blend for a mixture: the fixed sources at their base weights, the varied ones
    sharing the rest by the mixture's weights (the base file's order)."""
    blend = {k: float(v) for k, v in base["phases"][phase].get("blend", {}).items()}
    total = sum(blend.values())
    blend = {k: v / total for k, v in blend.items()}
    shared = sum(blend.get(s, 0.0) for s in swarm.sources)
    out = {k: v for k, v in blend.items() if k not in swarm.sources}
    for s in swarm.sources:
        out[s] = shared * mixture[swarm.feature(phase, s)]
    order = [*blend, *(s for s in swarm.sources if s not in blend)]
    return {k: round(out[k], 6) for k in order if out.get(k, 0.0) > 0 or k in blend}


def variants(swarm: Swarm, base: dict, mixtures: list[dict]) -> list[tuple[str, dict, dict]]:
    """(name, overrides, mixture) per run: each mixture with each training seed."""
    width = max(3, len(str(len(mixtures) - 1)))
    out = []
    for k, mixture in enumerate(mixtures):
        overrides = {f"phases[{p}].blend": blend_of(swarm, base, p, mixture) for p in swarm.phases}
        for seed in swarm.seeds or (None,):
            name = f"mix{k:0{width}d}" + (f"_seed{seed}" if seed is not None else "")
            out.append((name, {**overrides, **({"seed": seed} if seed is not None else {})}, mixture))
    return out


def epochs(phases: dict, source_tokens: dict[str, int], seq: int, gbs: int) -> dict[str, float]:
    """How many times a run of these phases reads each source: its share of each phase's tokens over its size."""
    read: dict[str, float] = {}
    for phase in phases["phases"]:
        blend = {k: float(v) for k, v in phase.get("blend", {}).items()}
        total = sum(blend.values()) or 1.0
        tokens = int(phase["iters"]) * int(phase.get("global_batch_size", gbs)) * seq
        for source, w in blend.items():
            read[source] = read.get(source, 0.0) + tokens * w / total
    return {s: read.get(s, 0.0) / n for s, n in source_tokens.items() if n > 0}


def source_tokens(base: dict, names, seq: int) -> dict[str, int]:
    """The tokens of each named source of the base file: its indexed datasets' (from their .bin sizes, no scan),
    or an HDF5 source's samples x the sequence length."""
    from megatron_ext.data.hdf5_source import scan
    from megatron_ext.data.indexed_files import file_shape

    out = {}
    for name in names:
        source = base["sources"][name]
        if "hdf5" in source:
            out[name] = scan(list(source["hdf5"]), f"sources.{name}").total * seq
        else:
            out[name] = sum(file_shape(prefix)[1] for prefix in source["prefixes"])
        out[name] = math.floor(out[name] * float(source.get("subset", 1.0)))
    return out
