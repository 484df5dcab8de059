"""tools/plan_layout.py: the 7B on 64 GPUs of 80 GB fits at TP 1 with the distributed optimizer and not
without it; only TP 1 or 2 (10922 = 2 x 43 x 127); the flags it prints are accepted by pretrain_crystal.py;
its time figures are the stated formulas (checked here by hand for one layout); nothing fitting is one line.
Its memory figures are megatron_ext/model/memory.py's, checked against real tensors in test_memory.py."""

import re
import subprocess
import sys

import pytest
from helpers.distributed_run import REPO

from megatron_ext.model import layout_plan
from megatron_ext.model.crystal_config import get_preset

TOOL = str(REPO / "tools" / "plan_layout.py")
PADDED_7B = 32128  # 32032 padded to a multiple of 128


def _plans():
    return layout_plan.plan(get_preset("crystal-7b"), PADDED_7B, layout_plan.Cluster(gpus=64), 1024)


def test_the_7b_fits_at_tp1_with_the_distributed_optimizer_only():
    at_tp1 = [p for p in _plans() if (p.layout.tp, p.layout.pp) == (1, 1)]
    assert any(p.fits for p in at_tp1 if p.layout.distributed_optimizer)
    assert at_tp1 and not any(p.fits for p in at_tp1 if not p.layout.distributed_optimizer)
    assert {p.layout.tp for p in _plans()} == {1, 2}


def test_step_time_is_the_stated_formulas():
    """TP 1, PP 1, DP 64, micro-batch 1, distributed optimizer, no recomputation, by hand."""
    plan = next(p for p in _plans() if (p.layout.tp, p.layout.pp, p.layout.micro_batch_size) == (1, 1, 1)
                and p.layout.distributed_optimizer and p.layout.recompute_granularity is None)  # fmt: skip
    h, f, s, layers = 4096, 10922, 2048, 32
    flops_per_token = 3 * (layers * (2 * (4 * h * h + 3 * h * f) + 4 * s * h) + 2 * h * PADDED_7B)
    compute = flops_per_token * 1024 * s / 64 / (989e12 * 0.45)
    params = 6_575_278_720 + (PADDED_7B - 32032) * h  # every parameter on each rank at TP 1 PP 1
    dp_total = 63 / 64 * params * (4 + 2) / 50e9  # reduce-scatter fp32 gradients + all-gather bf16 weights
    window = compute / 16  # 16 micro-batches a rank: the last one's backward and the first one's forward
    assert plan.time.compute == pytest.approx(compute, rel=1e-9)
    assert plan.time.dp_comm_total == pytest.approx(dp_total, rel=1e-9)
    assert plan.time.dp_comm == pytest.approx(dp_total - window, rel=1e-9)
    assert plan.time.bubble == plan.time.tp_comm == plan.time.pp_comm == 0
    assert plan.memory.optimizer == -(-params // 64) * 12 and plan.memory.weights == 2 * params


def test_the_tool_prints_fitting_layouts_and_runnable_flags():
    proc = subprocess.run([sys.executable, TOOL, "--model", "crystal-7b", "--gpus", "64", "--gpu-memory-gib", "80",
                           "--global-batch-size", "1024"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"^crystal-7b: 6,575,278,720 parameters.*\| (\d+) of (\d+) layouts fit$", out, re.M)
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"^\| \d+ \| \d+ \|", line)]
    assert len(rows) == 12 and all(float(r[12]) <= 74 for r in rows)  # 80 GiB less the 6 GiB headroom
    steps = [float(r[18].rstrip(" |")) for r in rows]
    assert steps == sorted(steps)  # fastest first
    flags = out.split("flags: ")[1].split()
    from megatron_ext.training.arguments import build_parser, validate

    flags.remove("--bf16")  # a GPU's flag; the layout flags are what is checked on CPU
    run = validate(build_parser().parse_args(["--model", "crystal-7b", "--mock-data", *flags]), 64)
    best = layout_plan.plan(get_preset("crystal-7b"), PADDED_7B, layout_plan.Cluster(gpus=64), 1024)[0].layout
    assert (run.layout.tensor_model_parallel_size, run.layout.pipeline_model_parallel_size) == (best.tp, best.pp)
    assert run.layout.data_parallel_size == best.dp and run.layout.overlap_grad_reduce


def test_nothing_fitting_is_one_line():
    proc = subprocess.run([sys.executable, TOOL, "--model", "crystal-7b", "--gpus", "1", "--gpu-memory-gib", "24",
                           "--global-batch-size", "8"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan_layout.py: error: no layout fits 18 GiB a GPU (the smallest")
