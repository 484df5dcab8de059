"""Checkpoint I/O at scale (Megatron-LM's flags): with --ckpt-fully-parallel-save (the default) each
data-parallel rank writes about half of a DP 2 checkpoint, where without it the first rank writes it all;
--ckpt-fully-parallel-load reads it back in shares; --async-save writes in the background and changes no
loss; every one of these checkpoints resumes exactly (same layout: bitwise; another: 1e-5)."""

import glob
import math
import os

import pytest
from helpers.distributed_run import TINY_RUN, layout_flags, read_metrics, train

pytestmark = pytest.mark.launch  # every test here starts processes

STEPS = 4
DP2 = TINY_RUN + layout_flags(dist_opt=True) + ["--train-iters", str(STEPS)]


def bytes_written_by_rank(path) -> dict[int, int]:
    """torch_dist's shard files are __<rank>_<n>.distcp: the bytes each rank wrote."""
    written: dict[int, int] = {}
    for file in glob.glob(os.path.join(path, "__*_*.distcp")):
        rank = int(os.path.basename(file).split("_")[2])
        written[rank] = written.get(rank, 0) + os.path.getsize(file)
    return written


def _run(tmp_path, name, flags, nproc=2):
    metrics = tmp_path / f"{name}.jsonl"
    out = train(nproc, flags + ["--metrics-jsonl", str(metrics)])
    return [(r["lm_loss"], r["grad_norm"]) for r in read_metrics(metrics)], out.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_parallel_and_async_saves_split_the_writes_and_resume_exactly(tmp_path):
    saved = {}
    for name, flags in {
        "one_writer": ["--no-ckpt-fully-parallel-save"],
        "parallel": [],
        "async": ["--async-save"],
    }.items():
        ckpt = tmp_path / name
        saved[name] = _run(tmp_path, name, DP2 + ["--save", str(ckpt), "--save-interval", "2", *flags])
        assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)
    straight = saved["one_writer"][0]
    assert saved["parallel"][0] == straight and saved["async"][0] == straight  # saving changes no step
    async_out = saved["async"][1]
    assert f"checkpoint {tmp_path / 'async' / 'iter_0000002'}: writing in the background; the step waited" in async_out
    assert f"checkpoint {tmp_path / 'async' / 'iter_0000004'} complete: written in the background in" in async_out

    one = bytes_written_by_rank(tmp_path / "one_writer" / "iter_0000002")
    shared = bytes_written_by_rank(tmp_path / "parallel" / "iter_0000002")
    assert one.get(1, 0) == 0 and one[0] > 1_000_000  # without: data-parallel rank 0 writes everything
    assert sum(shared.values()) == pytest.approx(one[0], rel=0.02)
    for rank in (0, 1):  # with: each about half
        assert 0.4 < shared[rank] / sum(shared.values()) < 0.6, shared

    # Resumes from step 2: the async checkpoint at DP 2 read in shares (bitwise), the parallel one at TP 2.
    load = ["--exit-interval", str(STEPS)]
    same, _ = _run(tmp_path, "same", DP2 + load + ["--load", str(tmp_path / "async"), "--ckpt-step", "2",
                                                   "--ckpt-fully-parallel-load"])  # fmt: skip
    assert same == straight[2:]
    tp2 = TINY_RUN + layout_flags(tp=2, dist_opt=True) + ["--train-iters", str(STEPS)]
    other, _ = _run(tmp_path, "other", tp2 + ["--load", str(tmp_path / "parallel"), "--ckpt-step", "2"])
    for (loss, norm), (ref_loss, ref_norm) in zip(other, straight[2:], strict=True):
        assert math.isclose(loss, ref_loss, rel_tol=1e-5) and math.isclose(norm, ref_norm, rel_tol=1e-5)


def test_async_save_needs_save():
    from megatron_ext.training.arguments import build_parser, validate
    from megatron_ext.training.run_config import ArgumentError

    with pytest.raises(ArgumentError, match="^--async-save needs --save$"):
        validate(build_parser().parse_args(["--model", "crystal-test", "--mock-data", "--async-save"]), 1)


@pytest.mark.parametrize(
    "keep,retain,kept",
    [(None, None, [1, 2, 3, 4, 5, 6]), (2, None, [5, 6]), (None, 2, [2, 4, 6]), (None, 4, [4, 6]), (1, 4, [4, 6]),
     (2, 4, [4, 5, 6])],
)  # fmt: skip
def test_pruning_keeps_the_newest_and_the_retained(tmp_path, keep, retain, kept):
    """--keep-last-checkpoints keeps the newest; Megatron-LM's --save-retain-interval keeps the multiples of
    its interval and the tracker's; both: the union. An abandoned checkpoint (past the tracker) goes."""
    from megatron_ext.checkpoint_files import prune_checkpoints

    for it in range(1, 8):
        (tmp_path / f"iter_{it:07d}").mkdir()
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("6")
    prune_checkpoints(str(tmp_path), keep, retain)
    left = sorted(int(p.name[5:]) for p in tmp_path.glob("iter_*"))
    assert left == (kept if keep or retain else kept + [7])


@pytest.mark.timeout(300)
def test_retained_async_saves_in_deterministic_mode_change_no_step(tmp_path):
    """Megatron-LM's --save-retain-interval 2 with a save every step, written in the background, in
    --deterministic-mode: the steps equal a plain run's; iter 2, 4 and the last, 5, remain; the resume from 4
    reproduces step 5. --use-persistent-ckpt-worker is refused on CPU in one line (Megatron-Core's persistent
    writer binds a GPU)."""
    from megatron_ext.training.arguments import ArgumentError, check_command_line

    with pytest.raises(ArgumentError, match="^--use-persistent-ckpt-worker needs a GPU"):
        check_command_line(
            TINY_RUN + ["--save", str(tmp_path / "x"), "--async-save", "--use-persistent-ckpt-worker"], 1
        )
    base = TINY_RUN + ["--train-iters", "5"]
    plain, _ = _run(tmp_path, "plain", base, nproc=1)
    ckpt = tmp_path / "ckpt"
    flags = ["--save", str(ckpt), "--save-interval", "1", "--save-retain-interval", "2", "--async-save",
             "--deterministic-mode"]  # fmt: skip
    saved, out = _run(tmp_path, "saved", base + flags, nproc=1)
    assert saved == plain and len(plain) == 5
    assert "deterministic mode (deterministic kernels only)" in out
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000002", "iter_0000004", "iter_0000005"]
    resumed, _ = _run(tmp_path, "resumed", base + ["--load", str(ckpt), "--ckpt-step", "4"], nproc=1)
    assert resumed == plain[4:]
