"""Tiny files in the layout of LLM360's released Crystal data (shared/notes/crystal-release-data.md), and
Cerebras's Mixture order written from its description, for the tests of HDF5 sources and Crystal's recipe."""

import numpy as np

WIDTH = 64


def write_samples(path, first_id: int, n: int, shifted: bool = True):
    """n samples whose ids are first_id, first_id + 1, ... at position 0 (a sample's identity), the rest a
    packed stream; mask 0 on the last 3 positions of odd samples; labels the next ids (or not)."""
    import h5py

    stream = np.arange(n * WIDTH + 1, dtype=np.int64) % 900 + 3
    ids = np.stack([stream[i * WIDTH : (i + 1) * WIDTH] for i in range(n)])
    labels = np.stack([stream[i * WIDTH + 1 : (i + 1) * WIDTH + 1] for i in range(n)])
    ids[:, 0] = np.arange(first_id, first_id + n)
    if not shifted:
        labels[:, 5] += 1
    mask = np.ones_like(ids)
    mask[1::2, -3:] = 0
    samples = np.stack([ids, mask, labels], axis=1).astype(np.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["n_examples"] = n
        f.create_dataset("data", data=samples, dtype="i4", chunks=(1, 3, WIDTH), compression="gzip")


def cerebras_reference(lengths, weights, seed, global_batch, steps):
    """Cerebras's Mixture(interleave=True) and its in-order sampler, from the description in
    shared/notes/crystal-release-data.md: [(source, sample)] of `steps` global batches."""
    weights = [w / sum(weights) for w in weights]
    total = max(n / w for n, w in zip(lengths, weights) if w > 0.05)
    dataset_indices = np.concatenate([np.full(int(total * w), i) for i, w in enumerate(weights)])
    dataset_samples = np.concatenate([np.arange(int(total * w)) % n for n, w in zip(lengths, weights)])
    indices = np.arange(len(dataset_indices))
    np.random.default_rng(seed).shuffle(indices)
    bounds = np.insert(np.cumsum([int(total * w) for w in weights]), 0, 0)
    for start, end in zip(bounds[:-1], bounds[1:]):
        indices[np.where((start <= indices) & (indices < end))] = np.arange(start, end)
    order = list(zip(dataset_indices[indices].tolist(), dataset_samples[indices].tolist()))
    per_epoch = len(order) // global_batch * global_batch
    return [order[p % per_epoch] for p in range(steps * global_batch)]
