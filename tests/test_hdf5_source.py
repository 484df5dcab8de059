"""HDF5 sources in the released Crystal layout (data/hdf5_source.py) and Cerebras's order
(data/cerebras_order.py), on tiny files written here (width 64): the stream equals Cerebras's Mixture
written in this test from its description, through an epoch restart and a small source's wrap, at 0 and 2
DataLoader workers and after a resume at another data-parallel size; masks and labels are served as
stored; bad input is one line naming the file."""

import sys

import numpy as np
import pytest
import torch
from helpers.distributed_run import REPO
from helpers.released_layout import WIDTH, cerebras_reference, write_samples
from helpers.sample_rows import load_rows


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """big: two halves (even and odd chunk numbers) of 4 files x 5 samples; small: 1 file of 3 samples."""
    root = tmp_path_factory.mktemp("released")
    for chunk in range(4):
        half = "part0of2" if chunk % 2 == 0 else "part1of2"
        write_samples(root / f"big_{half}" / f"data-{chunk:05d}.h5", 100 + 10 * chunk, 5)
    write_samples(root / "small" / "data-00000.h5", 200, 3, shifted=False)
    return root


def _phases(tmp_path, tree, body: str, subset: str = "") -> str:
    path = tmp_path / "released.yaml"
    path.write_text(
        "sources:\n"
        f"  big: {{hdf5: [{tree / 'big_part0of2'}, {tree / 'big_part1of2'}]{subset}}}\n"
        f"  small: {{hdf5: [{tree / 'small'}]}}\n"
        "phases:\n" + body
    )
    return str(path)


def _load(path: str):
    from megatron_ext.data.phases_config import load_phases

    return load_phases(path, WIDTH, 4, 1, has_fim_tokens=False)


def test_files_are_read_in_file_name_order_across_the_halves(tmp_path, tree):
    from megatron_ext.data.hdf5_source import Hdf5Source

    config = _load(_phases(tmp_path, tree, "  - {iters: 2, blend: {big: 1}, lr: {peak: 1.0}}\n"))
    big = Hdf5Source(config.sources["big"], WIDTH)
    names = [p.split("/")[-1] for p in big.files.paths]
    assert names == [f"data-{c:05d}.h5" for c in range(4)] and big.samples_per_epoch == 20
    first_ids = [int(big.read(k)[0][0, 0]) for k in range(22)]
    assert first_ids == [100 + 10 * (k % 20 // 5) + k % 5 for k in range(22)]  # row by row, then again
    assert big.where(7) == (big.files.paths[1], 2)


def test_data_subset_keeps_cerebras_ranges(tmp_path, tree):
    from megatron_ext.data.hdf5_source import Hdf5Source

    path = _phases(tmp_path, tree, "  - {iters: 2, blend: {big: 1}, lr: {peak: 1.0}}\n", ", data_subset: 0.1-0.35")
    big = Hdf5Source(_load(path).sources["big"], WIDTH)
    assert big.samples_per_epoch == int(20 * 0.35) - int(20 * 0.1) == 5
    assert [int(big.read(k)[0][0, 0]) for k in range(5)] == [102, 103, 104, 110, 111]


@pytest.mark.parametrize("workers", [0, 2])
def test_cerebras_order_equals_the_mixture_through_a_restart_and_a_wrap(tmp_path, tree, workers):
    from megatron_ext.data.phase_schedule import PhaseSchedule
    from megatron_ext.data.phased_dataset import PhasedDataset

    body = "  - {iters: 12, global_batch_size: 4, blend: {big: 0.7, small: 0.3}, order: cerebras, seed: 1,\n"
    body += "     lr: {peak: 1.0}}\n"
    config = _load(_phases(tmp_path, tree, body))
    expected = cerebras_reference([20, 3], [0.7, 0.3], 1, 4, 12)
    refs = PhaseSchedule(config).take(48)
    names = config.source_names
    assert [(["big", "small"].index(names[r.source]), r.index) for r in refs] == expected
    small = [i for s, i in expected if s == 1]
    assert max(small) == 2 and len(small) > 3  # the small source wraps
    per_epoch = int(20 / 0.7) // 4 * 4
    assert expected[per_epoch] == expected[0]  # the epoch restarts
    dataset = PhasedDataset(config, WIDTH)
    tokens, masks = load_rows(dataset, refs, workers)
    first = {0: lambda i: 100 + 10 * (i // 5) + i % 5, 1: lambda i: 200 + i}
    assert tokens[:, 0].tolist() == [first[s](i) for s, i in expected]
    masked_rows = sum((i % 5 if s == 0 else i) % 2 for s, i in expected)  # odd rows of each file
    assert masks.sum().item() == WIDTH * len(refs) - 3 * masked_rows


def test_masks_and_labels_are_served_as_stored_and_unshifted_labels_counted(tmp_path, tree):
    import h5py

    from megatron_ext.data.phase_schedule import SampleRef
    from megatron_ext.data.phased_dataset import ROW_COUNTS, PhasedDataset

    config = _load(_phases(tmp_path, tree, "  - {iters: 2, blend: {big: 0.5, small: 0.5}, lr: {peak: 1.0}}\n"))
    dataset = PhasedDataset(config, WIDTH)
    with h5py.File(tree / "small" / "data-00000.h5") as f:
        stored = f["data"][1]
    item = dataset[SampleRef(0, config.source_names.index("small"), 1)]
    assert item["tokens"].tolist() == stored[0].tolist() and item["labels"].tolist() == stored[2].tolist()
    assert item["loss_mask"].tolist() == stored[1].astype(float).tolist()
    assert item["row_counts"][ROW_COUNTS.index("labels_not_next_input")] == 1
    big = dataset[SampleRef(0, config.source_names.index("big"), 0)]
    assert big["row_counts"].sum() == 0 and torch.equal(big["labels"][:-1], big["tokens"][1:])


def test_a_resume_at_another_data_parallel_size_reads_the_same_samples(tmp_path, tree):
    from megatron_ext.data.phase_schedule import PhaseSchedule
    from megatron_ext.data.phased_dataset import PhaseBatchSampler

    body = "  - {iters: 10, global_batch_size: 4, blend: {big: 0.7, small: 0.3}, order: cerebras, lr: {peak: 1.0}}\n"
    config = _load(_phases(tmp_path, tree, body))
    straight = PhaseSchedule(config)
    straight.take(4 * 3)
    state = straight.state_dict()
    resumed, note = PhaseSchedule.from_state_dict(config, state, 12)
    assert note is None

    def key(ref):
        return ref.phase, ref.source, ref.index

    at_two = [key(x) for r in (0, 1) for b in PhaseBatchSampler(resumed, 1, r, 2, 4) for x in b]
    at_one = [key(x) for b in PhaseBatchSampler(resumed, 2, 0, 1, 4) for x in b]
    assert sorted(at_two) == sorted(at_one) == sorted(key(x) for x in straight.take(16))
    assert at_one == [key(x) for x in PhaseSchedule.from_state_dict(config, state, 12)[0].take(16)]


@pytest.mark.parametrize("phase, step", [(0, 8), (1, 0), (1, 3), (1, 13), (2, 4)])
def test_a_jump_to_a_start_point_holds_the_replayed_state(tmp_path, tree, phase, step):
    """advance_to (--phases-start) leaves the schedule as next() sample by sample does: over a
    Cerebras-ordered phase with epoch restarts and wraps (a: epochs of 28 samples, 36 read; b: of 96, 112
    read), a blended phase, and phase switches."""
    from megatron_ext.data.phase_schedule import PhaseSchedule

    body = "  - {name: a, iters: 9, global_batch_size: 4, blend: {big: 0.7, small: 0.3}, order: cerebras,\n"
    body += "     lr: {peak: 1.0}}\n"
    body += "  - {name: b, iters: 14, global_batch_size: 8, blend: {big: 0.2, small: 0.8}, order: cerebras,\n"
    body += "     seed: 3, lr: {peak: 1.0}}\n"
    body += "  - {name: c, iters: 6, global_batch_size: 4, blend: {big: 0.5, small: 0.5}, lr: {peak: 1.0}}\n"
    config = _load(_phases(tmp_path, tree, body))
    replayed = PhaseSchedule(config)
    replayed.take(sum(p.samples for p in config.phases[:phase]) + step * config.phases[phase].global_batch_size)
    jumped = PhaseSchedule(config)
    jumped.advance_to(phase, step)
    state = jumped.state_dict()
    if step == 0:  # next() switches phase lazily, at the next sample; the jump has already switched
        assert (state["phase"], state["phase_sample"]) == (phase, 0)
        state.update(phase=phase - 1, phase_sample=config.phases[phase - 1].samples, counts=replayed.state.counts)
    assert state == replayed.state_dict()
    assert jumped.take(8) == replayed.take(8)


def test_a_cut_file_becomes_a_row_without_loss_counted(tmp_path, tree):
    import shutil

    from megatron_ext.data.phase_schedule import SampleRef
    from megatron_ext.data.phased_dataset import ROW_COUNTS, PhasedDataset

    copy = tmp_path / "copy"
    shutil.copytree(tree / "small", copy / "small")
    shutil.copytree(tree / "big_part0of2", copy / "big_part0of2")
    shutil.copytree(tree / "big_part1of2", copy / "big_part1of2")
    config = _load(_phases(tmp_path, copy, "  - {iters: 2, blend: {big: 1}, lr: {peak: 1.0}}\n"))
    dataset = PhasedDataset(config, WIDTH)
    victim = copy / "big_part1of2" / "data-00001.h5"
    victim.write_bytes(victim.read_bytes()[:2000])  # damaged after start-up
    item = dataset[SampleRef(0, config.source_names.index("big"), 6)]
    assert item["row_counts"][ROW_COUNTS.index("unreadable")] == 1 and item["loss_mask"].sum() == 0
    assert dataset[SampleRef(0, config.source_names.index("big"), 0)]["row_counts"].sum() == 0


def test_bad_input_is_one_line_naming_the_file(tmp_path, tree):
    import h5py

    from megatron_ext.data.phases_config import PhasesConfigError, load_phases

    bad = tmp_path / "bad"
    (bad / "not_hdf5").mkdir(parents=True)
    (bad / "not_hdf5" / "data-00000.h5").write_text("not an HDF5 file")
    (bad / "cut").mkdir()
    write_samples(bad / "cut" / "data-00000.h5", 0, 4)
    whole = (bad / "cut" / "data-00000.h5").read_bytes()
    (bad / "cut" / "data-00000.h5").write_bytes(whole[: len(whole) // 3])
    (bad / "shape").mkdir()
    with h5py.File(bad / "shape" / "data-00000.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((2, 2, WIDTH), dtype="f4"))
    (bad / "empty").mkdir()
    with h5py.File(bad / "empty" / "data-00000.h5", "w") as f:
        f.create_dataset("data", data=np.zeros((0, 3, WIDTH), dtype="i4"))
    (bad / "none").mkdir()
    blend = "phases:\n  - {iters: 1, blend: {s: 1}, lr: {peak: 1.0}}\n"
    cases = {
        f"{{hdf5: [{bad / 'missing'}]}}": f"sources.s.hdf5: {bad / 'missing'}: no such directory",
        f"{{hdf5: [{bad / 'none'}]}}": f"sources.s.hdf5: no *.h5 files in {bad / 'none'}",
        f"{{hdf5: [{bad / 'not_hdf5'}]}}": f"{bad / 'not_hdf5' / 'data-00000.h5'}: not a readable HDF5 file",
        f"{{hdf5: [{bad / 'cut'}]}}": f"{bad / 'cut' / 'data-00000.h5'}: not a readable HDF5 file",
        f"{{hdf5: [{bad / 'shape'}]}}": "'data' is float32 of shape (2, 2, 64); expected integers of shape (n, 3",
        f"{{hdf5: [{bad / 'empty'}]}}": "sources.s.hdf5: the source's 1 file(s) hold no samples",
        f"{{hdf5: [{tree / 'small'}], data_subset: 0.5-1.5}}": "data_subset: '0.5-1.5': ranges must be increasing",
        f"{{hdf5: [{tree / 'small'}], data_subset: 0.1-0.2}}": "data_subset: '0.1-0.2' keeps none of the 3 samples",
    }
    for source, message in cases.items():
        path = tmp_path / "p.yaml"
        path.write_text(f"sources:\n  s: {source}\n" + blend)
        with pytest.raises(PhasesConfigError) as e:
            load_phases(str(path), WIDTH, 4, 1, has_fim_tokens=True)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    path = tmp_path / "p.yaml"
    path.write_text(f"sources:\n  s: {{hdf5: [{tree / 'small'}]}}\n" + blend)
    with pytest.raises(PhasesConfigError, match="its samples are 64 tokens wide .*run with --seq-length 64"):
        load_phases(str(path), 2048, 4, 1, has_fim_tokens=True)
    path.write_text(
        f"sources:\n  s: {{hdf5: [{tree / 'small'}]}}\n"
        "phases:\n  - {iters: 1, blend: {s: 1}, fim: {s: {fim_rate: 0.5}}, lr: {peak: 1.0}}\n"
    )
    with pytest.raises(PhasesConfigError, match="phases\\[0\\].fim.s: an hdf5 source's samples are used as they are"):
        load_phases(str(path), WIDTH, 4, 1, has_fim_tokens=True)


def test_data_trace_names_hdf5_samples_as_file_and_row(tmp_path, tree, capsys):
    """tools/data_trace.py on a Cerebras-ordered phase: each sample as FILE:ROW, and with --ids its rows as
    stored (the labels of the small source's unshifted row too)."""
    import json

    import h5py

    sys.path.insert(0, str(REPO / "tools"))
    import data_trace

    body = "  - {iters: 3, global_batch_size: 4, blend: {big: 0.7, small: 0.3}, order: cerebras, lr: {peak: 1.0}}\n"
    phases = _phases(tmp_path, tree, body)
    flags = ["--phases", phases, "--seq-length", str(WIDTH), "--global-batch-size", "4", "--steps", "2-3"]
    assert data_trace.main(flags) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = cerebras_reference([20, 3], [0.7, 0.3], 1, 4, 3)[4:]
    got = [s["sample"] for line in lines for s in line["samples"]]
    big = sorted([*(tree / "big_part0of2").glob("*.h5"), *(tree / "big_part1of2").glob("*.h5")], key=lambda p: p.name)
    small = tree / "small" / "data-00000.h5"
    assert got == [f"{big[i // 5]}:{i % 5}" if s == 0 else f"{small}:{i}" for s, i in expected]
    tokenizer = str(REPO / "data" / "demo" / "crystal_demo.model")
    assert data_trace.main([*flags, "--ids", "--tokenizer-model", tokenizer]) == 0
    first = json.loads(capsys.readouterr().out.splitlines()[0])["samples"][0]
    path, row = first["sample"].rsplit(":", 1)
    with h5py.File(path) as f:
        stored = f["data"][int(row)]
    assert (first["ids"], first["loss_mask"], first["labels"]) == tuple(r.tolist() for r in stored)
    assert isinstance(first["text"], str) and first["text"]


def test_build_data_cache_names_hdf5_sources_and_builds_the_indexed_ones(tmp_path, tree, capsys):
    """tools/build_data_cache.py on a phases file with both kinds: an HDF5 source has nothing to build."""
    sys.path.insert(0, str(REPO / "tools"))
    import build_data_cache

    body = "  - {iters: 3, global_batch_size: 4, blend: {big: 0.7, small: 0.3}, order: cerebras, lr: {peak: 1.0}}\n"
    body += "  - {iters: 2, global_batch_size: 4, blend: {big: 0.5, code: 0.5}, lr: {peak: 1.0}}\n"
    path = tmp_path / "mixed.yaml"
    text = (
        open(_phases(tmp_path, tree, body))
        .read()
        .replace("phases:\n", f"  code: {{prefixes: [{REPO / 'data' / 'demo' / 'code_text_document'}]}}\nphases:\n")
    )
    path.write_text(text)
    cache = tmp_path / "cache"
    flags = ["--phases", str(path), "--seq-length", str(WIDTH), "--data-cache-path", str(cache)]
    assert build_data_cache.main(flags) == 0
    out = capsys.readouterr().out
    assert "build_data_cache.py: big: HDF5, 20 samples in 4 file(s): nothing to build" in out
    assert "build_data_cache.py: small: HDF5, 3 samples in 1 file(s): nothing to build" in out
    assert "build_data_cache.py: code: " in out and (cache / "phases").is_dir()
