"""The comparison of a sweep's runs: one row per run (its varied values, tokens, time and final figures),
each metric against each varied value (runs that differ only in other axes, e.g. seeds, averaged, with
their spread as error bars; one run alone shows its own standard error), and every metric's curve against
tokens with the runs overlaid (evaluation/report.py)."""

from __future__ import annotations

import json
import math
import os

from megatron_ext.atomic_files import write_text_atomically
from megatron_ext.evaluation import report
from megatron_ext.sweeps.plan import Sweep
from megatron_ext.sweeps.runner import DONE


def sweep_records(sweep: Sweep) -> list[dict]:
    files = [os.path.join(sweep.variant_dir(v), "eval_results.jsonl") for v in sweep.variants]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        raise report.ReportError(f"sweep {sweep.name}: no run has results yet under {sweep.directory}")
    return report.read_records(files)


def final_figures(records: list[dict]) -> dict[str, dict[tuple[str, str], dict]]:
    """Per run, its figures at its last evaluated iteration."""
    last: dict[str, int] = {}
    for r in records:
        last[r["run"]] = max(last.get(r["run"], -1), r["iteration"])
    out: dict[str, dict] = {}
    for r in records:
        if r["iteration"] == last[r["run"]]:
            out.setdefault(r["run"], {})[(r["task"], r["metric"])] = r
    return out


def _value_text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else str(value)


def _done_seconds(path: str) -> float | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("seconds")


def markdown(sweep: Sweep, finals: dict, cols: list[tuple[str, str]]) -> str:
    if sweep.swarm is not None:  # a swarm's runs by their mixture weights (and seed)
        axes = [*sweep.swarm.features, *(["seed"] if sweep.swarm.seeds else [])]
    else:
        axes = list(sweep.axes) or sorted({k for v in sweep.variants for k in v.overrides})
    head = ["variant", *axes, "tokens", "time (s)", *(f"{t} {m}" for t, m in cols)]
    lines = [f"# Sweep {sweep.name}", "", f"{len(sweep.variants)} runs of `{sweep.base}` (`{sweep.path}`).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    for v in sweep.variants:
        done = os.path.join(sweep.variant_dir(v), DONE)
        seconds = _done_seconds(done)
        figures = finals.get(v.name, {})
        values = {**v.overrides, **{k: round(w, 3) for k, w in v.mixture.items()}}
        cells = [v.name, *(_value_text(values.get(a, "")) for a in axes), f"{v.tokens:,}"]
        cells += ["" if seconds is None else f"{seconds:.0f}", *(report.cell(figures.get(c)) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_against_axes(sweep: Sweep, finals: dict, cols: list[tuple[str, str]], directory: str) -> list[str]:
    """For every numeric axis: bits per byte of every task on one plot (e.g. text and code against the
    code share), and one plot per other metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    for axis, values in sweep.axes.items():
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values):
            continue
        groups = [[c for c in cols if c[1] == "bpb"]] + [[c] for c in cols if c[1] != "bpb"]
        for group in filter(None, groups):
            fig, ax = plt.subplots(figsize=(6.4, 4.0))
            for task, metric in group:
                xs, means, errors = [], [], []
                for x in values:
                    runs = [finals[v.name][(task, metric)] for v in sweep.variants
                            if v.overrides.get(axis) == x and (task, metric) in finals.get(v.name, {})]  # fmt: skip
                    if not runs:
                        continue
                    ys = [r["value"] for r in runs]
                    mean = sum(ys) / len(ys)
                    spread = (math.sqrt(sum((y - mean) ** 2 for y in ys) / (len(ys) - 1)) if len(ys) > 1
                              else runs[0].get("stderr") or 0.0)  # fmt: skip
                    xs.append(x)
                    means.append(mean)
                    errors.append(spread)
                ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=f"{task} {metric}")
            ax.set_xlabel(axis)
            ax.set_ylabel(group[0][1] if len(group) == 1 else "bits per byte")
            ax.set_title(f"{sweep.name}: {'bits per byte' if len(group) > 1 else group[0][0]} vs {axis.split('.')[-1]}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            what = "bpb" if len(group) > 1 else f"{group[0][0]}__{group[0][1]}".replace("/", "_").replace("@", "at")
            path = os.path.join(directory, f"{what}_vs_{axis.split('.')[-1]}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def write(sweep: Sweep, output: str | None = None) -> tuple[str, list[str]]:
    records = sweep_records(sweep)
    cols = report.columns(records, None)
    output = output or os.path.join(sweep.directory, "report")
    finals = final_figures(records)
    plots = plot_against_axes(sweep, finals, cols, os.path.join(output, "plots"))
    plots += report.plot(records, cols, os.path.join(output, "curves"))
    text = markdown(sweep, finals, cols) + "\n## Plots\n\n"
    text += "".join(f"![{os.path.basename(p)}]({os.path.relpath(p, output)})\n" for p in plots)
    path = os.path.join(output, "report.md")
    write_text_atomically(path, text)
    return path, plots
