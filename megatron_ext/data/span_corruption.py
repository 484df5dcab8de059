"""CodeGen2's span corruption, online, per document run, beside FIM (data/fim.py) and seeded the same way.

With probability `rate` a document run (its end-of-document token kept outside) is decoded to text and k
spans are cut out of it at character positions; the run becomes

  part_0 <mask_1> part_1 <mask_2> ... <mask_k> part_k <eod> <sep> <mask_1> span_1 <eom> ... <mask_k> span_k <eom>

the layout of CodeGen2's infilling prompts (its model card: prefix <mask_1> suffix <|endoftext|> <sep>
<mask_1>, the model writing the span and <eom>). The rest of the documents stay causal LM, so `rate` is
CodeGen2's causal / span-corruption mixture (its final recipe: half and half). Part 0 is encoded as a
document's start (with SentencePiece's dummy-prefix space), every other part and span as text that follows
a special token (fim.encode_part), so the ids decode to the document byte for byte; a run that starts
inside its document encodes part 0 as text inside one (data/run_transforms.py), and a rewrite never loses
its last span or <eom> to the row's end (it is shortened to fit). The loss is taken on
every token, the spans and <eom> included.

How the spans are chosen: CodeGen2's paper says it "first sample[s] a dynamic ratio of sequence to mask
out, then sample[s] the span length and mask out locations such that the total number of tokens match the
ratio", following InCoder, without the distributions. Chosen here (in characters, so that cuts fall on
character boundaries): the ratio uniform in [0, max_ratio], the number of spans k uniform in 1..max_spans
(at most the tokenizer's <mask_N> count), the k span lengths a uniform composition of the masked total
into positive parts and the k + 1 gaps around them a uniform composition of the rest.

Every draw comes from a generator seeded by (seed, source, epoch, document id, the run's start inside the
document), with its own stream number: the output for a document does not depend on the worker that builds
it, on access order or on whether FIM ran elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_ext.data.fim import encode_part
from megatron_ext.data.run_transforms import RunText, rewrite_runs
from megatron_ext.data.source_stream import Segment
from megatron_ext.tokenizer.crystal_tokenizer import special_token_ids

_SPAN_STREAM = 3  # FIM draws from stream 2


@dataclass(frozen=True)
class SentinelIds:
    masks: tuple[int, ...]  # <mask_1>, <mask_2>, ...
    sep: int
    eom: int
    pad: int  # what short rows are padded with (no loss): <|fim_pad|>, else the end-of-document id

    @classmethod
    def of(cls, tokenizer) -> "SentinelIds | None":
        """The ids in this tokenizer, or None when it lacks <mask_1>, <sep> or <eom>."""
        ids = special_token_ids(tokenizer)
        masks = []
        while f"<mask_{len(masks) + 1}>" in ids:
            masks.append(ids[f"<mask_{len(masks) + 1}>"])
        if not masks or "<sep>" not in ids or "<eom>" not in ids:
            return None
        return cls(tuple(masks), ids["<sep>"], ids["<eom>"], ids.get("<|fim_pad|>", tokenizer.eod))


def sentinel_count(tokenizer) -> int:
    """How many spans a document of this tokenizer's can have cut (its <mask_N>); 0 without the sentinels
    or without a tokenizer. What the phases file is checked against."""
    ids = SentinelIds.of(tokenizer) if tokenizer is not None else None
    return len(ids.masks) if ids else 0


def _composition(total: int, parts: int, rng: np.random.Generator, positive: bool) -> list[int]:
    """total split into `parts` integers (each >= 1 when positive), uniformly over such splits."""
    if positive:
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else []
        edges = [0, *map(int, cuts), total]
    else:
        edges = [0, *map(int, np.sort(rng.integers(0, total + 1, size=parts - 1))), total]
    return [b - a for a, b in zip(edges, edges[1:])]


def corrupt_document(
    run: RunText, rng: np.random.Generator, max_spans: int | None, max_ratio: float, tokenizer, ids: SentinelIds
) -> list[int] | None:
    """The run's ids in the layout above, None (left as it is) when its text is shorter than two
    characters; max_spans None: as many as the tokenizer has sentinels."""
    text = run.text
    n = len(text)
    limit = len(ids.masks) if max_spans is None else min(max_spans, len(ids.masks))
    k = int(rng.integers(1, limit + 1))
    k = min(k, n // 2)
    if k == 0:
        return None
    masked = min(max(round(float(rng.uniform(0.0, max_ratio)) * n), k), n - 1)
    spans = _composition(masked, k, rng, positive=True)
    gaps = _composition(n - masked, k + 1, rng, positive=False)
    parts, cut, at = [], [], 0
    for gap, span in zip(gaps, spans):
        parts.append(text[at : at + gap])
        cut.append(text[at + gap : at + gap + span])
        at += gap + span
    parts.append(text[at:])
    out = corrupted(ids, run.encode(tokenizer, parts, first_follows_special=False), tokenizer.eod)
    for i, span in enumerate(cut):
        out += [ids.masks[i], *encode_part(tokenizer, span), ids.eom]
    return out


def corrupted(ids: SentinelIds, parts: list[list[int]], eod: int) -> list[int]:
    """part_0 <mask_1> part_1 ... <mask_k> part_k <eod> <sep>: the document with its k spans cut out, from
    the parts' ids (RunText.encode: part 0 as the run's own start, the others as text after a special)."""
    out = list(parts[0])
    for i, part in enumerate(parts[1:]):
        out += [ids.masks[i], *part]
    return out + [eod, ids.sep]


def infilling_prompt(tokenizer, ids: SentinelIds, prefix: str, suffix: str) -> list[int]:
    """CodeGen2's infilling prompt, a training document with one span cut out, up to that span:
    prefix <mask_1> suffix <eod> <sep> <mask_1>. The model continues with the middle and <eom>."""
    parts = RunText(prefix + suffix).encode(tokenizer, [prefix, suffix], first_follows_special=False)
    return [*corrupted(ids, parts, tokenizer.eod), ids.masks[0]]


def apply_span_corruption(
    tokens: np.ndarray,
    segments: list[Segment],
    spec,
    key: tuple[int, ...],
    tokenizer,
    ids: SentinelIds,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(tokens of the same length, loss mask for the labels tokens[1:], each run's outcome: run_transforms).
    spec: phases_config.SpanCorruptionSpec; key: (seed, source, epoch)."""
    rewrite = lambda run, rng: corrupt_document(run, rng, spec.max_spans, spec.max_ratio, tokenizer, ids)  # noqa: E731
    return rewrite_runs(tokens, segments, spec.rate, key, _SPAN_STREAM, tokenizer, rewrite, ids.pad)
