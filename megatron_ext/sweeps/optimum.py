"""A swarm's fitted optimum: `tools/sweep.py fit` (a regression per metric from the swarm's runs, or from
RegMix's CSV files; the mixture that minimises the objective, written as a phases file with its predicted
figures) and `tools/sweep.py verify` (the optimum and the base trained with the swarm's budget and seeds,
predicted against measured). The regressions and the search are mixture_fit.py's.

Under <sweep>/fit/: fit.json (every figure), fit.md, optimum.yaml (the base phases file with the optimum's
blends) and plots/: each metric against a two-source phase's share (the runs as points, the fit and its
spread across folds as a band) or, with more sources, predicted against measured.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os

import numpy as np
import yaml

from megatron_ext.atomic_files import write_text_atomically
from megatron_ext.sweeps import mixture_fit
from megatron_ext.sweeps import swarm as swarms
from megatron_ext.sweeps.mixture_fit import FitError, Runs
from megatron_ext.sweeps.plan import Sweep, Variant


def metric_name(task: str, metric: str) -> str:
    return f"{task} {metric}"


def runs_of(sweep: Sweep) -> Runs:
    """A swarm's finished runs: their mixtures and final figures (every run a row; seeds are rows alike)."""
    from megatron_ext.sweeps.report import final_figures, sweep_records

    if sweep.swarm is None:
        raise FitError(f"{sweep.path}: not a swarm (fit needs a 'swarm' section, or --mixtures/--metrics CSVs)")
    finals = final_figures(sweep_records(sweep))
    done = [v for v in sweep.variants if v.name in finals]
    if len(done) < 4:
        raise FitError(f"sweep {sweep.name}: {len(done)} runs have results; a fit needs at least 4")
    features = sweep.swarm.features
    names = sorted({metric_name(t, m) for v in done for (t, m) in finals[v.name]})
    metrics = {n: np.full(len(done), np.nan) for n in names}
    for i, v in enumerate(done):
        for (t, m), record in finals[v.name].items():
            metrics[metric_name(t, m)][i] = record["value"]
    groups = [[features.index(sweep.swarm.feature(p, s)) for s in sweep.swarm.sources] for p in sweep.swarm.phases]
    x = np.array([[v.mixture[f] for f in features] for v in done])
    return Runs(features, groups, x, metrics, [v.name for v in done])


def base_mixture(sweep: Sweep, base_phases: dict) -> np.ndarray:
    sw = sweep.swarm
    out = []
    for p in sw.phases:
        blend = base_phases["phases"][p].get("blend", {})
        w = np.array([float(blend.get(s, 0.0)) for s in sw.sources])
        out.extend(w / w.sum())
    return np.array(out)


def parse_objective(items: list[str] | None, fitted: dict) -> dict[str, float]:
    """--objective "METRIC[=WEIGHT]" (repeated); by default every bits-per-byte metric, weight 1."""
    if not items:
        chosen = {m: 1.0 for m in fitted if m.endswith(" bpb")}
        if not chosen:
            raise FitError(f"no bpb metric to minimise by default; give --objective (fitted: {', '.join(fitted)})")
        return chosen
    out = {}
    for item in items:
        name, _, weight = item.rpartition("=") if "=" in item else (item, "", "1")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            raise FitError(f"--objective {item!r}: METRIC or METRIC=WEIGHT") from None
    return out


def fit_sweep(sweep: Sweep | None, args, log=print) -> dict:
    """The fit command: every metric's models and accuracy, the optimum of --model's fit, the files."""
    if sweep is not None:
        runs = runs_of(sweep)
        with open(sweep.base) as f:
            base_phases = yaml.safe_load(f)
        reference = base_mixture(sweep, base_phases)
        alphas = [swarms.prior(sweep.swarm, base_phases, p) for p in sweep.swarm.phases]
        bounds = {runs.features.index(sweep.swarm.feature(p, s)): b
                  for s, b in sweep.swarm.bounds.items() for p in sweep.swarm.phases}  # fmt: skip
        output = args.output_dir or os.path.join(sweep.directory, "fit")
    else:
        if not (args.mixtures and args.metrics):
            raise FitError("fit: give a swarm sweep file, or --mixtures and --metrics (RegMix's CSV layout)")
        runs = mixture_fit.read_regmix_csv(args.mixtures, args.metrics)
        base_phases, reference, bounds = None, None, {}
        alphas = [np.ones(len(runs.features))]  # uniform over the simplex: no base to centre a prior on
        output = args.output_dir or os.path.splitext(args.metrics)[0] + "_fit"
    wanted = args.metric or list(runs.metrics)
    unknown = [m for m in wanted if m not in runs.metrics]
    if unknown:
        raise FitError(f"--metric {unknown[0]!r}: the runs have {', '.join(runs.metrics)}")
    test = mixture_fit.read_regmix_csv(args.test_mixtures, args.test_metrics) if args.test_mixtures else None
    if test is not None and test.features != runs.features:
        raise FitError(f"{args.test_mixtures}: its columns {test.features} are not {runs.features}")
    table, fitted = [], {}
    for metric in wanted:
        for model in mixture_fit.MODELS:
            if model == "log-linear" and not (runs.metrics[metric][runs.rows(metric)] > 0).all():
                continue  # e.g. a score that can be 0: trees only
            f = mixture_fit.fit(runs, metric, model, folds=args.folds, seed=args.seed)
            row = {"metric": metric, "model": model, "runs": int(runs.rows(metric).sum()),
                   "cv_spearman": f.spearman, "cv_mae": f.mae}  # fmt: skip
            if test is not None and metric in test.metrics:
                rows = test.rows(metric)
                row["test_spearman"], row["test_mae"] = mixture_fit.held_out(
                    f, test.x[rows], test.metrics[metric][rows]
                )
            table.append(row)
            log("  ".join(f"{k} {_text(v)}" for k, v in row.items()))
            if model == args.model:
                fitted[metric] = f
    objective = parse_objective(args.objective, fitted)
    limits = {}
    for metric in args.no_worse_than_base or []:
        if reference is None:
            raise FitError("--no-worse-than-base needs a swarm sweep (a base mixture)")
        if metric not in fitted:
            raise FitError(f"--no-worse-than-base {metric!r}: not a fitted metric")
        limits[metric] = float(fitted[metric].predict(reference[None, :])[0])
    pool = mixture_fit.candidates(runs, alphas, bounds, args.samples, args.seed)
    best = mixture_fit.search(fitted, objective, pool, args.top, limits)
    result = {
        "model": args.model,
        "features": runs.features,
        "runs": runs.names,
        "table": table,
        "objective": objective,
        "no_worse_than_base": limits,
        "optimum": dict(zip(runs.features, best.weights.round(6).tolist())),
        "predicted": {m: {"value": v, "spread": s} for m, (v, s) in best.predicted.items()},
        "considered": best.considered,
        "top": args.top,
    }
    if reference is not None:
        result["base"] = dict(zip(runs.features, reference.round(6).tolist()))
        result["base_predicted"] = {
            m: {"value": float(f.predict(reference[None, :])[0]), "spread": float(f.spread(reference[None, :])[0])}
            for m, f in fitted.items()
        }  # fmt: skip
    os.makedirs(output, exist_ok=True)
    if sweep is not None:
        result["phases_file"] = write_optimum_phases(
            sweep, base_phases, best.weights, os.path.join(output, "optimum.yaml")
        )
    result["plots"] = plot(runs, fitted, objective, best.weights, reference, os.path.join(output, "plots"))
    write_text_atomically(os.path.join(output, "fit.json"), json.dumps(result, indent=1, default=float))
    write_text_atomically(os.path.join(output, "fit.md"), markdown(result, output))
    result["output"] = output
    return result


def _text(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_optimum_phases(sweep: Sweep, base_phases: dict, weights: np.ndarray, path: str) -> str:
    mixture = dict(zip(sweep.swarm.features, weights.tolist()))
    phases = copy.deepcopy(base_phases)
    for p in sweep.swarm.phases:
        phases["phases"][p]["blend"] = swarms.blend_of(sweep.swarm, base_phases, p, mixture)
    text = f"# the predicted optimum of swarm {sweep.name} ({sweep.path}; tools/sweep.py fit)\n"
    write_text_atomically(path, text + yaml.safe_dump(phases, sort_keys=False))
    return path


def markdown(result: dict, output: str) -> str:
    tested = any("test_spearman" in r for r in result["table"])
    head = "| metric | model | runs | CV Spearman | CV MAE |" + (" test Spearman | test MAE |" if tested else "")
    lines = [f"# Mixture fit ({result['model']} chooses the optimum)", "", head, "|---" * (7 if tested else 5) + "|"]
    for r in result["table"]:
        cells = [r["metric"], r["model"], str(r["runs"]), _text(r["cv_spearman"]), _text(r["cv_mae"])]
        cells += [_text(r[k]) for k in ("test_spearman", "test_mae") if k in r]
        lines.append("| " + " | ".join(cells) + " |")
    objective = " + ".join(f"{w:g} x {m}" for m, w in result["objective"].items())
    limits = result["no_worse_than_base"]
    limited = f", no worse than the base in {', '.join(limits)}" if limits else ""
    lines += ["", f"Objective: minimise {objective}{limited}; the optimum is the mean of the best {result['top']} of "
              f"{result['considered']:,} drawn mixtures.", ""]  # fmt: skip
    lines += ["| | " + " | ".join([*result["features"], *result["predicted"]]) + " |",
              "|---|" + "---|" * (len(result["features"]) + len(result["predicted"]))]  # fmt: skip
    rows = [("optimum", result["optimum"], result["predicted"])]
    if "base" in result:
        rows.append(("base", result["base"], result["base_predicted"]))
    for name, weights, predicted in rows:
        cells = [f"{weights[f]:.3f}" for f in result["features"]]
        cells += [f"{p['value']:.4f} ± {p['spread']:.4f}" for p in predicted.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"![{os.path.basename(p)}]({os.path.relpath(p, output)})" for p in result["plots"]]
    return "\n".join(lines) + "\n"


def plot(runs: Runs, fitted: dict, objective: dict, optimum: np.ndarray, reference, directory: str) -> list[str]:
    """Per metric, and for the objective: against the second source's share where one phase of two sources
    varies (the response curve: the runs, the fit and its spread across the fold models), else the prediction
    against the measured value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    curve = len(runs.groups) == 1 and len(runs.groups[0]) == 2
    model = next(iter(fitted.values())).model
    plots = [(m, f.predict, f.spread, runs.metrics[m], f"Spearman {f.spearman:.3f} (cross-validated)")
             for m, f in fitted.items()]  # fmt: skip
    if curve and len(objective) > 1:

        def total(x, fold=None):
            return sum(
                w * fitted[m].predict(x, None if fold is None else fitted[m].folds[fold]) for m, w in objective.items()
            )

        folds = min(len(fitted[m].folds) for m in objective)
        measured = sum(w * runs.metrics[m] for m, w in objective.items())
        name = " + ".join(f"{w:g} x {m}" if w != 1 else m for m, w in objective.items())
        plots.append(
            (name, total, lambda x: np.std([total(x, i) for i in range(folds)], axis=0), measured, "the objective")
        )
    written = []
    for label, predict, spread, values, note in plots:
        rows = ~np.isnan(values)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        if curve:
            j = runs.groups[0][1]
            share = np.linspace(0, 1, 101)
            grid = np.zeros((len(share), len(runs.features)))
            grid[:, runs.groups[0][0]], grid[:, j] = 1 - share, share
            mean, band = predict(grid), spread(grid)
            ax.plot(share, mean, label=f"{model} fit")
            ax.fill_between(share, mean - band, mean + band, alpha=0.25, label="spread across folds")
            ax.scatter(runs.x[rows, j], values[rows], color="black", s=14, label="runs", zorder=3)
            ax.axvline(optimum[j], color="tab:red", linestyle="--", label=f"the objective's optimum {optimum[j]:.2f}")
            if reference is not None:
                ax.axvline(reference[j], color="gray", linestyle=":", label=f"base {reference[j]:.2f}")
            ax.set_xlabel(runs.features[j])
            ax.set_ylabel(label)
        else:
            ax.scatter(values[rows], predict(runs.x[rows]), s=14, label="runs")
            low, high = values[rows].min(), values[rows].max()
            ax.plot([low, high], [low, high], color="gray", label="y = x")
            ax.set_xlabel(f"{label}, measured")
            ax.set_ylabel("predicted (fit on every run)")
        ax.set_title(f"{label}: {note}, {int(rows.sum())} runs", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        stem = "objective" if note == "the objective" else label.replace("/", "_").replace(" ", "_")
        path = os.path.join(directory, stem + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def verify_sweep(sweep: Sweep, tokenizer=None, log=print) -> dict:
    """The optimum and the base trained with the swarm's budget and seeds; predicted against measured.
    tokenizer: the runs', for the phases files' checks (FIM needs its tokens)."""
    from megatron_ext.sweeps import report, runner

    fit_dir = os.path.join(sweep.directory, "fit")
    try:
        with open(os.path.join(fit_dir, "fit.json")) as f:
            fitted = json.load(f)
    except OSError:
        raise FitError(f"sweep {sweep.name}: no {fit_dir}/fit.json: run tools/sweep.py fit first") from None
    with open(sweep.base) as f:
        base_phases = yaml.safe_load(f)
    variants = []
    # Each optimum trains under a name of its own (the model and its weights' digest): a later fit's optimum
    # is a new run, never the earlier one's results; the base's run serves every verification.
    digest = hashlib.sha1(json.dumps(fitted["optimum"], sort_keys=True).encode()).hexdigest()[:8]
    optimum_name = f"optimum_{fitted['model']}_{digest}"
    for name, mixture in ((optimum_name, fitted["optimum"]), ("base", fitted["base"])):
        overrides = {
            f"phases[{p}].blend": swarms.blend_of(sweep.swarm, base_phases, p, mixture) for p in sweep.swarm.phases
        }
        template = sweep.variants[0]
        phases = copy.deepcopy(template.phases)
        for p in sweep.swarm.phases:
            phases["phases"][p]["blend"] = overrides[f"phases[{p}].blend"]
        for seed in sweep.swarm.seeds or (None,):
            label = name + (f"_seed{seed}" if seed is not None else "")
            extra = {"seed": seed} if seed is not None else {}
            if seed is not None:
                phases = {**phases, "seed": seed}
            variants.append(Variant(label, {**overrides, **extra}, copy.deepcopy(phases), template.tokens, mixture))
    check = dataclasses.replace(sweep, name=f"{sweep.name}_verify", directory=os.path.join(sweep.directory, "verify"),
                                variants=variants, axes={})  # fmt: skip
    from megatron_ext.sweeps.plan import write_phases_files

    write_phases_files(check, tokenizer)
    runner.run_local(check, log=log)
    finals = report.final_figures(report.sweep_records(check))
    out = {"model": fitted["model"], "optimum": fitted["optimum"], "run": optimum_name, "measured": {},
           "predicted": {"optimum": fitted["predicted"], "base": fitted["base_predicted"]}}  # fmt: skip
    for key, name in (("optimum", optimum_name), ("base", "base")):
        for metric in fitted["predicted"]:
            values = [r["value"] for v in variants if v.name.split("_seed")[0] == name
                      for (t, m), r in finals.get(v.name, {}).items() if metric_name(t, m) == metric]  # fmt: skip
            out["measured"].setdefault(key, {})[metric] = float(np.mean(values)) if values else None
    head = "| metric | optimum predicted | optimum measured | base predicted | base measured |"
    weights = ", ".join(f"{k} {w:.3f}" for k, w in fitted["optimum"].items())
    lines = [f"# Predicted against measured: the {fitted['model']} optimum ({weights}; run {optimum_name}) and the "
             "base", "", head, "|---|---|---|---|---|"]  # fmt: skip
    for metric in fitted["predicted"]:
        p_o, p_b = fitted["predicted"][metric], fitted["base_predicted"][metric]
        m_o, m_b = out["measured"]["optimum"][metric], out["measured"]["base"][metric]
        lines.append(f"| {metric} | {p_o['value']:.4f} ± {p_o['spread']:.4f} | {_text(m_o)} | "
                     f"{p_b['value']:.4f} ± {p_b['spread']:.4f} | {_text(m_b)} |")  # fmt: skip
    write_text_atomically(os.path.join(check.directory, "verify.md"), "\n".join(lines) + "\n")
    write_text_atomically(os.path.join(check.directory, "verify.json"), json.dumps(out, indent=1))
    out["report"] = os.path.join(check.directory, "verify.md")
    return out
