"""What a user reads: the tools' errors are the only line on stderr, and a training run's stderr holds no
known upstream warnings (Megatron-Core's import-time TE/Apex notes, torch's deprecation notices)."""

import json
import subprocess
import sys

import pytest
from helpers.distributed_run import REPO, TINY_RUN, layout_flags, subprocess_environment, train

pytestmark = pytest.mark.launch  # every test here starts processes


def test_a_tools_error_is_the_only_line_on_stderr(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {
        "convert_to_hf.py": ["--load", tmp_path / "empty", "--output", tmp_path / "out"],
        "convert_from_hf.py": ["--input", tmp_path / "empty", "--save", tmp_path / "out"],
        "preprocess_data.py": [
            "--input",
            tmp_path / "none.jsonl",
            "--output-prefix",
            tmp_path / "o",
            "--tokenizer-model",
            REPO / "data" / "demo" / "crystal_demo.model",
        ],
    }
    for script, args in cases.items():
        proc = subprocess.run(
            [sys.executable, str(REPO / "tools" / script), *map(str, args)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
            env=subprocess_environment(),
        )
        assert proc.returncode == 2, (script, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), (script, proc.stderr)


def test_training_logs_hold_the_projects_lines(tmp_path):
    """TP 2 with the distributed optimizer, saved, resumed at PP 2: every path that used to warn."""
    ckpt = tmp_path / "ckpt"
    runs = [
        train(2, TINY_RUN + layout_flags(tp=2, dist_opt=True) + ["--train-iters", "2", "--save", str(ckpt)]),
        train(
            2,
            TINY_RUN
            + layout_flags(pp=2, dist_opt=True)
            + ["--train-iters", "3", "--load", str(ckpt), "--override-opt-param-scheduler"]
            + ["--eval-interval", "3", "--eval-iters", "1", "--eval-results-jsonl", str(tmp_path / "eval.jsonl")],
        ),
    ]
    for run in runs:
        assert run.stderr == "", run.stderr[-3000:]
        assert "Unable to save MockGPTDataset" not in run.stdout
    # The resolved configuration, written where the first line says, reproduces the run's configuration.
    from megatron_ext.training.arguments import read_run_config

    assert f"configuration (flags as given and every resolved value): {ckpt / 'run_config.json'}" in runs[0].stdout
    config = read_run_config(str(ckpt / "run_config.json"))
    assert (config.layout.tensor_model_parallel_size, config.layout.data_parallel_size, config.world_size) == (2, 1, 2)
    assert config.layout.use_distributed_optimizer and config.optimizer.train_iters == 2
    # A blend's validation: the first --eval-iters batches of Megatron's validation split, loss only (mock
    # data has no tokenizer to count bytes with).
    assert "validation at iteration 3 | valid loss " in runs[1].stdout
    (record,) = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert (record["task"], record["metric"], record["n"], record["iteration"]) == ("valid", "loss", 8 * 32, 3)
