"""The phases file (--phases): data sources, and the ordered training phases over them.

  seed: 1234                     # optional (default --seed): shuffles, subsets, FIM draws
  validation_fraction: 0.01      # optional: documents of every source held out for --eval-interval
  sources:
    text: {prefixes: [data/text_document], subset: 1.0, max_epochs: 2}
    code: {prefixes: [data/py_document, data/js_document]}
  phases:
    - name: warmup-text
      iters: 1000                # or tokens: 4.3e9 (rounded up to whole steps)
      global_batch_size: 2112    # optional (default --global-batch-size)
      blend: {text: 1.0}
      fim: {}                    # source -> {fim_rate, fim_spm_rate}
      span_corruption: {}        # source -> {rate, max_spans, max_ratio} (CodeGen2's; not with FIM)
      lr: {warmup_iters: 86, peak: 0.012, min: 1.2408e-4, decay_style: linear, decay_iters: 294423}

Everything is checked when the file is loaded, before any model or data is built; errors name the file
and the key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, field

import yaml

from megatron_ext.data.indexed_files import file_shape

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


class PhasesConfigError(ValueError):
    pass


@dataclass(frozen=True)
class SourceSpec:
    name: str
    prefixes: tuple[str, ...]  # indexed datasets (empty for an HDF5 source)
    subset: float = 1.0
    max_epochs: int | None = None
    hdf5: tuple[str, ...] = ()  # directories of ready samples (data/hdf5_source.py)
    data_subset: tuple[tuple[float, float], ...] | None = None  # Cerebras's fraction ranges of an HDF5 source
    hdf5_files: object = None  # hdf5_source.Hdf5Files: the files in reading order, scanned at load

    @property
    def is_hdf5(self) -> bool:
        return bool(self.hdf5)

    @functools.cached_property  # asked for at every sample of a Cerebras-ordered phase (phase_schedule.py)
    def samples(self) -> int:
        """An HDF5 source's samples after data_subset (what Cerebras's Mixture takes as its length)."""
        from megatron_ext.data.hdf5_source import subset_rows

        kept = subset_rows(self.hdf5_files.total, self.data_subset)
        return int((kept[:, 1] - kept[:, 0]).sum())


@dataclass(frozen=True)
class FimSpec:
    rate: float = 0.0
    spm_rate: float = 0.5


@dataclass(frozen=True)
class SpanCorruptionSpec:
    """CodeGen2's span corruption of a source's documents (data/span_corruption.py)."""

    rate: float = 0.0  # the share of documents rewritten; the rest stay causal LM
    max_spans: int | None = None  # at most this many spans a document (None: the tokenizer's <mask_N> count)
    max_ratio: float = 0.5  # at most this share of a document's characters masked


@dataclass(frozen=True)
class LRSpec:
    peak: float
    min: float = 0.0
    warmup_iters: int = 0
    decay_style: str = "linear"
    decay_iters: int | None = None  # default: the phase's length


@dataclass(frozen=True)
class PhaseSpec:
    name: str
    iters: int
    global_batch_size: int
    blend: dict[str, float]  # normalised, sources with weight 0 dropped
    fim: dict[str, FimSpec]
    lr: LRSpec
    span_corruption: dict[str, SpanCorruptionSpec] = field(default_factory=dict)
    # "blend": Megatron-Core's blending rule; "cerebras": Cerebras's Mixture over HDF5 sources
    # (phase_schedule.py), interleaved with order_seed (its shuffle_seed).
    order: str = "blend"
    order_seed: int = 1

    @property
    def samples(self) -> int:
        return self.iters * self.global_batch_size

    @property
    def decay_iters(self) -> int:
        return self.lr.decay_iters if self.lr.decay_iters is not None else self.iters


@dataclass(frozen=True)
class PhasesConfig:
    path: str
    seed: int
    validation_fraction: float
    sources: dict[str, SourceSpec]
    phases: tuple[PhaseSpec, ...] = field(default_factory=tuple)

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    @property
    def total_iters(self) -> int:
        return sum(p.iters for p in self.phases)

    def start_iteration(self, phase: int, step: int) -> int:
        """The run's iteration count once `step` steps of phase `phase` are done."""
        return sum(p.iters for p in self.phases[:phase]) + step

    def phase_step(self, iteration: int) -> tuple[int, int]:
        """(phase, steps done in it) once `iteration` steps are done (below total_iters): start_iteration's inverse."""
        for index, phase in enumerate(self.phases):
            if iteration < phase.iters:
                return index, iteration
            iteration -= phase.iters
        raise ValueError(f"iteration {iteration} is past the phases' end")

    def fingerprint(self) -> str:
        return self._fingerprint

    @functools.cached_property  # reads every source file's index header: once per loaded file
    def _fingerprint(self) -> str:
        """Identifies what the sample stream depends on: every source's documents (count and tokens of
        each of its files, in order), subset and epochs, the seed, the held-out fraction, and each phase's
        length, batch size, blend and FIM. Not where the files sit (a corpus moved from /scratch to /lustre
        is the same corpus), nor the lr schedule (which does not change the data)."""
        sources = {
            n: {"files": [file_shape(p) for p in s.prefixes], "subset": s.subset, "max_epochs": s.max_epochs}
            for n, s in self.sources.items()
        }
        for n, s in self.sources.items():
            if s.is_hdf5:  # file names and sample counts, not where they sit
                names = [os.path.basename(p) for p in s.hdf5_files.paths]
                sources[n].update(hdf5=list(zip(names, s.hdf5_files.rows)), data_subset=s.data_subset)
        # Keys at their defaults are left out, so that a phase reads as it did before they existed.
        defaults = {"span_corruption": {}, "order": "blend", "order_seed": 1}
        phases = [
            {k: v for k, v in asdict(p).items() if k != "lr" and not (k in defaults and v == defaults[k])}
            for p in self.phases
        ]
        described = {
            "seed": self.seed,
            "validation_fraction": self.validation_fraction,
            "sources": sources,
            "phases": phases,
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def overlapping_sources(config: PhasesConfig) -> list[str]:
    """One line per pair of sources that read the same files. Each source keeps its own read position,
    so a document read through one is read again through the other, and max_epochs cannot see it."""
    files = {
        name: {os.path.realpath(p) for p in (*spec.prefixes, *(spec.hdf5_files.paths if spec.is_hdf5 else ()))}
        for name, spec in config.sources.items()
    }
    names, lines = list(files), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(files[a] & files[b])
            if shared:
                lines.append(
                    f"{config.path}: sources {a} and {b} share {len(shared)} file(s) ({', '.join(shared)}): "
                    "each keeps its own read position, so their documents can be read twice; "
                    "data_state.json counts the documents read per file"
                )
    return lines


def _number(
    value,
    where: str,
    *,
    integer: bool = False,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
):
    kind = int if integer else (int, float)
    if isinstance(value, str) and not integer:
        # PyYAML reads 1e9 and 1.0e9 (no exponent sign) as strings, a classic surprise: accept them.
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PhasesConfigError(f"{where}: expected {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise PhasesConfigError(f"{where}: {value} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise PhasesConfigError(f"{where}: {value} must be <= {high}")
    return value


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise PhasesConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _only_keys(value: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise PhasesConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _source(name: str, raw, where: str) -> SourceSpec:
    raw = _mapping(raw, where)
    _only_keys(raw, {"prefixes", "subset", "max_epochs", "hdf5", "data_subset"}, where)
    if ("prefixes" in raw) == ("hdf5" in raw):
        raise PhasesConfigError(f"{where}: give exactly one of 'prefixes' (indexed datasets) and 'hdf5' (directories)")
    max_epochs = raw.get("max_epochs")
    if max_epochs is not None:
        max_epochs = _number(max_epochs, f"{where}.max_epochs", integer=True, low=1)
    if "hdf5" in raw:
        return _hdf5_source(name, raw, where, max_epochs)
    if "data_subset" in raw:
        raise PhasesConfigError(f"{where}.data_subset: only for an hdf5 source (an indexed one takes 'subset')")
    prefixes = raw.get("prefixes")
    if isinstance(prefixes, str):
        prefixes = [prefixes]
    if not prefixes or not all(isinstance(p, str) for p in prefixes):
        raise PhasesConfigError(f"{where}.prefixes: give one or more indexed-dataset prefixes")
    resolved = []
    for prefix in prefixes:
        path = os.path.normpath(prefix)  # relative to the working directory, as --data-path
        for ext in (".bin", ".idx"):
            if not os.path.isfile(path + ext):
                raise PhasesConfigError(f"{where}.prefixes: {path + ext} does not exist")
        resolved.append(path)
    subset = _number(raw.get("subset", 1.0), f"{where}.subset", low=0.0, high=1.0, low_open=True)
    return SourceSpec(name, tuple(resolved), float(subset), max_epochs)


def _hdf5_source(name: str, raw: dict, where: str, max_epochs: int | None) -> SourceSpec:
    """Directories of ready samples (data/hdf5_source.py), every file's header checked here."""
    from megatron_ext.data.hdf5_source import Hdf5SourceError, parse_subset, scan

    if "subset" in raw:
        raise PhasesConfigError(f"{where}.subset: an hdf5 source takes data_subset (Cerebras's ranges, e.g. 0.0-0.1)")
    directories = raw["hdf5"]
    if isinstance(directories, str):
        directories = [directories]
    if not directories or not all(isinstance(d, str) for d in directories):
        raise PhasesConfigError(f"{where}.hdf5: give one or more directories of *.h5 files")
    directories = [os.path.normpath(os.path.expandvars(d)) for d in directories]
    try:
        subset = parse_subset(raw["data_subset"], f"{where}.data_subset") if "data_subset" in raw else None
        files = scan(directories, f"{where}.hdf5")
    except Hdf5SourceError as e:
        raise PhasesConfigError(str(e)) from None
    spec = SourceSpec(name, (), 1.0, max_epochs, tuple(directories), subset, files)
    if spec.samples == 0:
        raise PhasesConfigError(f"{where}.data_subset: {raw['data_subset']!r} keeps none of the {files.total} samples")
    return spec


def _phase(
    i: int,
    raw,
    where: str,
    sources: dict,
    seq_length: int,
    default_gbs: int,
    has_fim_tokens: bool,
    sentinels: int | None,
) -> PhaseSpec:
    raw = _mapping(raw, where)
    keys = {"name", "iters", "tokens", "global_batch_size", "blend", "fim", "span_corruption", "lr", "order", "seed"}
    _only_keys(raw, keys, where)
    name = raw.get("name", f"phase{i}")
    if not isinstance(name, str) or not name:
        raise PhasesConfigError(f"{where}.name: expected a non-empty string")
    gbs = _number(raw.get("global_batch_size", default_gbs), f"{where}.global_batch_size", integer=True, low=1)
    if ("iters" in raw) == ("tokens" in raw):
        raise PhasesConfigError(f"{where}: give exactly one of 'iters' and 'tokens'")
    if "iters" in raw:
        iters = _number(raw["iters"], f"{where}.iters", integer=True)
    else:
        iters = math.ceil(_number(raw["tokens"], f"{where}.tokens") / (gbs * seq_length))
    if iters <= 0:
        raise PhasesConfigError(f"{where}: a phase of zero length")

    blend = _mapping(raw.get("blend"), f"{where}.blend")
    for source in blend:
        if source not in sources:
            raise PhasesConfigError(f"{where}.blend: unknown source {source!r} (sources: {', '.join(sources)})")
    blend = {source: float(_number(weight, f"{where}.blend.{source}", low=0.0)) for source, weight in blend.items()}
    total = float(sum(blend.values()))
    if total <= 0:
        raise PhasesConfigError(f"{where}.blend: the weights are all zero")
    blend = {s: w / total for s, w in blend.items() if w > 0}

    fim = {}
    for source, at, spec in _per_source(raw, "fim", {"fim_rate", "fim_spm_rate"}, where, sources):
        rate = _number(spec.get("fim_rate", 0.0), f"{at}.fim_rate", low=0.0, high=1.0)
        spm = _number(spec.get("fim_spm_rate", 0.5), f"{at}.fim_spm_rate", low=0.0, high=1.0)
        if rate > 0 and not has_fim_tokens:
            raise PhasesConfigError(
                f"{at}.fim_rate: FIM needs a tokenizer with <|fim_prefix|>, <|fim_middle|>, "
                "<|fim_suffix|> and <|fim_pad|> (give --tokenizer-model)"
            )
        if rate > 0:
            fim[source] = FimSpec(float(rate), float(spm))

    span_corruption = _span_corruption(raw, where, sources, fim, sentinels)
    for source in (*fim, *span_corruption):
        if sources[source].is_hdf5:
            kind = "fim" if source in fim else "span_corruption"
            raise PhasesConfigError(
                f"{where}.{kind}.{source}: an hdf5 source's samples are used as they are (Crystal's released data "
                "has FIM applied offline); drop the online transform"
            )
    order = raw.get("order", "blend")
    if order not in ("blend", "cerebras"):
        raise PhasesConfigError(f"{where}.order: {order!r} is not one of blend, cerebras")
    order_seed = _number(raw.get("seed", 1), f"{where}.seed", integer=True, low=0)
    if "seed" in raw and order != "cerebras":
        raise PhasesConfigError(f"{where}.seed: only with order: cerebras (its shuffle seed)")
    not_hdf5 = [s for s in blend if not sources[s].is_hdf5]
    if order == "cerebras" and not_hdf5:
        raise PhasesConfigError(f"{where}.order: cerebras needs hdf5 sources; {not_hdf5[0]!r} is not one")
    if order == "cerebras" and max(blend.values()) <= 0.05:
        raise PhasesConfigError(f"{where}.blend: order cerebras needs a source of weight above 0.05 (its epoch rule)")

    lr_raw = _mapping(raw.get("lr"), f"{where}.lr")
    _only_keys(lr_raw, {"peak", "min", "warmup_iters", "decay_style", "decay_iters"}, f"{where}.lr")
    peak = _number(lr_raw.get("peak"), f"{where}.lr.peak", low=0.0, low_open=True)
    lr = LRSpec(
        peak=float(peak),
        min=float(_number(lr_raw.get("min", 0.0), f"{where}.lr.min", low=0.0, high=peak)),
        warmup_iters=_number(lr_raw.get("warmup_iters", 0), f"{where}.lr.warmup_iters", integer=True, low=0),
        decay_style=lr_raw.get("decay_style", "linear"),
        decay_iters=None
        if lr_raw.get("decay_iters") is None
        else _number(lr_raw["decay_iters"], f"{where}.lr.decay_iters", integer=True, low=1),
    )
    if lr.decay_style not in DECAY_STYLES:
        raise PhasesConfigError(f"{where}.lr.decay_style: {lr.decay_style!r} is not one of {', '.join(DECAY_STYLES)}")
    if lr.warmup_iters >= (lr.decay_iters or iters) and lr.decay_style != "constant":
        raise PhasesConfigError(f"{where}.lr.warmup_iters: {lr.warmup_iters} must be below the decay length")
    return PhaseSpec(name, iters, gbs, blend, fim, lr, span_corruption, order, order_seed)


def _per_source(raw: dict, key: str, keys: set, where: str, sources: dict):
    """(source, where, settings) of a phase's per-source block (fim, span_corruption), each source known
    and each settings mapping holding only `keys`."""
    for source, spec in _mapping(raw.get(key, {}) or {}, f"{where}.{key}").items():
        at = f"{where}.{key}.{source}"
        if source not in sources:
            raise PhasesConfigError(f"{at}: unknown source {source!r}")
        spec = _mapping(spec, at)
        _only_keys(spec, keys, at)
        yield source, at, spec


def _span_corruption(raw: dict, where: str, sources: dict, fim: dict, sentinels: int | None) -> dict:
    """A phase's span_corruption: source -> {rate, max_spans, max_ratio}; sentinels: the tokenizer's
    <mask_N> count (0: it lacks them; None: not checked here)."""
    out = {}
    for source, at, spec in _per_source(raw, "span_corruption", {"rate", "max_spans", "max_ratio"}, where, sources):
        rate = _number(spec.get("rate", 0.0), f"{at}.rate", low=0.0, high=1.0)
        max_ratio = _number(spec.get("max_ratio", 0.5), f"{at}.max_ratio", low=0.0, high=1.0, low_open=True)
        max_spans = spec.get("max_spans")
        if max_spans is not None:
            max_spans = _number(max_spans, f"{at}.max_spans", integer=True, low=1)
        if rate > 0 and source in fim:
            raise PhasesConfigError(f"{at}: source {source!r} has FIM in this phase too; a source takes one of the two")
        if rate > 0 and sentinels == 0:
            raise PhasesConfigError(
                f"{at}.rate: span corruption needs a tokenizer with CodeGen2's <mask_1>.., <sep> and <eom> "
                "(tools/train_tokenizer.py --codegen2-sentinels; give --tokenizer-model)"
            )
        if rate > 0 and sentinels and max_spans is not None and max_spans > sentinels:
            raise PhasesConfigError(f"{at}.max_spans: {max_spans} is more than the tokenizer's {sentinels} <mask_N>")
        if rate > 0:
            out[source] = SpanCorruptionSpec(float(rate), max_spans, float(max_ratio))
    return out


def read_yaml_mapping(path: str, error: type[Exception], missing: str) -> dict:
    """A YAML file that holds a mapping (a phases file, a sweep file), or `error` with one line."""
    if not os.path.isfile(path):
        raise error(missing)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping, got {type(raw).__name__}")
    return raw


def load_phases(
    path: str,
    seq_length: int,
    default_global_batch_size: int,
    default_seed: int,
    has_fim_tokens: bool,
    sentinels: int | None = None,
) -> PhasesConfig:
    """has_fim_tokens: the tokenizer has FIM's; sentinels: its count of CodeGen2's <mask_N> (None: the
    tokenizer is not known here, as in the data tools, and span corruption is not checked against it)."""
    raw = read_yaml_mapping(path, PhasesConfigError, f"--phases {path}: no such file")
    _only_keys(raw, {"seed", "validation_fraction", "sources", "phases"}, path)
    seed = _number(raw.get("seed", default_seed), f"{path}: seed", integer=True, low=0)
    validation = _number(raw.get("validation_fraction", 0.0), f"{path}: validation_fraction", low=0.0, high=0.5)
    sources_raw = _mapping(raw.get("sources"), f"{path}: sources")
    if not sources_raw:
        raise PhasesConfigError(f"{path}: sources: none given")
    sources = {n: _source(n, s, f"{path}: sources.{n}") for n, s in sources_raw.items()}
    phases_raw = raw.get("phases")
    if not isinstance(phases_raw, list) or not phases_raw:
        raise PhasesConfigError(f"{path}: phases: expected a non-empty list")
    phases = tuple(
        _phase(i, p, f"{path}: phases[{i}]", sources, seq_length, default_global_batch_size, has_fim_tokens, sentinels)
        for i, p in enumerate(phases_raw)
    )
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise PhasesConfigError(f"{path}: phases: names must be unique, got {names}")
    for name, source in sources.items():
        if not source.is_hdf5:
            continue
        if source.hdf5_files.width != seq_length:
            raise PhasesConfigError(
                f"{path}: sources.{name}: its samples are {source.hdf5_files.width} tokens wide "
                f"({source.hdf5_files.paths[0]}); run with --seq-length {source.hdf5_files.width}"
            )
        if validation:
            raise PhasesConfigError(
                f"{path}: validation_fraction: source {name!r} is hdf5, whose samples hold no documents to hold out; "
                "use 0 (evaluate on held-out sets instead)"
            )
    return PhasesConfig(path, seed, float(validation), sources, phases)
