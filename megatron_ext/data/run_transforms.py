"""Rewriting document runs of a sample row, the rule FIM and span corruption share.

A row's segments are runs of documents (source_stream.Segment). With probability `rate` a run (its
end-of-document token kept outside) is decoded to text and rewritten by the objective; the row is then cut
back to its length, or padded with `pad`, whose labels carry no loss. Every draw comes from a generator
seeded by (seed, source, epoch, the objective's stream, document id, the run's start inside the document):
the output for a document does not depend on the worker that builds it or on access order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from megatron_ext.data.source_stream import Segment


def rewrite_runs(
    tokens: np.ndarray,
    segments: list[Segment],
    rate: float,
    key: tuple[int, ...],
    stream: int,
    tokenizer,
    rewrite: Callable[[str, np.random.Generator], list[int]],
    pad: int,
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of the same length, loss mask for the labels tokens[1:]). key: (seed, source, epoch)."""
    out: list[int] = []
    for seg in segments:
        run = tokens[seg.start : seg.start + seg.length].tolist()
        end = [run.pop()] if seg.ends_document else []
        rng = np.random.default_rng([*key, stream, seg.doc_id, seg.doc_offset])
        if run and rng.random() < rate:
            text = tokenizer.decode(run)
            if text:
                run = rewrite(text, rng)
        out += run + end
    n = len(tokens)
    row = np.full(n, pad, dtype=np.int64)
    row[: min(n, len(out))] = out[:n]
    loss_mask = np.ones(n - 1, dtype=np.float32)
    loss_mask[max(len(out) - 1, 0) :] = 0.0  # labels that are padding
    return row, loss_mask
