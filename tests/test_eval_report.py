"""tools/eval_report.py renders the table and the plots from a fixture results file."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "data" / "eval_results_two_runs.jsonl"
sys.path.insert(0, str(REPO / "tools"))

import eval_report  # noqa: E402


@pytest.mark.launch
def test_report_renders_table_and_plots(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_report.py"), str(FIXTURE), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable record(s)" in proc.stderr  # the fixture's last line is not JSON
    text = (tmp_path / "report.md").read_text()
    final = text.split("## Every evaluation")[0]
    # code50's last arc_easy figure was recorded twice (a rescore): the later record, 0.5, is the one shown.
    assert (
        "| code25 | 4 | 4,000 | text+code | 1.6000 ± 0.0100 (n=64) | 2.6000 ± 0.0100 (n=64) | 0.2900 ± 0.0100 (n=64) |"
        in final
    )
    assert (
        "| code50 | 4 | 4,000 | text+code | 1.4000 ± 0.0100 (n=64) | 2.4000 ± 0.0100 (n=64) | 0.5000 ± 0.0100 (n=64) |"
        in final
    )
    every = text.split("## Every evaluation")[1].split("## Plots")[0]
    assert every.count("| code25 |") == every.count("| code50 |") == 4
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["arc_easy__acc.png", "valid_code__bpb.png", "valid_text__bpb.png"]
    for name in plots:
        data = (tmp_path / "plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"](plots/{name})" in text


def test_phase_boundaries_use_the_recorded_phase_start():
    records = eval_report.read_records([str(FIXTURE)])
    # An offline record (tools/evaluate.py: no phase_start_tokens) of code25 beside the loop's.
    records.append({**records[-1], "run": "code25", "iteration": 5, "tokens": 5000, "phase_start_tokens": None})
    # code25's records say its second phase began at 1,500 tokens; code50's do not, so its first evaluation
    # in the phase (3,000 tokens) marks it.
    assert eval_report.phase_boundaries(records) == {"code25": [(1500, "text+code")], "code50": [(3000, "text+code")]}


@pytest.mark.launch
def test_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "eval_report.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and proc.stderr == f"eval_report.py: error: {tmp_path}: no eval_results.jsonl in it\n"


def test_figures_over_other_questions_are_other_series(tmp_path, monkeypatch):
    """The demo's case: humaneval_gold in the loop on 32 questions (falling), then at the end on all 164 (a
    higher figure). Both are kept, drawn as two series labelled with n, and the table gives each its n;
    the tokens axis reads 0.2M, not 200000."""
    import json

    import matplotlib.axes

    from megatron_ext.evaluation import report

    path = tmp_path / "eval_results.jsonl"
    records = [
        dict(
            run="demo",
            phase="p",
            iteration=it,
            tokens=it * 2048,
            checkpoint=None,
            task="humaneval_gold",
            metric="bpb",
            value=v,
            n=32,
            stderr=0.01,
        )
        for it, v in ((100, 2.40), (200, 2.16), (300, 2.08))
    ]
    records.append({**records[-1], "value": 2.42, "n": 164, "checkpoint": "ckpt/iter_0000300"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    read = report.read_records([str(path)])
    assert sorted((r["iteration"], r["n"], r["value"]) for r in read) == [
        (100, 32, 2.40), (200, 32, 2.16), (300, 32, 2.08), (300, 164, 2.42),
    ]  # fmt: skip
    cols = report.columns(read, None)
    final = report.markdown(read, cols).split("## Every evaluation")[0]
    assert "| demo | 300 | 614,400 | p | 2.0800 ± 0.0100 (n=32); 2.4200 ± 0.0100 (n=164) |" in final
    drawn = []
    real_plot = matplotlib.axes.Axes.plot

    def recording_plot(self, xs, ys, *args, **kwargs):
        drawn.append((kwargs.get("label"), list(xs), list(ys)))
        return real_plot(self, xs, ys, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    report.plot(read, cols, str(tmp_path / "plots"))
    assert drawn == [("demo, n=32", [204800, 409600, 614400], [2.40, 2.16, 2.08]), ("demo, n=164", [614400], [2.42])]
    assert (report.format_count(200000), report.format_count(1.4e12), report.format_count(50000)) == (
        "0.2M",
        "1.4T",
        "50K",
    )
