"""Rewriting document runs of a sample row, the rule FIM and span corruption share.

A row's segments are runs of documents (source_stream.Segment). With probability `rate` a run (its
end-of-document token kept outside) is decoded to text and rewritten by the objective. Two rules hold for
every run, wherever it starts or ends inside its document:

1. The parts' ids, put back in document order, decode to the run's own bytes. A run that starts its
   document decodes as a document does (SentencePiece's dummy-prefix space dropped, and given back where
   the objective encodes its first part as a document's start); a run that starts inside one decodes as
   text after a special token (decode_after_special: a leading "\u2581" stays a space) and each of its parts
   is encoded so. Leading or trailing ids that are not whole characters (a byte-level or byte-fallback
   tokenizer's pieces of a character cut by the row) stay as they are, at the run's start and end.
2. What the objective asks the model to produce is never cut. A rewritten run is longer than the original
   (sentinels, re-tokenisation), and the row keeps its length, so a rewrite has the room left in the row:
   a run whose rewrite fits is rewritten whole (its end-of-document token follows where there is room);
   one that does not is rewritten from its first m ids, m the most that fit, the rest of the row padded
   (`shortened`: the run's last ids, which no rewrite could hold, are not read); where nothing fits the
   run stays causal (`no_room`). The cost: per shortened run, about the objective's overhead in ids of its
   document are dropped (tested; counted per source in data_state.json). Runs after a rewrite that grew
   are pushed out of the row, as packing cuts any row.

Runs left as they are, counted as `not_rewritable`: text too short to cut, and runs holding a special id
that would come back as plain text (a CrystalTokenizer's specials live outside its SentencePiece model).

Padding (`pad`) carries no loss. Every draw comes from a generator seeded by (seed, source, epoch, the
objective's stream, document id, the run's start inside the document): the output for a document does not
depend on the worker that builds it or on access order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from megatron_ext.data.source_stream import Segment

# What happened to the runs an objective chose: counted per row, summed per source (data_state.json).
OUTCOMES = ("rewritten", "shortened", "no_room", "not_rewritable")
REWRITTEN, SHORTENED, NO_ROOM, NOT_REWRITABLE = range(len(OUTCOMES))
UNCHOSEN = -1  # a run the objective's draw left causal (or that a longer rewrite pushed out of the row)
_REPLACEMENT = "\ufffd"  # what an id that is part of a character decodes to
_MAX_CHARACTER_IDS = 4  # a UTF-8 character has at most 4 bytes, so at most 3 ids of one are cut off
_FIT_TRIES = 8


@dataclass(frozen=True)
class RunText:
    """A run as text to rewrite: `head` and `tail` ids stay as they are around it (pieces of characters
    the row cut); starts_document: the run begins its document."""

    text: str
    starts_document: bool = True
    head: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()

    def encode(self, tokenizer, pieces: list[str], first_follows_special: bool) -> list[list[int]]:
        """Consecutive pieces of the text as ids, each as text after a special token (the parts of an
        objective's layout), the first as a document's start where no special precedes it and the run
        starts its document; the head ids before the first piece, the tail ids after the last."""
        out = [tokenizer.encode_after_special(p) if p else [] for p in pieces]
        if not first_follows_special and self.starts_document and pieces[0]:
            out[0] = tokenizer.encode(pieces[0])
        out[0] = [*self.head, *out[0]]
        out[-1] = [*out[-1], *self.tail]
        return out


def run_text(tokenizer, ids: list[int], starts_document: bool) -> RunText | None:
    """The run's text, or None where it cannot be rewritten exactly (nothing but pieces of characters, or
    a special id that would re-encode as plain text)."""
    plain = getattr(tokenizer, "base_vocab_size", None)
    if plain is not None and max(ids) >= plain:
        return None
    decode = tokenizer.decode if starts_document else tokenizer.decode_after_special
    head = 0
    text = decode(ids)
    while text.startswith(_REPLACEMENT) and head < min(_MAX_CHARACTER_IDS - 1, len(ids)):
        head += 1
        text = decode(ids[head:])
    tail = 0
    while text.endswith(_REPLACEMENT) and tail < min(_MAX_CHARACTER_IDS - 1, len(ids) - head):
        tail += 1
        text = decode(ids[head : len(ids) - tail])
    if not text:
        return None
    return RunText(text, starts_document and head == 0, tuple(ids[:head]), tuple(ids[len(ids) - tail :]))


Rewrite = Callable[[RunText, np.random.Generator], "list[int] | None"]  # None: the text stays as it is


def rewrite_runs(
    tokens: np.ndarray,
    segments: Iterable[Segment],
    rate: float,
    key: tuple[int, ...],
    stream: int,
    tokenizer,
    rewrite: Rewrite,
    pad: int,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(tokens of the same length, loss mask for the labels tokens[1:], each run's outcome: an index into
    OUTCOMES, or UNCHOSEN). key: (seed, source, epoch)."""
    n = len(tokens)
    out: list[int] = []
    segments = list(segments)
    outcomes = [UNCHOSEN] * len(segments)
    for i, seg in enumerate(segments):
        room = n - len(out)
        if room <= 0:
            break
        run = tokens[seg.start : seg.start + seg.length].tolist()
        end = [run.pop()] if seg.ends_document else []
        seed = [*key, stream, seg.doc_id, seg.doc_offset]
        if not run or np.random.default_rng(seed).random() >= rate:
            out += run + end
            continue
        ids, outcome = _fitted(run, room, seg.doc_offset == 0, seed, tokenizer, rewrite)
        outcomes[i] = outcome
        if outcome == SHORTENED:
            out += ids
            break  # the document goes on past the row: nothing else follows it here
        out += ids + end
    row = np.full(n, pad, dtype=np.int64)
    row[: min(n, len(out))] = out[:n]
    loss_mask = np.ones(n - 1, dtype=np.float32)
    loss_mask[max(len(out) - 1, 0) :] = 0.0  # labels that are padding
    return row, loss_mask, outcomes


def outcome_counts(outcomes: list[int]) -> np.ndarray:
    """How many runs of a row had each of OUTCOMES."""
    return np.bincount([o for o in outcomes if o != UNCHOSEN], minlength=len(OUTCOMES)).astype(np.int64)


def _fitted(run: list[int], room: int, starts_document: bool, seed: list[int], tokenizer, rewrite: Rewrite):
    """(ids, outcome): the rewrite of the run's first m ids, m the largest that fits `room` (found by
    shrinking m by the overflow, a few tries), else the run as it is."""

    def attempt(m: int):
        text = run_text(tokenizer, run[:m], starts_document)
        if text is None:
            return None
        rng = np.random.default_rng(seed)
        rng.random()  # the draw that chose the run, so that a whole run's rewrite does not depend on the room
        return rewrite(text, rng)

    m = len(run)
    for _ in range(_FIT_TRIES):
        ids = attempt(m)
        if ids is None:
            return run, NOT_REWRITABLE if m == len(run) else NO_ROOM
        if len(ids) <= room:
            return ids, REWRITTEN if m == len(run) else SHORTENED
        m -= len(ids) - room
        if m <= 0:
            break
    return run, NO_ROOM
