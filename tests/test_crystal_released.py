"""Crystal as Cerebras ran it: examples/phases/crystal_released.yaml over a tiny tree in the layout of
LLM360/CrystalCoderDatasets (the params.yaml weights, Cerebras's order at the first step of each phase and
at the last step of phase 3, after many epoch restarts), both recipe files' learning rate at every phase's
first, boundary and last steps against Cerebras's chained Linear schedulers, and a run started at a phase's
step N on the weights of another (--pretrained-checkpoint, --phases-start), which reads and learns as the
uninterrupted run does."""

import json
import os
import re
import shutil
import sys

import pytest
from helpers.distributed_run import REPO, read_metrics, train
from helpers.released_layout import WIDTH, cerebras_reference, write_samples

EXAMPLE = REPO / "examples" / "phases" / "crystal_released.yaml"
SETS = ("ArXiv", "Book", "C4", "CommonCrawl", "Github", "StackExchange", "Wikipedia")
LANGUAGES = ("css", "javascript", "html", "python")

# LLM360/crystalcoder-train pretrain/params/phase{1,2,3}/params.yaml (master), transcribed: the mixture
# (data_dir, weight) and the learning-rate schedulers (initial, end, steps), run one after the other.
PHASE1 = [(f"phase1/SlimPajama/{s}_train_packed_part0of2", w) for s, w in zip(SETS, (
    0.043251179622600486, 0.0413121881861869, 0.2665010054745754, 0.5334581653397988, 0.04962588209760537,
    0.03168034115317788, 0.03417123812605512))]  # fmt: skip
PHASE2 = [(f"phase2/SlimPajama/{s}_train_packed_part1of2", w) for s, w in zip(SETS, (
    0.016083857723861224, 0.015358576352403003, 0.09909981505117808, 0.1983897689052003, 0.018454606218343703,
    0.011784941022274698, 0.012710859995188247))] + [("phase2/StarCoder_fim_shuffled", 0.6281175747315507)]  # fmt: skip
PHASE3 = [(f"phase3/stage3_fim_0.3/train_shuffled_correct_ratio/{lang}", w) for lang, w in zip(LANGUAGES, (
    0.08792775542527535, 0.18370762129027085, 0.18536747298179254, 0.34270089587947816))] + [
    (f"SlimPajama/{s}_train_packed", w) for s, w in zip(("ArXiv", "Book", "C4", "CommonCrawl", "StackExchange",
    "Wikipedia"), (0.016663255966286664, 0.00831444671835677, 0.01685693658811707, 0.058282893778895735,
    0.008379821974060706, 0.05835852419497722))] + [("StarCoder_fim_train_shuffled", 0.0334403752024888)]  # fmt: skip
SCHEDULERS = [
    [(0.0, 0.012, 86), (0.012, 0.00012408, 294337)],
    [(0.0, 0.0087825, 86), (0.0087825, 0.00013679, 214301)],
    [(0.0, 0.002, 276), (0.002, 0.0002, 27452)],
]
ITERS = (79721, 214387, 27728)
# Samples per directory of the tiny tree: enough for a phase's epoch to hold whole batches of 2112
# (phase 3's: two), a few elsewhere.
BIG = {
    "phase1/SlimPajama/CommonCrawl_train_packed_part0of2": 1200,
    "phase2/StarCoder_fim_shuffled": 1400,
    "phase3/stage3_fim_0.3/train_shuffled_correct_ratio/python": 1500,
}


def cerebras_lr(schedulers, step: int) -> float:
    start = 0
    for initial, end, steps in schedulers:
        if step < start + steps:
            return initial + (end - initial) * (step - start) / steps
        start += steps
    return schedulers[-1][1]


@pytest.fixture(scope="module")
def crystal_data(tmp_path_factory):
    """The released tree, one or two files per directory (two halves' chunk numbers interleave)."""
    root = tmp_path_factory.mktemp("CrystalCoderDatasets")
    first = 0
    for path, _ in PHASE1 + PHASE2[:-1]:
        chunk = 0 if "part0of2" in path else 1
        for n in (chunk, chunk + 2):
            write_samples(root / path / f"data-{n:05d}.h5", first, BIG.get(path, 6) // 2)
            first += 1000
    for path, _ in PHASE2[-1:] + PHASE3[:4]:
        write_samples(root / path / "data-00000.h5", first, BIG.get(path, 4))
        first += 2000
    return root


def _samples(root, directory: str) -> int:
    """A mixture directory's samples as Cerebras 2.0.2 counts them: every file's rows; a data_subset 0.0-0.1
    (phase 3's SlimPajama, both halves, and StarCoder) keeps int(0.1 n) of them."""
    import h5py

    if directory.startswith("SlimPajama/"):
        dirs, tenth = [root / f"phase{i + 1}" / f"{directory}_part{i}of2" for i in (0, 1)], True
    elif directory == "StarCoder_fim_train_shuffled":
        dirs, tenth = [root / "phase2" / "StarCoder_fim_shuffled"], True
    else:
        dirs, tenth = [root / directory], False
    rows = 0
    for d in dirs:
        for f in d.glob("*.h5"):
            with h5py.File(f) as h:
                rows += h["data"].shape[0]
    return int(rows * 0.1) if tenth else rows


def _source_files(config, name, root):
    return [os.path.relpath(p, root) for p in config.sources[name].hdf5_files.paths]


def test_the_released_recipe_reads_the_release_tree_with_params_weights(crystal_data, monkeypatch):
    from megatron_ext.data.phases_config import load_phases

    monkeypatch.setenv("CRYSTAL_DATA", str(crystal_data))
    config = load_phases(str(EXAMPLE), WIDTH, 2112, 1234, has_fim_tokens=True)
    assert [p.iters for p in config.phases] == list(ITERS)
    for phase, mixture in zip(config.phases, (PHASE1, PHASE2, PHASE3)):
        assert (phase.order, phase.order_seed, phase.global_batch_size, phase.fim) == ("cerebras", 1, 2112, {})
        assert len(phase.blend) == len(mixture)
        total = sum(w for _, w in mixture)
        for (directory, weight), (name, got) in zip(mixture, phase.blend.items()):
            assert got == pytest.approx(weight / total, rel=1e-12), name
            source, files = config.sources[name], _source_files(config, name, crystal_data)
            if directory.startswith("SlimPajama/"):  # phase 3's unsplit set: both halves, sorted by file name
                assert source.data_subset == ((0.0, 0.1),)
                halves = [f"phase{i + 1}/{directory}_part{i}of2" for i in (0, 1)]
                assert files == [f"{halves[n % 2]}/data-{n:05d}.h5" for n in range(4)]
            elif directory == "StarCoder_fim_train_shuffled":  # taken to be the released StarCoder_fim_shuffled
                assert source.data_subset == ((0.0, 0.1),)
                assert files == ["phase2/StarCoder_fim_shuffled/data-00000.h5"]
            else:
                assert source.data_subset is None
                assert {f.rsplit("/", 1)[0] for f in files} == {directory}


def _trace(step: int, capsys) -> list[tuple[str, int]]:
    sys.path.insert(0, str(REPO / "tools"))
    import data_trace

    assert data_trace.main(["--phases", str(EXAMPLE), "--seq-length", str(WIDTH), "--steps", f"{step}-{step}"]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["step"] == step
    return [(s["source"], s["index"]) for s in line["samples"]]


def test_data_trace_reads_cerebras_order_at_each_phase_start_and_the_last_step(crystal_data, monkeypatch, capsys):
    """Through the public tool, which jumps to a step without replaying the ones before it."""
    import yaml

    monkeypatch.setenv("CRYSTAL_DATA", str(crystal_data))
    blends = [list(p["blend"]) for p in yaml.safe_load(EXAMPLE.read_text())["phases"]]
    firsts = [1, 1 + ITERS[0], 1 + ITERS[0] + ITERS[1]]
    for step, phase in zip([*firsts, sum(ITERS)], (0, 1, 2, 2)):
        mixture = (PHASE1, PHASE2, PHASE3)[phase]
        lengths = [_samples(crystal_data, directory) for directory, _ in mixture]
        expected = cerebras_reference(lengths, [w for _, w in mixture], 1, 2112, 2)
        assert len(expected) == 2 * 2112
        batch = (step - firsts[phase]) % 2 if phase == 2 else 0  # phase 3's epoch: 2 batches; 1 for the others
        assert step != sum(ITERS) or batch == 1
        want = [(blends[phase][s], i) for s, i in expected[2112 * batch : 2112 * (batch + 1)]]
        assert _trace(step, capsys) == want, step


@pytest.mark.parametrize("name", ["crystal.yaml", "crystal_released.yaml"])
def test_each_phase_lr_is_cerebras_chained_schedulers(crystal_data, tmp_path, monkeypatch, name):
    """Every phase of both recipe files, on Megatron-Core's scheduler as the run drives it (phase_lr):
    equal to params.yaml's schedulers to 1e-9 relative at the first, warm-up boundary and last steps (and
    the warm-up's every step by stepping, as the loop does)."""
    import torch
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_ext.data.phases_config import load_phases
    from megatron_ext.training import phase_lr

    monkeypatch.setenv("CRYSTAL_DATA", str(crystal_data))
    text = (REPO / "examples" / "phases" / name).read_text()
    text = re.sub(r"/data/[\w/]+_text_document", str(REPO / "data" / "demo" / "code_text_document"), text)
    path = tmp_path / name
    path.write_text(text)
    config = load_phases(str(path), WIDTH, 2112, 1234, has_fim_tokens=True)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = OptimizerParamScheduler(optimizer, 0.0, 1.0, 0.0, 0, 10, "linear", 0.1, 0.1, 10, "constant")

    def lr():
        return optimizer.param_groups[0]["lr"]

    for phase, schedulers, iters in zip(config.phases, SCHEDULERS, ITERS):
        warmup = schedulers[0][2]
        assert phase.iters == iters
        for step in (0, 1, warmup - 1, warmup, warmup + 1, iters // 2, iters - 2, iters - 1):
            phase_lr.apply_phase(scheduler, phase, step, 0.1)
            assert lr() == pytest.approx(cerebras_lr(schedulers, step), rel=1e-9, abs=1e-15), (phase.name, step)
        phase_lr.apply_phase(scheduler, phase, 0, 0.1)
        for step in range(warmup + 2):
            assert lr() == pytest.approx(cerebras_lr(schedulers, step), rel=1e-9, abs=1e-15), (phase.name, step)
            scheduler.step(increment=1)
    phase_lr.apply_phase(scheduler, config.phases[0], ITERS[0] - 1, 0.1)
    assert lr() == pytest.approx(8.786924e-3, abs=1e-9)  # phase 1's last step (decay_iters 294337: 8.785985e-3)


# --- a run started at a phase's step N ----------------------------------------------------------------

RUN = [
    "--model", "crystal-test", "--seq-length", str(WIDTH), "--micro-batch-size", "2", "--num-workers", "0",
    "--log-interval", "1", "--log-data-hash", "--seed", "7",
]  # fmt: skip


@pytest.fixture(scope="module")
def two_phases(tmp_path_factory):
    """Two Cerebras-ordered phases of 4 steps of 4 samples over two tiny sources (masks 0 on odd rows' ends)."""
    root = tmp_path_factory.mktemp("two_phases")
    write_samples(root / "big" / "data-00000.h5", 100, 12)
    write_samples(root / "small" / "data-00000.h5", 200, 5)
    path = root / "phases.yaml"
    path.write_text(
        f"sources:\n  big: {{hdf5: [{root / 'big'}]}}\n  small: {{hdf5: [{root / 'small'}]}}\n"
        "phases:\n"
        "  - {name: a, iters: 4, global_batch_size: 4, order: cerebras, blend: {big: 0.7, small: 0.3},\n"
        "     lr: {peak: 2.0e-2, min: 2.0e-3, warmup_iters: 1}}\n"
        "  - {name: b, iters: 4, global_batch_size: 4, order: cerebras, seed: 5, blend: {big: 0.4, small: 0.6},\n"
        "     lr: {peak: 1.0e-2, min: 1.0e-3, warmup_iters: 2}}\n"
    )
    return path


def _run(tmp_path, name, flags, env_extra=None):
    metrics = tmp_path / f"{name}.jsonl"
    done = train(1, RUN + flags + ["--metrics-jsonl", str(metrics)], env_extra=env_extra)
    return {r["iteration"]: r for r in read_metrics(metrics)}, done.stdout


@pytest.mark.launch
@pytest.mark.timeout(400)
def test_a_run_started_at_phase_step_n_reads_and_learns_as_the_uninterrupted_run(tmp_path, two_phases):
    phases = ["--phases", str(two_phases)]
    straight, _ = _run(tmp_path, "straight", phases + ["--save", str(tmp_path / "s"), "--save-interval", "5"])
    # The weights after step 5 (phase b, step 1) as an import would hold them: a root with that checkpoint.
    weights = tmp_path / "weights"
    shutil.copytree(tmp_path / "s" / "iter_0000005", weights / "iter_0000005")
    (weights / "latest_checkpointed_iteration.txt").write_text("5")
    own = tmp_path / "own"
    start = phases + ["--pretrained-checkpoint", str(weights), "--phases-start", "b:1"]
    start += ["--save", str(own), "--load", str(own), "--save-interval", "100"]
    started, out = _run(tmp_path, "started", start + ["--exit-interval", "7"])
    assert "took the weights of --pretrained-checkpoint" in out and "started at phase b after its step 1" in out
    assert sorted(started) == [6, 7]
    for i in (6, 7):  # the same samples and lr; the first loss on the same weights is the same
        assert (started[i]["data_hash"], started[i]["lr"], started[i]["phase"]) == (
            straight[i]["data_hash"], straight[i]["lr"], "b"), i  # fmt: skip
    assert started[6]["lm_loss"] == straight[6]["lm_loss"]
    # The same command again (a requeue): its own checkpoint, not the start point.
    requeued, out = _run(tmp_path, "requeued", start)
    assert "--phases-start b:1: not taken, the run resumed its checkpoint" in out
    assert sorted(requeued) == [8] and requeued[8]["data_hash"] == straight[8]["data_hash"]


@pytest.mark.launch
@pytest.mark.timeout(400)
def test_loss_normalization_positions_divides_by_every_position(tmp_path, two_phases):
    """Cerebras's divisor: the same per-token loss logged; the gradient scaled by unmasked / positions
    (step 1's samples: the reference order; odd rows of a file have their last 3 positions masked)."""
    phases = ["--phases", str(two_phases), "--train-iters", "1"]
    tokens, _ = _run(tmp_path, "tokens", phases)
    positions, _ = _run(tmp_path, "positions", phases + ["--loss-normalization", "positions"])
    first = cerebras_reference([12, 5], [0.7, 0.3], 1, 4, 1)
    unmasked = sum(WIDTH - 3 * (index % 2) for _, index in first)
    assert unmasked < 4 * WIDTH
    assert positions[1]["lm_loss"] == tokens[1]["lm_loss"]
    assert positions[1]["grad_norm"] == pytest.approx(tokens[1]["grad_norm"] * unmasked / (4 * WIDTH), rel=1e-5)


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_loss_normalization_is_the_same_without_masked_positions(tmp_path):
    """Mock data masks nothing: both divisors give the same run, step for step."""
    mock = ["--mock-data", "--global-batch-size", "4", "--train-iters", "3", "--lr", "1e-2", "--lr-warmup-iters", "1"]
    tokens, _ = _run(tmp_path, "tokens", mock)
    positions, _ = _run(tmp_path, "positions", mock + ["--loss-normalization", "positions"])
    for i in (1, 2, 3):
        assert (positions[i]["lm_loss"], positions[i]["grad_norm"]) == (tokens[i]["lm_loss"], tokens[i]["grad_norm"])
