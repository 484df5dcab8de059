"""CodeGen2's span corruption (data/span_corruption.py): the ids decode to the document byte for byte in
three tokenizer forms, the layout is CodeGen2's, the stream is the same for any worker count, access order
and after a resume, the rate is realised, the loss covers every token but padding, and the phases file
refuses what cannot run in one line each."""

import math

import numpy as np
import pytest
import torch
from helpers.distributed_run import REPO
from helpers.sample_rows import load_rows
from helpers.tokenizer_forms import FORMS, build_form

from megatron_ext.data.phase_schedule import PhaseSchedule
from megatron_ext.data.phases_config import (
    FimSpec,
    LRSpec,
    PhasesConfig,
    PhasesConfigError,
    PhaseSpec,
    SourceSpec,
    SpanCorruptionSpec,
    load_phases,
)

DEMO = REPO / "data" / "demo"
TOKENIZER = DEMO / "crystal_demo.model"
TEXTS = [
    "def area(r):\n    return 3.14159 * r * r\n\nprint(area(2))\n",
    "  indented  twice\tand a tab, caf\u00e9 \u2603 \U0001f600 <mask_1> typed as text <eom>\n\n\n",
]


@pytest.fixture(scope="module", params=FORMS)
def tok(request, tmp_path_factory):
    return build_form(request.param, tmp_path_factory.mktemp(request.param), TEXTS)


def _after(tok, special: int, ids: list[int]) -> str:
    """The text of ids as they decode right after a special token (no dummy-prefix space)."""
    return tok.decode([special, *ids])[len(tok.decode([special])) :]


def _reassemble(out: list[int], tok, ids) -> str:
    """The document back from CodeGen2's layout: the corrupted text up to <eod> <sep>, then each
    <mask_i> span <eom> put where <mask_i> stands."""
    end = out.index(tok.eod)
    assert out[end + 1] == ids.sep and out[-1] == ids.eom
    corrupted, answers = out[:end], out[end + 2 :]
    spans, i = {}, 0
    while i < len(answers):
        close = answers.index(ids.eom, i)
        spans[answers[i]] = _after(tok, answers[i], answers[i + 1 : close])
        i = close + 1
    cuts = [j for j, t in enumerate(corrupted) if t in spans]
    assert [corrupted[j] for j in cuts] == list(ids.masks[: len(cuts)]) == list(spans)  # <mask_1>, <mask_2>, ...
    text = tok.decode(corrupted[: cuts[0]]) if cuts[0] else ""  # the document's start
    for n, j in enumerate(cuts):
        stop = cuts[n + 1] if n + 1 < len(cuts) else len(corrupted)
        text += spans[corrupted[j]] + _after(tok, corrupted[j], corrupted[j + 1 : stop])
    return text


def test_the_layout_decodes_to_the_document_byte_for_byte(tok):
    from megatron_ext.data.run_transforms import RunText
    from megatron_ext.data.span_corruption import SentinelIds, corrupt_document
    from megatron_ext.tokenizer import CrystalTokenizer

    ids = SentinelIds.of(tok)
    assert ids is not None and len(ids.masks) == 8
    spans_seen = set()
    # A sentinel typed in a document is ordinary text for SentencePiece; a Hugging Face tokenizer reads it
    # as the special token (docs/release.md), so that form gets the text without it.
    typed = isinstance(tok, CrystalTokenizer)
    for raw in TEXTS if typed else [t.replace("<mask_1>", "mask").replace("<eom>", "eom") for t in TEXTS]:
        text = tok.decode(tok.encode(raw))  # what apply_span_corruption decodes a document run to
        for seed in range(60):
            out = corrupt_document(RunText(text), np.random.default_rng(seed), 8, 0.5, tok, ids)
            assert _reassemble(out, tok, ids) == text, seed
            spans_seen.add(sum(t in ids.masks for t in out) // 2)
    assert spans_seen == set(range(1, 9))  # one to eight spans, as drawn


def test_a_document_too_short_to_cut_stays_as_it_is(tok):
    from megatron_ext.data.run_transforms import RunText
    from megatron_ext.data.span_corruption import SentinelIds, corrupt_document

    ids = SentinelIds.of(tok)
    assert corrupt_document(RunText("x"), np.random.default_rng(0), 8, 0.5, tok, ids) is None


def _config(rate, fim=False):
    sources = {"code": SourceSpec("code", (str(DEMO / "code_text_document"),))}
    spans = {"code": SpanCorruptionSpec(rate)} if rate else {}
    fims = {"code": FimSpec(0.9, 0.5)} if fim else {}
    phase = PhaseSpec("p", 10, 8, {"code": 1.0}, fims, LRSpec(peak=1e-3), spans)
    return PhasesConfig("spans.yaml", 11, 0.0, sources, (phase,))


def _dataset(rate, seq=128):
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.tokenizer import CrystalTokenizer

    return PhasedDataset(_config(rate), seq, CrystalTokenizer(str(TOKENIZER)))


def test_the_stream_is_the_same_for_any_worker_count_access_order_and_resume():
    dataset = _dataset(rate=0.9)
    refs = PhaseSchedule(dataset.config).take(32)
    one, two = load_rows(dataset, refs, 0), load_rows(dataset, refs, 2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    backwards = [dataset[r] for r in reversed(refs)][::-1]
    assert torch.equal(one[0], torch.stack([b["tokens"] for b in backwards]))
    # A resumed run: a fresh dataset and the schedule restored from its state at sample 16.
    first = PhaseSchedule(dataset.config)
    first.take(16)
    resumed, note = PhaseSchedule.from_state_dict(dataset.config, first.state_dict(), 16)
    assert note is None
    rest = load_rows(_dataset(rate=0.9), resumed.take(16), 2)
    assert torch.equal(rest[0], one[0][16:]) and torch.equal(rest[1], one[1][16:])
    ids = dataset.sentinel_ids
    assert (one[0] == ids.sep).sum() > 5 and (one[0] == ids.masks[0]).sum() > 10  # corruption did happen


def test_the_rate_is_realised_and_the_loss_covers_every_token_but_padding():
    """10^4 one-document rows at rate 0.3: the corrupted share within 4 standard errors; every label but
    the padding's is scored, the sentinels' spans and <eom> included."""
    from megatron_ext.data.source_stream import Segment
    from megatron_ext.data.span_corruption import apply_span_corruption

    dataset = _dataset(rate=0.3)
    tok, ids = dataset.tokenizer, dataset.sentinel_ids
    doc = np.array([*tok.encode("def f(x):\n    return x + 1\n"), tok.eod], dtype=np.int64)
    tokens = np.concatenate([doc, np.zeros(3 * len(doc), dtype=np.int64)])  # room for the whole layout
    spec, n, corrupted, checked = SpanCorruptionSpec(0.3), 10_000, 0, 0
    for doc_id in range(n):
        seg = [Segment(doc_id=doc_id, doc_offset=0, start=0, length=len(doc), ends_document=True)]
        out, mask, _ = apply_span_corruption(tokens, seg, spec, (1, 2, 3), tok, ids)
        if ids.sep not in out.tolist():
            assert out[: len(doc)].tolist() == doc.tolist()
            continue
        corrupted += 1
        if checked < 50:
            checked += 1
            length = int((out != ids.pad).sum())
            assert (out[length:] == ids.pad).all() and out[length - 1] == tok.eod  # the document's own end
            assert mask[: length - 1].all() and not mask[length - 1 :].any()  # all but padding labels
            assert out[length - 2] == ids.eom  # the last span's <eom> is a scored label
    assert abs(corrupted / n - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n), corrupted / n


def test_the_phases_file_refuses_what_cannot_run_in_one_line(tmp_path):
    sources = f"sources:\n  code: {{prefixes: [{DEMO / 'code_text_document'}]}}\n"

    def load(body, sentinels):
        path = tmp_path / "p.yaml"
        path.write_text(sources + "phases:\n  - {iters: 2, blend: {code: 1}, lr: {peak: 1.0}, " + body + "}\n")
        return load_phases(str(path), 32, 8, 1, has_fim_tokens=True, sentinels=sentinels)

    cases = {
        ("span_corruption: {code: {rate: 0.5}}", 0): "span corruption needs a tokenizer with CodeGen2's <mask_1>",
        ("span_corruption: {code: {rate: 0.5}}, fim: {code: {fim_rate: 0.5}}", 8): (
            "phases[0].span_corruption.code: source 'code' has FIM in this phase too"
        ),
        ("span_corruption: {code: {rate: 0.5, max_spans: 9}}", 8): "max_spans: 9 is more than the tokenizer's 8",
        ("span_corruption: {code: {rate: 1.5}}", 8): "phases[0].span_corruption.code.rate",
        ("span_corruption: {text: {rate: 0.5}}", 8): "span_corruption.text: unknown source 'text'",
        ("span_corruption: {code: {ratio: 0.5}}", 8): "span_corruption.code",
    }
    for (body, sentinels), message in cases.items():
        with pytest.raises(PhasesConfigError) as e:
            load(body, sentinels)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    config = load("span_corruption: {code: {rate: 0.5, max_spans: 4}}", 8)
    assert config.phases[0].span_corruption == {"code": SpanCorruptionSpec(0.5, 4, 0.5)}
    # Without the key a phase is as it was before the key existed: the fingerprint does not move.
    plain = load("fim: {}", 8)
    assert plain.fingerprint() == _config_fingerprint_without_the_key(plain)


def _config_fingerprint_without_the_key(config):
    import dataclasses
    import hashlib
    import json

    from megatron_ext.data.indexed_files import file_shape

    sources = {
        n: {"files": [file_shape(p) for p in s.prefixes], "subset": s.subset, "max_epochs": s.max_epochs}
        for n, s in config.sources.items()
    }
    phases = [
        # The phase's fields before span_corruption (and the later order / order_seed) existed.
        {k: v for k, v in dataclasses.asdict(p).items() if k not in ("lr", "span_corruption", "order", "order_seed")}
        for p in config.phases
    ]
    described = {"seed": config.seed, "validation_fraction": config.validation_fraction, "sources": sources,
                 "phases": phases}  # fmt: skip
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[: len(config.fingerprint())]


def test_the_command_line_refuses_fim_and_span_corruption_on_one_source_in_one_line(tmp_path):
    import subprocess
    import sys

    from helpers.distributed_run import subprocess_environment

    phases = (REPO / "examples" / "phases" / "demo.yaml").read_text()
    both = phases.replace("    fim: {code: {fim_rate: 0.5, fim_spm_rate: 0.5}}",
                          "    fim: {code: {fim_rate: 0.5}}\n    span_corruption: {code: {rate: 0.5}}")  # fmt: skip
    assert both != phases
    path = tmp_path / "both.yaml"
    path.write_text(both.replace("data/demo/", f"{DEMO}/"))
    command = [sys.executable, "pretrain_crystal.py", "--model", "crystal-tiny", "--tokenizer-model", str(TOKENIZER),
               "--phases", str(path), "--check-args"]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=subprocess_environment(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == (
        f"pretrain_crystal.py: error: {path}: phases[1].span_corruption.code: source 'code' has FIM in this "
        "phase too; a source takes one of the two\n"
    )


def test_a_refused_start_leaves_no_directory(tmp_path):
    """A phases file refused in one line (more spans than the tokenizer's sentinels) leaves nothing under
    --save: the data cache's directory is checked writable but made only when the data is built."""
    import subprocess
    import sys

    from helpers.distributed_run import subprocess_environment

    phases = tmp_path / "spans.yaml"
    phases.write_text(
        f"sources:\n  code: {{prefixes: [{DEMO / 'code_text_document'}]}}\n"
        "phases:\n  - {iters: 2, blend: {code: 1}, lr: {peak: 1.0e-3},\n"
        "     span_corruption: {code: {rate: 0.5, max_spans: 9}}}\n"
    )
    save = tmp_path / "runs" / "ckpt"
    command = [sys.executable, "pretrain_crystal.py", "--model", "crystal-test", "--tokenizer-model", str(TOKENIZER),
               "--phases", str(phases), "--save", str(save)]  # fmt: skip
    proc = subprocess.run(command, cwd=REPO, env=subprocess_environment(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "max_spans: 9 is more than the tokenizer's 8" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists()
