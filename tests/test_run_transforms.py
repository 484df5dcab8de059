"""FIM and span corruption on runs that start or end inside their document (data/run_transforms.py): the
parts' ids, put back in document order, decode to the document byte for byte for runs cut at every
offset, in three tokenizer forms; over the demo corpus at sequence 256 every rewritten run is complete
(the whole middle, every span and its <eom>) or shortened to a complete rewrite of its first ids, and the
rows' counts say which."""

import numpy as np
import pytest
from helpers.tokenizer_forms import FORMS, build_form

from megatron_ext.data.fim import FimTokenIds, apply_fim
from megatron_ext.data.run_transforms import OUTCOMES, outcome_counts
from megatron_ext.data.source_stream import Segment
from megatron_ext.data.span_corruption import SentinelIds, apply_span_corruption

# Indents, words cut into pieces, a run of spaces, and characters that the demo model and the byte-level
# BPE (which never saw 漢字 or ∮) hold as several byte ids each, so that some cuts fall inside them.
DOCUMENTS = [
    "def operator(self, x):\n    return   x.operator(y)  # caf\u00e9 \u2603\n",
    "  two leading spaces, \u6f22\u5b57 \U0001f600 and \u222e dx\n\n\tend",
]
TRAINING_TEXTS = ["def area(r):\n    return 3.14159 * r * r\n", "caf\u00e9 \u2603 \U0001f600 indented  twice\n"]
REWRITTEN, SHORTENED = OUTCOMES.index("rewritten"), OUTCOMES.index("shortened")


@pytest.fixture(scope="module", params=FORMS)
def tok(request, tmp_path_factory):
    return build_form(request.param, tmp_path_factory.mktemp(request.param), TRAINING_TEXTS)


def _split(ids: list[int], marker: int) -> tuple[list[int], list[int]]:
    i = ids.index(marker)
    return ids[:i], ids[i + 1 :]


def _fim_in_document_order(out: list[int], ids: FimTokenIds) -> list[int]:
    """prefix + middle + suffix from PSM (<pre> P <suf> S <mid> M) or SPM (<pre> <suf> S <mid> P M)."""
    assert out[0] == ids.prefix
    if out[1] == ids.suffix:
        suffix, prefix_middle = _split(out[2:], ids.middle)
        return prefix_middle + suffix
    prefix, rest = _split(out[1:], ids.suffix)
    suffix, middle = _split(rest, ids.middle)
    return prefix + middle + suffix


def _spans_in_document_order(out: list[int], ids: SentinelIds, eod: int) -> tuple[list[int], bool]:
    """part_0 span_1 part_1 ... from part_0 <mask_1> part_1 ... <eod> <sep> <mask_1> span_1 <eom> ..., and
    whether the text starts after a special token (part_0 empty: span_1 is encoded after <mask_1>)."""
    sep = out.index(ids.sep)
    assert out[sep - 1] == eod
    corrupted, answers = out[: sep - 1], out[sep + 1 :]
    spans = {}
    while answers:
        mask, rest = answers[0], answers[1:]
        span, answers = _split(rest, ids.eom)
        spans[mask] = span
    parts, current = [], []
    for t in corrupted:
        if t in spans:
            parts.append(current)
            current = []
        else:
            current.append(t)
    parts.append(current)
    assert len(parts) == len(spans) + 1 and list(spans) == list(ids.masks[: len(spans)])
    joined = list(parts[0])
    for mask, part in zip(spans, parts[1:]):
        joined += spans[mask] + part
    return joined, not parts[0]


def _rewrite(kind: str, tok, run: list[int], offset: int, ends_document: bool, doc_id: int):
    """The run through one objective at rate 1, with room to spare: (ids without padding or the run's
    end-of-document id, outcome counts)."""
    length = len(run) + ends_document
    tokens = np.array([*run, *([tok.eod] if ends_document else []), *[0] * (4 * length + 64)], dtype=np.int64)
    seg = [Segment(doc_id=doc_id, doc_offset=offset, start=0, length=length, ends_document=ends_document)]
    if kind == "span_corruption":
        from megatron_ext.data.phases_config import SpanCorruptionSpec

        ids = SentinelIds.of(tok)
        row, mask, counts = apply_span_corruption(tokens, seg, SpanCorruptionSpec(1.0), (7, 8, 9), tok, ids)
    else:
        ids = FimTokenIds.of(tok)
        row, mask, counts = apply_fim(tokens, seg, 1.0, float(kind == "fim_spm"), (7, 8, 9), tok, ids)
    out = row.tolist()
    while out and out[-1] == ids.pad:
        out.pop()
    assert mask[: len(out) - 1].all() and not mask[len(out) - 1 :].any()  # every label but padding's
    if ends_document:
        assert out.pop() == tok.eod
    return out, outcome_counts(counts)


@pytest.mark.parametrize("kind", ["fim_psm", "fim_spm", "span_corruption"])
def test_runs_cut_at_every_offset_reassemble_byte_for_byte(tok, kind):
    """Runs from every offset of each document to its end, and to a cut before it: the rewritten run's
    parts, in document order, between the ids before and after the run, decode to the document."""
    rewritten = kept = 0
    for doc_id, document in enumerate(DOCUMENTS):
        doc = tok.encode(document)
        whole = tok.decode(doc)
        for offset in range(len(doc)):
            for stop in sorted({len(doc), min(len(doc), offset + 1 + (offset * 7) % 11)}):
                run = doc[offset:stop]
                out, counts = _rewrite(kind, tok, run, offset, stop == len(doc), doc_id * 1000 + offset)
                if counts[REWRITTEN] == 0:
                    assert out == run and counts.sum() == 1, (offset, stop)  # not rewritable: left as it is
                    # Only what has nothing to cut: span corruption needs two characters, FIM one.
                    characters = tok.decode([tok.eod, *run])[len(tok.decode([tok.eod])) :].replace("\ufffd", "")
                    assert len(characters) <= (1 if kind == "span_corruption" else 0), (run, characters)
                    kept += 1
                    continue
                rewritten += 1
                if kind == "span_corruption":
                    joined, after_special = _spans_in_document_order(out, SentinelIds.of(tok), tok.eod)
                else:
                    joined, after_special = _fim_in_document_order(out, FimTokenIds.of(tok)), True
                ids = doc[:offset] + joined + doc[stop:]
                if after_special and offset == 0:
                    # The document's first text follows a special token (FIM's parts, or span_1 where part_0
                    # is empty): no dummy-prefix space to drop; decoded behind one, as a prompt would be.
                    prefix = FimTokenIds.of(tok).prefix
                    assert tok.decode([prefix, *ids])[len(tok.decode([prefix])) :] == whole, (document, stop)
                else:
                    assert tok.decode(ids) == whole, (document, offset, stop)
    assert rewritten > 5 * kept, (rewritten, kept)


def test_a_run_starting_inside_a_word_or_an_indent_keeps_its_text():
    """The two cases of the report, on the demo SentencePiece model: a run starting on '\u2581operator' keeps
    its space, and a one-character run from a word's second piece gains none."""
    from helpers.tokenizer_forms import DEMO_TOKENIZER

    from megatron_ext.data.run_transforms import run_text
    from megatron_ext.tokenizer import build_tokenizer

    tok = build_tokenizer("CrystalTokenizer", str(DEMO_TOKENIZER))
    doc = tok.encode("x = a.b operator(y)\n    return")
    pieces = [tok.sp.IdToPiece(i) for i in doc]
    at = pieces.index("\u2581operator")
    assert run_text(tok, doc[at:], starts_document=False).text.startswith(" operator(y)\n    return")
    indent = pieces.index("\u2581\u2581\u2581\u2581")
    assert run_text(tok, doc[indent:], starts_document=False).text == "    return"
    second = next(i for i, p in enumerate(pieces) if i and not p.startswith("\u2581") and p.isalpha())
    one = run_text(tok, doc[second : second + 1], starts_document=False)
    assert tok.decode_after_special(one.encode(tok, [one.text], first_follows_special=False)[0]) == one.text
    assert one.encode(tok, [one.text], first_follows_special=False)[0] == doc[second : second + 1]


def test_rows_at_sequence_256_end_with_complete_answers_and_count_them():
    """The demo corpus's code at sequence 256, 200 rows: every rewritten run is the whole run rewritten
    (its middle or every span with its <eom> in the row) or, where it did not fit, a complete rewrite of
    the run's first ids followed by padding; the rows' counts agree with what the rows hold."""
    from helpers.distributed_run import REPO

    from megatron_ext.data.phase_schedule import PhaseSchedule
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.data.phases_config import FimSpec, LRSpec, PhasesConfig, PhaseSpec, SourceSpec, SpanCorruptionSpec
    from megatron_ext.tokenizer import build_tokenizer

    demo = REPO / "data" / "demo"
    tok = build_tokenizer("CrystalTokenizer", str(demo / "crystal_demo.model"))
    sources = {"code": SourceSpec("code", (str(demo / "code_text_document"),))}
    lr = LRSpec(peak=1e-3)
    for kind in ("fim", "span_corruption"):
        fim = {"code": FimSpec(0.9, 0.5)} if kind == "fim" else {}
        spans = {"code": SpanCorruptionSpec(0.9)} if kind != "fim" else {}
        config = PhasesConfig("t.yaml", 3, 0.0, sources, (PhaseSpec("p", 25, 8, {"code": 1.0}, fim, lr, spans),))
        dataset = PhasedDataset(config, 256, tok)
        stream, totals, seen = dataset.streams[0], np.zeros(len(OUTCOMES), dtype=np.int64), np.zeros(2, int)
        for ref in PhaseSchedule(config).take(200):
            item = dataset[ref]
            out = [*item["tokens"].tolist(), item["labels"][-1].item()]
            raw, runs, _ = stream.sample(ref.index)
            found = _walk(out, raw.tolist(), list(runs), tok, dataset, kind)
            assert found.tolist() == item["row_counts"][[REWRITTEN, SHORTENED]].tolist(), ref
            totals += item["row_counts"][: len(OUTCOMES)].numpy()
            seen += found
        # A code document is longer than a row: most rows are one run from inside a document that fills it.
        assert seen[0] >= 3 and seen[1] > 100 and totals[REWRITTEN] + totals[SHORTENED] == seen.sum(), (seen, totals)


def _walk(out, raw, runs, tok, dataset, kind) -> np.ndarray:
    """[whole rewrites, shortened rewrites] found in a row by walking its runs; asserts each is complete."""
    found, pos, n = np.zeros(2, int), 0, len(out)
    fim, sentinels = dataset.fim_ids, dataset.sentinel_ids
    pad = fim.pad if kind == "fim" else sentinels.pad
    for seg in runs:
        if pos >= n:
            break
        run = raw[seg.start : seg.start + seg.length]
        body = run[:-1] if seg.ends_document else run
        if out[pos : pos + len(run)] == run[: n - pos]:  # left causal (or cut by the row's end, as packing cuts)
            pos += len(run)
            continue
        if kind == "fim":  # <pre> ... up to the run's end-of-document id, the padding or the row's end
            stop = next((i for i in range(pos, n) if out[i] in (tok.eod, pad)), n)
            joined = _fim_in_document_order(out[pos:stop], fim)
        else:  # part_0 <mask_1> ... <eod> <sep> then as many answers, each closed by <eom>, as masks
            sep = out.index(sentinels.sep, pos)
            stop = sep + 1
            for _ in range(sum(t in sentinels.masks for t in out[pos:sep])):
                stop = out.index(sentinels.eom, stop) + 1
            joined, _ = _spans_in_document_order(out[pos:stop], sentinels, tok.eod)
        decode = tok.decode if seg.doc_offset == 0 else tok.decode_after_special
        text = decode(joined)
        if text == decode(body):
            found[0] += 1
            pos = stop + seg.ends_document
            assert not seg.ends_document or stop >= n or out[stop] in (tok.eod, pad)
            continue
        # Shortened: a complete rewrite of the run's first m ids, then only padding.
        assert any(text == decode(body[:m]) for m in range(1, len(body))), (seg, text)
        assert all(t == pad for t in out[stop:]), out[stop:]
        found[1] += 1
        break
    return found
