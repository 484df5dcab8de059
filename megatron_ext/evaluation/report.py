"""Reports of evaluation results (eval_results.jsonl records) across checkpoints and runs: a Markdown table
and one plot per metric against tokens, phase boundaries marked, runs overlaid (the figures the seed
papers show). tools/eval_report.py is its command line; the sweep report (sweeps/report.py) builds on it."""

from __future__ import annotations

import json
import os
import sys

from megatron_ext.atomic_files import write_text_atomically

PROG = "eval_report.py"  # warnings name the command people run


class ReportError(ValueError):
    pass


def find_results(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = sorted(
                os.path.join(d, f) for d, _, names in os.walk(path) for f in names if f == "eval_results.jsonl"
            )
            if not found:
                raise ReportError(f"{path}: no eval_results.jsonl in it")
            files += found
        else:
            raise ReportError(f"{path}: no such file or directory")
    return files


def read_records(files: list[str]) -> list[dict]:
    """Every record; a bad line is counted and skipped. A figure evaluated twice (a rerun, a rescore) keeps
    its latest record. A figure's identity includes what it was computed on (n, the questions or samples):
    the same task scored on 32 questions in the loop and on 164 at the end are two figures, never one."""
    latest: dict[tuple, dict] = {}
    bad = 0
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                    key = (r["run"], r["iteration"], r["task"], r["metric"], r.get("n"))
                    float(r["value"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                latest[key] = r
    if bad:
        print(f"{PROG}: warning: skipped {bad} unreadable record(s)", file=sys.stderr)
    if not latest:
        raise ReportError(f"no records in {', '.join(files)}")
    return list(latest.values())


def phase_boundaries(records: list[dict]) -> dict[str, list[tuple[float, str]]]:
    """Per run: (x where a phase starts, its name) for every phase after the first. The training loop's
    records carry the tokens where their phase started; without those, the first evaluation seen in the
    phase stands in for its start."""
    out = {}
    for run in sorted({r["run"] for r in records}):
        mine = [r for r in records if r["run"] == run and r.get("phase")]
        by_tokens = all(r.get("tokens") is not None for r in mine)
        starts = {r["phase"]: r["phase_start_tokens"] for r in mine if r.get("phase_start_tokens") is not None}
        marks, previous = [], None
        for x, phase in sorted({(x_of(r), r["phase"]) for r in mine}):
            if previous is not None and phase != previous:
                marks.append((starts[phase] if by_tokens and phase in starts else x, phase))
            previous = phase
        out[run] = marks
    return out


def x_of(record: dict) -> float:
    return record["tokens"] if record.get("tokens") is not None else record["iteration"]


def columns(records: list[dict], wanted: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    found = list(dict.fromkeys((r["task"], r["metric"]) for r in records))
    if wanted:
        missing = [f"{t}:{m}" for t, m in wanted if (t, m) not in found]
        if missing:
            raise ReportError(f"--metrics: no records of {', '.join(missing)}")
        return wanted
    return found


def cell(record: dict | None) -> str:
    if record is None:
        return ""
    value = f"{record['value']:.4f}"
    return value + (f" ± {record['stderr']:.4f}" if record.get("stderr") else "")


def cells(records: list[dict]) -> str:
    """A table cell of one figure per question set at one point, each with the n it is over."""
    return "; ".join(cell(r) + (f" (n={r['n']})" if r.get("n") is not None else "") for r in records)


def markdown(records: list[dict], cols: list[tuple[str, str]]) -> str:
    runs = sorted({r["run"] for r in records})
    head = "| run | iteration | tokens | phase | " + " | ".join(f"{t} {m}" for t, m in cols) + " |"
    rule = "|" + "---|" * (4 + len(cols))
    by_point: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r.get("n") or 0):
        by_point.setdefault((r["run"], r["iteration"]), {}).setdefault((r["task"], r["metric"]), []).append(r)
    lines = ["# Evaluation report", "", "## Final figures per run", "", head, rule]
    for run in runs:
        last = max(it for (rn, it) in by_point if rn == run)
        lines.append(_row(run, last, by_point[run, last], cols))
    lines += ["", "## Every evaluation", "", head, rule]
    for run, iteration in sorted(by_point):
        lines.append(_row(run, iteration, by_point[run, iteration], cols))
    return "\n".join(lines) + "\n"


def _row(run: str, iteration: int, figures: dict, cols: list[tuple[str, str]]) -> str:
    any_record = next(iter(figures.values()))[0]
    tokens = any_record.get("tokens")
    phase = any_record.get("phase") or ""
    row = [cells(figures.get(c, [])) for c in cols]
    return f"| {run} | {iteration} | {'' if tokens is None else f'{tokens:,}'} | {phase} | " + " | ".join(row) + " |"


def format_count(x: float, _position=None) -> str:
    """An axis of tokens: 200000 -> 0.2M, 1.4e12 -> 1.4T."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale / 10:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def plot(records: list[dict], cols: list[tuple[str, str]], directory: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    boundaries = phase_boundaries(records)
    runs = sorted({r["run"] for r in records})
    colours = {run: plt.get_cmap("tab10")(i % 10) for i, run in enumerate(runs)}
    written = []
    for task, metric in cols:
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        series = sorted({(r["run"], r.get("n") or 0) for r in records if (r["task"], r["metric"]) == (task, metric)})
        styles = ("-", "--", ":", "-.")
        for run, n in series:  # one line per run and question set: figures over other questions are not a trend
            mine = sorted(
                (r for r in records if (r["run"], r.get("n") or 0, r["task"], r["metric"]) == (run, n, task, metric)),
                key=x_of,
            )
            xs, ys = [x_of(r) for r in mine], [r["value"] for r in mine]
            errors = [r.get("stderr") or 0.0 for r in mine]
            style = styles[[m for r_, m in series if r_ == run].index(n) % len(styles)]
            label = f"{run}, n={n}" if n else run
            ax.plot(xs, ys, marker="o", markersize=3, color=colours[run], linestyle=style, label=label)
            if any(errors):
                ax.fill_between(xs, [y - e for y, e in zip(ys, errors)], [y + e for y, e in zip(ys, errors)],
                                color=colours[run], alpha=0.15, linewidth=0)  # fmt: skip
        for run in sorted({run for run, _ in series}):
            for x, phase in boundaries[run]:
                ax.axvline(x, color=colours[run], linestyle="--", linewidth=0.8, alpha=0.6)
                ax.annotate(phase, (x, 1), xycoords=("data", "axes fraction"), rotation=90, fontsize=7,
                            va="top", ha="right", color=colours[run])  # fmt: skip
        tokens = all(r.get("tokens") is not None for r in records)
        ax.set_xlabel("tokens" if tokens else "iteration")
        if tokens:
            from matplotlib.ticker import FuncFormatter

            ax.xaxis.set_major_formatter(FuncFormatter(format_count))
        ax.set_ylabel(metric)
        ax.set_title(f"{task} {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(directory, f"{task.replace('/', '_')}__{metric.replace('@', 'at')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def parse_metrics(text: str | None) -> list[tuple[str, str]] | None:
    if not text:
        return None
    out = []
    for item in text.split(","):
        task, sep, metric = item.strip().rpartition(":")
        if not sep or not task or not metric:
            raise ReportError(f"--metrics {text}: {item!r} is not task:metric")
        out.append((task, metric))
    return out


def write_report(
    records: list[dict], cols: list[tuple[str, str]], output: str, title: str = "Evaluation report"
) -> tuple[str, list[str]]:
    """report.md and plots/ under output; returns their paths."""
    os.makedirs(output, exist_ok=True)
    plots = plot(records, cols, os.path.join(output, "plots"))
    text = markdown(records, cols).replace("# Evaluation report", f"# {title}", 1)
    text += "\n## Plots\n\n" + "".join(f"![{os.path.basename(x)}](plots/{os.path.basename(x)})\n" for x in plots)
    report = os.path.join(output, "report.md")
    write_text_atomically(report, text)
    return report, plots
