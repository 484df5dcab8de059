"""Phases: exact blending, per-source positions across phases and epochs, FIM, validation, kill + resume."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers.distributed_run import REPO, layout_flags, read_metrics, torchrun_command, train
from helpers.sample_rows import load_rows

from megatron_ext.data.phase_schedule import PhaseSchedule
from megatron_ext.data.phases_config import (
    FimSpec,
    LRSpec,
    PhasesConfig,
    PhasesConfigError,
    PhaseSpec,
    SourceSpec,
    load_phases,
)

DEMO = REPO / "data" / "demo"
TOKENIZER = DEMO / "crystal_demo.model"
SMALL = REPO / "tests" / "data" / "phases_small.yaml"


def _config(phases, sources=("a", "b", "c"), prefixes=None):
    # The schedule reads no documents, but the fingerprint reads the files' shapes: any real prefix will do.
    specs = {n: SourceSpec(n, (prefixes or {}).get(n, (str(DEMO / "text_text_document"),))) for n in sources}
    return PhasesConfig("test.yaml", 7, 0.0, specs, tuple(phases))


def _phase(name, iters, blend, gbs=8, fim=None):
    return PhaseSpec(name, iters, gbs, blend, fim or {}, LRSpec(peak=1e-3))


def test_blending_is_megatrons_rule_and_within_one_sample():
    from megatron.core.datasets import helpers

    weights = {"a": 0.5335, "b": 0.2665, "c": 0.2}
    config = _config([_phase("p", 125, weights)])
    refs = PhaseSchedule(config).take(1000)
    got = np.array([r.source for r in refs])
    expected, sample_index = np.zeros(1000, dtype=np.int16), np.zeros(1000, dtype=np.int64)
    helpers.build_blending_indices(expected, sample_index, np.array(list(weights.values())), 3, 1000, False)
    assert (got == expected).all()
    assert ([r.index for r in refs] == sample_index).all()
    counts = np.zeros(3)
    for i, source in enumerate(got, start=1):
        counts[source] += 1
        assert np.all(np.abs(counts - np.array(list(weights.values())) * i) <= 1.0), (i, counts)


def test_sources_continue_across_phases():
    config = _config(
        [
            _phase("one", 10, {"a": 0.5, "b": 0.5}),
            _phase("two", 5, {"b": 1.0}),
            _phase("three", 10, {"a": 0.25, "b": 0.25, "c": 0.5}, gbs=4),
        ]
    )
    schedule = PhaseSchedule(config)
    refs = schedule.take(80 + 40 + 40)
    for source in range(3):
        indices = [r.index for r in refs if r.source == source]
        assert indices == list(range(len(indices))), source  # continues; never restarts, never skips
    assert [sum(r.source == s for r in refs if r.phase == 0) for s in range(3)] == [40, 40, 0]
    assert {r.source for r in refs if r.phase == 1} == {1}
    assert schedule.state.positions == {"a": 50, "b": 90, "c": 20}
    with pytest.raises(StopIteration):
        schedule.next()


@pytest.mark.launch
def test_resuming_the_schedule_continues_it_and_an_edited_file_keeps_positions():
    config = _config([_phase("one", 10, {"a": 0.3, "b": 0.7}), _phase("two", 10, {"a": 0.5, "c": 0.5})])
    straight = PhaseSchedule(config).take(160)
    first = PhaseSchedule(config)
    head = first.take(48)
    resumed, note = PhaseSchedule.from_state_dict(config, first.state_dict(), 48)
    assert note is None and head + resumed.take(112) == straight

    edited = _config([_phase("one", 10, {"a": 0.9, "b": 0.1}), _phase("two", 10, {"a": 0.5, "c": 0.5})])
    moved, note = PhaseSchedule.from_state_dict(edited, first.state_dict(), 48)
    assert "changed" in note
    rest = moved.take(30)
    for source, name in enumerate("abc"):  # each source continues exactly where the saved run left it
        indices = [r.index for r in rest if r.source == source]
        assert indices == list(range(first.state.positions[name], first.state.positions[name] + len(indices)))
    assert sum(r.source == 0 for r in rest) == 27  # the new weights, from the resume point


def test_an_edited_batch_size_of_the_phase_in_progress_is_refused_not_mixed():
    """Saved after 3 steps of 16 in phase one; the edited file says 32: sample 48 is not a step boundary
    of it, and continuing would put phase-one and phase-two samples in one global batch."""
    config = _config([_phase("one", 4, {"a": 1.0}, gbs=16), _phase("two", 4, {"b": 1.0}, gbs=16)])
    first = PhaseSchedule(config)
    first.take(48)
    edited = _config([_phase("one", 4, {"a": 1.0}, gbs=32), _phase("two", 4, {"b": 1.0}, gbs=16)])
    with pytest.raises(
        PhasesConfigError,
        match=r"^test\.yaml: phases\[0\] \('one'\)\.global_batch_size 32: the checkpoint "
        r"stands at sample 48 of this phase, not a whole number of its batches",
    ):
        PhaseSchedule.from_state_dict(edited, first.state_dict(), 48)
    later = _config([_phase("one", 4, {"a": 1.0}, gbs=16), _phase("two", 4, {"b": 1.0}, gbs=32)])
    resumed, note = PhaseSchedule.from_state_dict(later, first.state_dict(), 48)  # a later phase's: fine
    assert "changed" in note and [r.phase for r in resumed.take(16 + 32)] == [0] * 16 + [1] * 32


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """Ten documents of distinct known tokens, each ending with EOD (2)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path_factory.mktemp("tiny") / "docs"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    docs = [list(range(100 * d + 10, 100 * d + 10 + 5 + 3 * d)) + [2] for d in range(10)]
    for doc in docs:
        builder.add_document(torch.tensor(doc), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix), docs


def test_epochs_cover_every_document_once_then_reshuffle(tiny_source):
    from megatron_ext.data.source_stream import SourceStream

    prefix, docs = tiny_source
    stream = SourceStream(SourceSpec("tiny", (prefix,)), seq_length=8, seed=3)
    total = sum(map(len, docs))
    assert stream.tokens_per_epoch == total and stream.samples_per_epoch == (total - 1) // 8

    def epoch_tokens(epoch):
        spe = stream.samples_per_epoch
        positions = [stream.locate(epoch * spe + i) for i in range(spe)]
        assert sorted(j for _, j in positions) == list(range(spe)) and {e for e, _ in positions} == {epoch}
        assert [j for _, j in positions] != list(range(spe))  # read in a shuffled order
        by_position = {j: stream.sample(epoch * spe + i)[0] for i, (_, j) in enumerate(positions)}
        rows = [by_position[j] for j in range(spe)]
        assert all(np.array_equal(rows[j], stream.packed(epoch, j)[0]) for j in range(spe))
        return np.concatenate([rows[0]] + [r[1:] for r in rows[1:]]).tolist()  # samples overlap by one token

    orders = []
    for epoch in range(3):
        tokens = epoch_tokens(epoch)
        firsts = [t for t in tokens if t % 100 == 10]  # the first token of each document
        assert len(firsts) == len(set(firsts))  # no document twice within an epoch
        order = [f // 100 for f in firsts]
        expected = [t for d in order for t in docs[d]]
        assert tokens == expected[: len(tokens)]  # whole documents, back to back, in the epoch's order
        assert total - 8 <= len(tokens) <= total  # only a tail shorter than a sample is left out
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # a new shuffle per epoch
    assert stream.consumed(stream.samples_per_epoch)["epoch"] == 1


def _fim_config(rate, spm):
    sources = {"code": SourceSpec("code", (str(DEMO / "code_text_document"),))}
    phase = PhaseSpec("p", 10, 8, {"code": 1.0}, {"code": FimSpec(rate, spm)} if rate else {}, LRSpec(peak=1e-3))
    return PhasesConfig("fim.yaml", 11, 0.0, sources, (phase,))


def _dataset(rate, spm=0.5, seq=128):
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.tokenizer import CrystalTokenizer

    assert TOKENIZER.is_file(), "the demo corpus is built by `make setup`"
    return PhasedDataset(_fim_config(rate, spm), seq, CrystalTokenizer(str(TOKENIZER)))


def test_fim_is_the_same_for_any_worker_count_and_access_order():
    dataset = _dataset(rate=0.9)
    refs = PhaseSchedule(dataset.config).take(32)
    one = load_rows(dataset, refs, 0)
    four = load_rows(dataset, refs, 4)
    backwards = [dataset[r] for r in reversed(refs)][::-1]
    assert torch.equal(one[0], four[0]) and torch.equal(one[1], four[1])
    assert torch.equal(one[0], torch.stack([b["tokens"] for b in backwards]))
    fim_prefix = dataset.fim_ids.prefix
    assert (one[0] == fim_prefix).sum() > 10  # FIM did happen


def test_fim_rate_zero_leaves_documents_untouched():
    plain, fim0 = _dataset(rate=0.0), _dataset(rate=0.0)
    refs = PhaseSchedule(plain.config).take(16)
    for ref in refs:
        row, _, _ = plain.streams[0].sample(ref.index)
        item = fim0[ref]
        assert item["tokens"].tolist() == row[:-1].tolist() and item["loss_mask"].all()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """The demo SentencePiece model as a tokenizers JSON file with Crystal's special tokens: the exported
    tokenizer's form (megatron_ext/tokenizer/hf_pipeline.py)."""
    from megatron_ext.tokenizer.hf_pipeline import save_tokenizer_json

    path = tmp_path_factory.mktemp("tokenizer_json") / "tokenizer.json"
    save_tokenizer_json(str(TOKENIZER), str(path))
    return path


FIM_TEXTS = [
    "def area(r):\n    return 3.14159 * r * r\n\nprint(area(2))\n",
    "  indented  twice\tand a tab, caf\u00e9 \u2603 \U0001f600 <|fim_prefix|> typed as text\n\n\n",
]


@pytest.mark.parametrize("form", ["sentencepiece", "tokenizer_json"])
def test_fim_layouts_reassemble_the_document(form, request):
    """prefix + middle + suffix, as ids, decode to the document byte for byte (after <|fim_prefix|>, as an
    infilling prompt starts): no part gains a dummy-prefix space. Decoding the parts one by one, as this
    test once did, cannot see such a space."""
    from megatron_ext.data.fim import FimTokenIds, permute_document
    from megatron_ext.data.run_transforms import RunText
    from megatron_ext.tokenizer import build_tokenizer

    if form == "sentencepiece":
        tok = build_tokenizer("CrystalTokenizer", str(TOKENIZER))
    else:
        tok = build_tokenizer("HuggingFaceTokenizer", str(request.getfixturevalue("tokenizer_json")))
    ids = FimTokenIds.of(tok)
    assert ids is not None
    seen = set()
    for raw in FIM_TEXTS:
        text = tok.decode(tok.encode(raw))  # what apply_fim decodes a document run to
        for seed in range(40):
            for spm in (0.0, 1.0):
                out = permute_document(RunText(text), np.random.default_rng(seed), spm, tok, ids)
                if spm:  # <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle
                    assert out[:2] == [ids.prefix, ids.suffix]
                    suffix, prefix_middle = _split(out[2:], ids.middle)
                else:  # <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
                    assert out[0] == ids.prefix
                    prefix, rest = _split(out[1:], ids.suffix)
                    suffix, middle = _split(rest, ids.middle)
                    prefix_middle = prefix + middle
                assert tok.decode([ids.prefix, *prefix_middle, *suffix]) == "<|fim_prefix|>" + text, (seed, spm)
                seen.add(spm)
    assert seen == {0.0, 1.0}
    # The demo's 'return 3.14159 * r * r': the parts are pieces of ordinary text, no phantom '▁'.
    if form == "sentencepiece":
        assert [tok.sp.IdToPiece(i) for i in tok.encode_after_special("3.14159")][0] == "3"
        assert [tok.sp.IdToPiece(i) for i in tok.encode_after_special(" * r")] == ["\u2581*", "\u2581r"]


def _split(tokens, marker):
    i = tokens.index(marker)
    return tokens[:i], tokens[i + 1 :]


def test_fim_pads_short_rows_without_loss():
    from megatron_ext.data.fim import apply_fim
    from megatron_ext.data.source_stream import Segment

    dataset = _dataset(rate=1.0)
    tok, ids = dataset.tokenizer, dataset.fim_ids
    # One character per token: re-encoding the FIM parts merges them, so the row comes out short.
    text = "\u2581" + "\u2581".join(["print", "hello", "world"] * 4)
    row = np.array([tok.sp.piece_to_id(c) for c in text] + [2], dtype=np.int64)
    assert tok.unk not in row.tolist()
    seg = [Segment(doc_id=0, doc_offset=0, start=0, length=len(row), ends_document=True)]
    out, mask, _ = apply_fim(row, seg, 1.0, 0.0, (1, 2, 3), tok, ids)
    assert len(out) == len(row) and len(mask) == len(row) - 1
    first_pad = int((out == ids.pad).nonzero()[0][0])
    assert first_pad > 5 and (out[first_pad:] == ids.pad).all() and out[first_pad - 1] == 2  # EOD kept
    assert mask[: first_pad - 1].all() and not mask[first_pad - 1 :].any()  # no loss on padding labels


@pytest.mark.launch
def test_config_errors_name_the_file_and_key(tmp_path):
    def write(text):
        path = tmp_path / "p.yaml"
        path.write_text(text)
        return str(path)

    good_sources = (
        f"sources:\n  text: {{prefixes: [{DEMO / 'text_text_document'}]}}\n"
        f"  code: {{prefixes: [{DEMO / 'code_text_document'}]}}\n"
    )
    cases = {
        "phases:\n  - {iters: 1, blend: {cod: 1}, lr: {peak: 1.0}}\n": "phases[0].blend: unknown source 'cod'",
        "phases:\n  - {iters: 1, blend: {text: -1}, lr: {peak: 1.0}}\n": "phases[0].blend.text: -1 must be >= 0.0",
        "phases:\n  - {iters: 1, blend: {text: 0, code: 0}, lr: {peak: 1.0}}\n": (
            "phases[0].blend: the weights are all zero"
        ),
        "phases:\n  - {iters: 0, blend: {text: 1}, lr: {peak: 1.0}}\n": "phases[0]: a phase of zero length",
        "phases:\n  - {iters: 2, blend: {code: 1}, fim: {code: {fim_rate: 0.5}}, lr: {peak: 1.0}}\n": (
            "phases[0].fim.code.fim_rate: FIM needs a tokenizer with <|fim_prefix|>"
        ),
        "phases:\n  - {iters: 2, blend: {code: 1}, lr: {peak: 1.0, decay_style: cubic}}\n": (
            "decay_style: 'cubic' is not one of"
        ),
    }
    for body, message in cases.items():
        path = write(good_sources + body)
        with pytest.raises(PhasesConfigError, match=None) as e:
            load_phases(path, 32, 8, 1, has_fim_tokens=False)
        assert str(e.value).startswith(path) and message in str(e.value), str(e.value)
    path = write("sources:\n  text: {prefixes: [/no/such/prefix]}\nphases: []\n")
    with pytest.raises(PhasesConfigError, match=r"sources\.text\.prefixes: /no/such/prefix\.bin does not exist"):
        load_phases(path, 32, 8, 1, has_fim_tokens=True)

    # PyYAML reads 5e-1 (no exponent sign after a dot-less mantissa) as a string: every numeric field takes it.
    config = load_phases(
        write(
            good_sources + "phases:\n  - {tokens: 2e3, blend: {text: 5e-1, code: 15e-1}, "
            "lr: {peak: 1e-2, min: 1e-3, warmup_iters: 1, decay_iters: 4}}\n"
        ),
        32,
        8,
        1,
        False,
    )
    phase = config.phases[0]
    assert phase.blend == {"text": 0.25, "code": 0.75} and phase.iters == 8  # ceil(2000 / (8 x 32))
    assert (phase.lr.peak, phase.lr.min, phase.decay_iters) == (1e-2, 1e-3, 4)

    # Through the entry point: one line, before any process group or model.
    proc = subprocess.run(
        [
            sys.executable,
            "pretrain_crystal.py",
            "--model",
            "crystal-test",
            "--phases",
            write(good_sources + "phases:\n  - {iters: 2, blend: {cod: 1}, lr: {peak: 1.0}}\n"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "phases[0].blend: unknown source 'cod'" in proc.stderr


# --- whole runs ---------------------------------------------------------------------------------------

RUN = [
    "--model",
    "crystal-test",
    "--phases",
    str(SMALL),
    "--tokenizer-model",
    str(TOKENIZER),
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "8",
    "--num-workers",
    "1",
    "--log-interval",
    "1",
    "--seed",
    "7",
    "--log-data-hash",
]


def _metrics(nproc, tmp, name, extra):
    path = tmp / f"{name}.jsonl"
    train(nproc, RUN + ["--data-cache-path", str(tmp / "cache"), "--metrics-jsonl", str(path), *extra])
    return {r["iteration"]: r for r in read_metrics(path)}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("straight")
    evaluation = [
        "--eval-interval",
        "5",
        "--eval-samples-per-source",
        "6",
        "--eval-results-jsonl",
        str(tmp / "eval.jsonl"),
    ]
    metrics = _metrics(2, tmp, "straight", evaluation)
    metrics["eval"] = read_metrics(tmp / "eval.jsonl")
    return metrics


@pytest.mark.launch
def test_validation_is_per_source_in_bits_per_byte(straight):
    """Each source on its own held-out samples, the same ones at every evaluation: loss and bits per byte
    (with the standard error over samples), one record per figure."""
    records = straight["eval"]
    assert {(r["iteration"], r["task"], r["metric"]) for r in records} == {
        (i, task, metric)
        for i in (5, 10)
        for task, metric in [("valid", "loss"), ("valid/text", "loss"), ("valid/text", "bpb"),
                             ("valid/code", "loss"), ("valid/code", "bpb")]
    }  # fmt: skip
    by = {(r["iteration"], r["task"], r["metric"]): r for r in records}
    for task in ("valid/text", "valid/code"):
        assert by[5, task, "loss"]["n"] == by[10, task, "loss"]["n"] == 6 * 32  # tokens: the same samples
        assert by[5, task, "bpb"]["n"] == 6 and 0 < by[5, task, "bpb"]["stderr"] < by[5, task, "bpb"]["value"]
        # Nats per token to bits per byte: the demo tokenizer's pieces average 2 to 5 bytes.
        ratio = by[5, task, "loss"]["value"] / math.log(2) / by[5, task, "bpb"]["value"]
        assert 2 < ratio < 5, ratio
        assert by[10, task, "bpb"]["value"] < by[5, task, "bpb"]["value"]  # trained on: better on held-out text
    assert {r["phase"] for r in records if r["iteration"] == 5} == {"text+code"}
    assert all(r["run"] and r["tokens"] == r["iteration"] * 8 * 32 for r in records)


@pytest.mark.launch
@pytest.mark.timeout(600)
def test_validation_is_the_same_at_every_layout(tmp_path):
    """The per-source validation and the tasks of the same weights at (TP, PP, DP) = (1, 1, 1) and (2, 2, 2)
    with interleaving (a chunk between the first and the last stage: it gets the packed rows' positions
    alone), and with the tasks' requests packed (the default: several arc_easy requests, two LAMBADA ones
    a row of 256) or one per row: within 1e-5. The 8-rank run resumes the single-process run's checkpoint
    of step 1, trains step 2 and evaluates; so does the unpacked single-process run. There only tensor rank 0
    of each stage's data-parallel ranks reads data (4 of 8 ranks), broadcasting to its tensor group: step 2
    reads the same samples (data hash) with the same loss, per source too."""
    ckpt, one, eight = tmp_path / "ckpt", tmp_path / "one.jsonl", tmp_path / "eight.jsonl"
    common = [*RUN, "--data-cache-path", str(tmp_path / "cache"), "--train-iters", "2", "--eval-interval", "1"]
    common += ["--seq-length", "256", "--eval-samples-per-source", "4"]
    common += ["--eval-tasks", "arc_easy:6,lambada:8,infill_single_gold:4"]
    steps_one, steps_eight = tmp_path / "steps_one.jsonl", tmp_path / "steps_eight.jsonl"
    # Weights 4x the initialisation's: attention over another request would move the figures well past 1e-5.
    scaled = {"CRYSTAL_TEST_SCALE_INIT": "4"}
    single = train(1, [*common, "--save", str(ckpt), "--save-interval", "1", "--eval-results-jsonl", str(one),
                       "--metrics-jsonl", str(steps_one)], env_extra=scaled)  # fmt: skip
    spread = train(
        8,
        [
            *common,
            *layout_flags(tp=2, pp=2, vp_layers=1),
            "--load",
            str(ckpt),
            "--ckpt-step",
            "1",
            "--eval-results-jsonl",
            str(eight),
            "--metrics-jsonl",
            str(steps_eight),
        ],
        timeout=500,
        env_extra=scaled,
    )
    unpacked = tmp_path / "unpacked.jsonl"
    train(1, [*common, "--load", str(ckpt), "--ckpt-step", "1", "--no-eval-pack-requests", "--eval-results-jsonl",
              str(unpacked)], env_extra=scaled)  # fmt: skip
    want = {(r["task"], r["metric"]): r["value"] for r in read_metrics(one) if r["iteration"] == 2}
    assert len(want) == 5 + 4  # validation; arc_easy acc, acc_norm; LAMBADA and infilling bpb
    for other in (eight, unpacked):
        got = {(r["task"], r["metric"]): r["value"] for r in read_metrics(other)}
        assert set(got) == set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-5), (other.name, key)
    assert "data: read on 1 of 1 ranks" in single.stdout and "data: read on 4 of 8 ranks" in spread.stdout
    [step_one] = [r for r in read_metrics(steps_one) if r["iteration"] == 2]
    [step_eight] = read_metrics(steps_eight)
    assert step_eight["data_hash"] == step_one["data_hash"]
    assert step_eight["source_tokens"] == step_one["source_tokens"]
    assert step_eight["lm_loss"] == pytest.approx(step_one["lm_loss"], rel=1e-5)
    for name, loss in step_one["source_losses"].items():
        assert step_eight["source_losses"][name] == pytest.approx(loss, rel=1e-5), name


@pytest.mark.launch
def test_phases_switch_inside_one_run(straight):
    assert [straight[i]["phase"] for i in range(1, 11)] == ["text"] * 4 + ["text+code"] * 6
    # Per source with tokens in the step: its mean loss, and the tokens under their own name.
    assert all(set(straight[i]["source_losses"]) == set(straight[i]["source_tokens"]) == {"text"} for i in range(1, 5))
    assert all(set(straight[i]["source_losses"]) == {"text", "code"} for i in range(5, 11))
    for i, row in straight.items():
        if i == "eval":
            continue
        tokens = sum(row["source_tokens"].values())
        mean = sum(row["source_losses"][n] * t for n, t in row["source_tokens"].items()) / tokens
        assert mean == pytest.approx(row["lm_loss"], rel=1e-5) and 0 < tokens <= 8 * 32
    losses = [straight[i]["lm_loss"] for i in range(1, 11)]
    assert losses[3] < losses[0]


def _kill_after(checkpoint_iteration, tmp, ckpt):
    """Run with a checkpoint every step and SIGKILL the whole job once `checkpoint_iteration` is saved."""
    cmd, env = torchrun_command(
        2, [*RUN, "--data-cache-path", str(tmp / "cache"), "--save", str(ckpt), "--save-interval", "1"]
    )
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 240
    try:
        while not (
            tracker.exists()
            and tracker.read_text().strip().isdigit()
            and int(tracker.read_text()) >= checkpoint_iteration
        ):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.2)
    finally:
        # torchrun starts each worker in a session of its own: killing torchrun's group alone left the
        # workers training on (and saving into ckpt) while the test resumed from it.
        import psutil

        tree = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for child in tree:
            with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        proc.wait()
        psutil.wait_procs(tree, timeout=30)


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_run_resumes_the_same_stream(straight, tmp_path):
    """SIGKILL mid-phase 2, then resume from the phase boundary (iteration 4) at the same DP size and from
    mid-phase (iteration 6) at DP 1: every step reads the same tokens; the losses are bitwise equal on the
    same layout and within 1e-5 on the other."""
    ckpt = tmp_path / "ckpt"
    _kill_after(7, tmp_path, ckpt)
    data_state = (ckpt / "iter_0000006" / "data_state.json").read_text()
    assert '"phase": "text+code"' in data_state and '"realised_mixture"' in data_state
    # The runs FIM chose in steps 1-6, counted over both ranks' readers, as replaying the rows counts them.
    import json

    from megatron_ext.data.phase_schedule import PhaseSchedule
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.data.run_transforms import OUTCOMES
    from megatron_ext.tokenizer import CrystalTokenizer

    config = load_phases(str(SMALL), 32, 8, 7, has_fim_tokens=True)
    dataset = PhasedDataset(config, 32, CrystalTokenizer(str(TOKENIZER)))
    replayed = {name: [0] * len(OUTCOMES) for name in config.source_names}
    for ref in PhaseSchedule(config).take(6 * 8):
        counts = dataset[ref]["row_counts"][: len(OUTCOMES)].tolist()
        name = config.source_names[ref.source]
        replayed[name] = [a + b for a, b in zip(replayed[name], counts)]
    books = json.loads(data_state)["sources"]
    assert {n: list(books[n]["rewritten_runs"].values()) for n in replayed} == replayed
    assert sum(replayed["code"]) > 0 and sum(replayed["text"]) == 0

    # The data trace replays the stream from the checkpoint's schedule: its samples hash to what ran.
    _check_trace(straight, ["--steps", "7-8", "--load", str(ckpt), "--ckpt-step", "6"], [7, 8])

    for step, nproc, exact in ((4, 2, True), (6, 1, False)):
        resumed = _metrics(nproc, tmp_path, f"from{step}", ["--load", str(ckpt), "--ckpt-step", str(step)])
        assert sorted(resumed) == list(range(step + 1, 11))
        for i, got in resumed.items():
            ref = straight[i]
            assert got["data_hash"] == ref["data_hash"] and got["phase"] == ref["phase"], i
            assert got["lr"] == pytest.approx(ref["lr"], rel=1e-12)
            if exact:
                assert (got["lm_loss"], got["grad_norm"]) == (ref["lm_loss"], ref["grad_norm"]), i
            else:
                assert got["lm_loss"] == pytest.approx(ref["lm_loss"], rel=1e-5), i
                assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), i


def test_example_recipes_encode_crystal(tmp_path):
    """examples/phases/*.yaml parse (with the corpus paths pointed at the demo data) and crystal.yaml holds
    the recipe's figures."""
    import re

    for name in ("crystal", "code_cooldown", "demo"):
        text = (REPO / "examples" / "phases" / f"{name}.yaml").read_text()
        text = re.sub(r"/data/[\w/]+_text_document", str(DEMO / "code_text_document"), text)
        text = text.replace("[data/demo/", f"[{DEMO}/")
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        config = load_phases(str(path), 2048, 2112, 1234, has_fim_tokens=True)
        if name == "crystal":
            one, two, three = config.phases
            assert [p.iters for p in config.phases] == [79721, 214387, 27728]
            assert {p.global_batch_size for p in config.phases} == {2112}
            assert (one.lr.peak, one.lr.min, one.lr.warmup_iters, one.decay_iters) == (0.012, 1.2408e-4, 86, 294423)
            assert (two.lr.peak, two.lr.min, two.lr.warmup_iters) == (0.0087825, 1.3679e-4, 86)
            assert (three.lr.peak, three.lr.min, three.lr.warmup_iters) == (0.002, 2e-4, 276)
            released = [0.5335, 0.2665, 0.0496, 0.0433, 0.0413, 0.0342, 0.0317]  # sums to 1.0001: normalised
            assert one.blend["sp_even_cc"] == pytest.approx(0.5335 / sum(released)) and not one.fim
            assert two.blend == pytest.approx({"sp_odd": 0.372, "starcoder": 0.628})
            assert two.fim == {"starcoder": FimSpec(0.9, 0.5)}
            assert three.blend["starcoder_python"] == pytest.approx(
                0.3427 / sum([0.3427, 0.1854, 0.1837, 0.0879, 0.167, 0.033])
            )
            assert {f.rate for f in three.fim.values()} == {0.3}
        if name == "demo":
            assert config.phases[0].iters <= 60 and config.phases[1].fim["code"].rate > 0


def _check_trace(straight, flags, steps):
    import json

    from megatron_ext.data.phase_schedule import SampleRef
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.tokenizer import CrystalTokenizer
    from megatron_ext.training.loop import sample_hash

    proc = subprocess.run(
        [
            sys.executable,
            "tools/data_trace.py",
            "--phases",
            str(SMALL),
            "--seq-length",
            "32",
            "--global-batch-size",
            "8",
            "--seed",
            "7",
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["step"] for line in lines] == steps
    config = load_phases(str(SMALL), 32, 8, 7, has_fim_tokens=True)
    dataset = PhasedDataset(config, 32, CrystalTokenizer(str(TOKENIZER)))
    names = config.source_names
    for line in lines:
        assert line["phase"] == straight[line["step"]]["phase"] and len(line["samples"]) == 8
        refs = [SampleRef(s["phase_index"], names.index(s["source"]), s["index"]) for s in line["samples"]]
        assert sum(sample_hash(dataset[r]["tokens"]) for r in refs) == straight[line["step"]]["data_hash"]
        assert all(run[2] > 0 for s in line["samples"] for run in s["runs"])
        if "--ids" in flags:  # what the model read, after FIM: the inputs hash to what the run trained on
            import torch

            inputs = [torch.tensor(s["ids"][:-1]) for s in line["samples"]]
            assert sum(sample_hash(t) for t in inputs) == straight[line["step"]]["data_hash"]
            assert all(len(s["ids"]) == 33 and isinstance(s["text"], str) for s in line["samples"])
    return lines


@pytest.mark.launch
def test_data_trace_names_the_documents_of_each_step(straight):
    _check_trace(straight, ["--steps", "3-6"], [3, 4, 5, 6])


@pytest.mark.launch
def test_data_trace_ids_are_what_the_model_read_with_the_rewritten_runs_marked(straight):
    """Phase 2 has FIM on code at rate 0.5: --ids prints each row after FIM, and marks its runs."""
    lines = _check_trace(straight, ["--steps", "5-8", "--ids", "--tokenizer-model", str(TOKENIZER)], [5, 6, 7, 8])
    marks = [run[3] for line in lines for s in line["samples"] for run in s["runs"] if s["source"] == "code"]
    assert {None, "rewritten"} <= set(marks) or {None, "shortened"} <= set(marks), marks
    assert all(run[3] is None for line in lines for s in line["samples"] for run in s["runs"] if s["source"] == "text")
    tok_ids = next(s["ids"] for line in lines for s in line["samples"] if any(r[3] for r in s["runs"]))
    assert 8000 in tok_ids  # <|fim_prefix|> (the demo model's 8000 pieces, then Crystal's specials)


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_moving_the_corpus_keeps_the_stream(tmp_path):
    """The fingerprint is what the stream depends on, not the files' location: a resume with the corpus
    copied elsewhere continues the same samples (it once restarted the blending rule, another stream)."""
    moved = tmp_path / "lustre"
    moved.mkdir()
    text = SMALL.read_text()
    for name in ("text_text_document", "code_text_document"):
        for ext in (".bin", ".idx"):
            (moved / (name + ext)).write_bytes((DEMO / (name + ext)).read_bytes())
        text = text.replace(f"data/demo/{name}", str(moved / name))
    phases = tmp_path / "moved.yaml"
    phases.write_text(text)
    flags = [a if a != str(SMALL) else str(phases) for a in RUN]
    straight = _metrics(1, tmp_path, "straight", ["--train-iters", "8"])
    ckpt = tmp_path / "ckpt"
    _metrics(1, tmp_path, "first", ["--train-iters", "8", "--exit-interval", "3", "--save", str(ckpt)])
    out = train(
        1,
        flags
        + [
            "--train-iters",
            "8",
            "--load",
            str(ckpt),
            "--metrics-jsonl",
            str(tmp_path / "moved.jsonl"),
            "--data-cache-path",
            str(tmp_path / "cache"),
        ],
    )
    assert "phases file changed" not in out.stdout + out.stderr
    resumed = read_metrics(tmp_path / "moved.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(4, 9))
    for row in resumed:
        ref = straight[row["iteration"]]
        assert (row["data_hash"], row["lm_loss"]) == (ref["data_hash"], ref["lm_loss"]), row["iteration"]


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_max_epochs_refusal_is_one_line_and_counts_the_run(tmp_path):
    """The demo's code is 619 samples of 2049 tokens: 100 steps of 8 read 1.29 epochs of it, more than
    max_epochs 1; a run stopped at 50 steps reads 0.65 and goes ahead."""
    phases = tmp_path / "epochs.yaml"
    phases.write_text(
        f"sources:\n  code: {{prefixes: [{DEMO / 'code_text_document'}], max_epochs: 1}}\n"
        "phases:\n  - {name: code, iters: 100, blend: {code: 1}, lr: {peak: 1.0e-3}}\n"
    )
    flags = [
        "--model",
        "crystal-test",
        "--seq-length",
        "2048",
        "--phases",
        str(phases),
        "--num-workers",
        "0",
        "--tokenizer-model",
        str(TOKENIZER),
        "--global-batch-size",
        "8",
        "--micro-batch-size",
        "8",
    ]
    refused = train(1, flags, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1] == (
        f"pretrain_crystal.py: error: {phases}: sources.code.max_epochs 1: the run's 100 iterations read 1.29 "
        "epochs of it (619 samples each; all the phases: 1.29)"
    )
    assert "Traceback" not in refused.stderr
    train(1, flags + ["--train-iters", "1"])  # 0.01 epochs: trains
    refused = train(1, flags + ["--train-iters", "78"], check=False)  # 625 samples: just over one epoch
    assert refused.returncode == 2 and "the run's 78 iterations read 1.01 epochs" in refused.stderr


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_sources_sharing_files_are_named_and_counted_per_file(tmp_path):
    """Two sources over the same text file (as crystal.yaml's sp_odd / sp_no_github): a start-up warning
    names them and the file, and data_state.json counts the documents read per file over both."""
    text, code = DEMO / "text_text_document", DEMO / "code_text_document"
    phases = tmp_path / "shared.yaml"
    phases.write_text(
        f"sources:\n  prose: {{prefixes: [{text}]}}\n  mixed: {{prefixes: [{text}, {code}]}}\n"
        "phases:\n  - {name: p, iters: 1, blend: {prose: 0.5, mixed: 0.5}, lr: {peak: 1.0e-3}}\n"
    )
    ckpt = tmp_path / "ckpt"
    run = train(
        1,
        [
            "--model",
            "crystal-test",
            "--seq-length",
            "2048",
            "--phases",
            str(phases),
            "--tokenizer-model",
            str(TOKENIZER),
            "--num-workers",
            "0",
            "--global-batch-size",
            "8",
            "--micro-batch-size",
            "8",
            "--save",
            str(ckpt),
        ],
    )
    warning = next(line for line in run.stdout.splitlines() if line.startswith("warning:"))
    assert warning == (
        f"warning: {phases}: sources prose and mixed share 1 file(s) ({os.path.realpath(text)}): each "
        "keeps its own read position, so their documents can be read twice; data_state.json counts "
        "the documents read per file"
    )
    import json

    books = json.loads((ckpt / "iter_0000001" / "data_state.json").read_text())
    prose, mixed = books["sources"]["prose"], books["sources"]["mixed"]
    assert set(prose["documents_per_file"]) == {str(text)} and set(mixed["documents_per_file"]) == {
        str(text),
        str(code),
    }
    shared = books["files"][str(text)]
    assert shared["sources"] == ["prose", "mixed"] and shared["documents_read"] > 0
    assert shared["documents_read"] == prose["documents_per_file"][str(text)] + mixed["documents_per_file"][str(text)]
    assert books["files"][str(code)]["documents_read"] == mixed["documents_per_file"][str(code)]


def _assert_resumes_steps_6_and_7(tmp_path, ckpt, straight, extra=()):
    """A run of this code resumed from ckpt (saved at step 5) reads and trains steps 6-7 as straight did."""
    resumed = _metrics(1, tmp_path, "resumed", ["--train-iters", "7", "--load", str(ckpt), *extra])
    assert sorted(resumed) == [6, 7]
    for i in (6, 7):
        assert (resumed[i]["data_hash"], resumed[i]["lm_loss"], resumed[i]["lr"]) == (
            straight[i]["data_hash"],
            straight[i]["lm_loss"],
            straight[i]["lr"],
        )


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_a_checkpoint_of_the_layout_before_the_state_registry_resumes(tmp_path):
    """Checkpoints written before the stateful parts were saved by name kept the data stream and the update
    guard under keys of their own (consumed_samples, data_state, guard_state): rewritten into that layout,
    a checkpoint still resumes the same stream and losses."""
    straight = _metrics(1, tmp_path, "straight", ["--train-iters", "7"])
    ckpt = tmp_path / "ckpt"
    _metrics(1, tmp_path, "first", ["--train-iters", "7", "--exit-interval", "5", "--save", str(ckpt)])
    common_path = ckpt / "iter_0000005" / "common.pt"
    common = torch.load(common_path, weights_only=False)
    data, guard = common.pop("data"), common.pop("update_guard")
    del common["parts"]
    common.update(consumed_samples=data["consumed_samples"], data_state=data["schedule"], guard_state=guard)
    torch.save(common, common_path)
    (common_path.parent / "integrity.json").unlink()  # that revision wrote no manifest
    _assert_resumes_steps_6_and_7(tmp_path, ckpt, straight)


PRE_REGISTRY = "da316b7"  # the last revision whose checkpoints were written without the states registry


@pytest.mark.launch
@pytest.mark.timeout(300)
def test_a_checkpoint_of_the_revision_before_the_registry_resumes(tmp_path):
    """A checkpoint saved by PRE_REGISTRY's code (taken from git and run here) resumes with this code: the
    same stream, losses and lr as a run of this code that never stopped."""
    import io
    import subprocess
    import sys
    import tarfile

    from helpers.distributed_run import free_port, subprocess_environment

    archive = subprocess.run(["git", "archive", PRE_REGISTRY], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"this checkout has no history to read revision {PRE_REGISTRY} from (a source archive?)")
    old = tmp_path / "old"
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(old, filter="data")
    # Without FIM: the online transforms changed since (runs inside a document keep their text, answers are
    # not cut), so the two revisions' FIM rows differ; what is tested here is the checkpoint's layout.
    causal = tmp_path / "causal.yaml"
    causal.write_text("".join(line for line in SMALL.read_text().splitlines(True) if "fim:" not in line))
    run = [str(causal) if flag == str(SMALL) else flag for flag in RUN]
    straight = _metrics(1, tmp_path, "straight", ["--train-iters", "7", "--phases", str(causal)])
    ckpt, first = tmp_path / "ckpt", tmp_path / "first.jsonl"
    flags = run + ["--data-cache-path", str(tmp_path / "cache"), "--train-iters", "7", "--exit-interval", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-port", str(free_port()),
           str(old / "pretrain_crystal.py"), *flags, "--save", str(ckpt), "--metrics-jsonl", str(first)]  # fmt: skip
    env = {**subprocess_environment(), "PYTHONPATH": str(old)}  # the old revision's package, not this one
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (ckpt / "run_config.json").exists()  # written by the old code indeed
    _assert_resumes_steps_6_and_7(tmp_path, ckpt, straight, ["--phases", str(causal)])
