#!/usr/bin/env python
"""A report of evaluation results across checkpoints and runs: a Markdown table and one plot per metric
against tokens, phase boundaries marked, runs overlaid (the figures the seed papers show).

  python tools/eval_report.py runs/code25 runs/code50 [--output runs/report] [--metrics valid/code:bpb,...]

Each RUN is a directory holding eval_results.jsonl files (the training loop's in --save, tools/evaluate.py's
in its output directory; any depth) or such a file itself. Writes <output>/report.md and
<output>/plots/<task>__<metric>.png.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.evaluation.report import (  # noqa: E402
    PROG,
    ReportError,
    columns,
    find_results,
    parse_metrics,
    phase_boundaries,  # noqa: F401 - tests reach it through this module
    read_records,
    write_report,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or eval_results.jsonl files)")
    p.add_argument("--output", help="default: <first run>/report")
    p.add_argument("--metrics", help="task:metric,... to show (default: all found)")
    args = p.parse_args(argv)
    try:
        cols = parse_metrics(args.metrics)
        records = read_records(find_results(args.runs))
        cols = columns(records, cols)
    except (ReportError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(os.path.abspath(args.runs[0]))
    report, plots = write_report(records, cols, args.output or os.path.join(first, "report"))
    runs, where = len({r["run"] for r in records}), os.path.dirname(report)
    print(f"{PROG}: {len(records)} figures of {runs} run(s): {report} and {len(plots)} plots in {where}/plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
