"""Reading a phased dataset's rows as training does, for the tests of its online transforms (FIM, span
corruption): the same references through a DataLoader with any number of workers."""

from __future__ import annotations

import torch


def load_rows(dataset, refs, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, loss masks) of refs, in micro-batches of 4 through a DataLoader with `workers` workers."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[refs[i : i + 4] for i in range(0, len(refs), 4)], num_workers=workers
    )
    return torch.cat([b["tokens"] for b in loader]), torch.cat([b["loss_mask"] for b in loader])
