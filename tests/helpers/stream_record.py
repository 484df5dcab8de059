"""What a source stream hands out, condensed to digests: the tokens and document runs of chosen samples
(the first ones, those across each epoch boundary, some of the third epoch), for the test that the
stream is unchanged by a rewrite of how its indices are built and stored (tests/data/stream_digests.json
was recorded from the code before the on-disk index cache)."""

from __future__ import annotations

import hashlib
import os

import numpy as np


def probe_samples(samples_per_epoch: int) -> list[int]:
    e = samples_per_epoch
    picks = list(range(min(e, 6))) + list(range(max(e - 3, 0), e + 3)) + list(range(2 * e - 2, 2 * e + 2))
    return sorted({k for k in picks if k >= 0})


def stream_digest(stream) -> str:
    h = hashlib.sha1()
    h.update(f"{stream.samples_per_epoch} {stream.tokens_per_epoch} {len(stream.doc_ids)}".encode())
    for k in probe_samples(stream.samples_per_epoch):
        tokens, segments, epoch = stream.sample(k)
        h.update(np.asarray(tokens, dtype=np.int64).tobytes())
        h.update(repr([(s.doc_id, s.doc_offset, s.start, s.length, s.ends_document) for s in segments]).encode())
        h.update(str(epoch).encode())
    return h.hexdigest()


def synthetic_sources(directory: str, count: int = 13, seed: int = 0) -> dict[str, str]:
    """count small sources of random documents (each ending with the end-of-document id 2), written with
    Megatron-Core's IndexedDatasetBuilder; name -> prefix."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        prefix = os.path.join(directory, f"source{i:02d}")
        builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
        for length in rng.integers(1, 120, size=40 + 9 * i):
            doc = np.append(rng.integers(3, 1000, size=length), 2)
            builder.add_document(torch.from_numpy(doc.astype(np.int64)), [len(doc)])
        builder.finalize(prefix + ".idx")
        out[f"source{i:02d}"] = prefix
    return out
