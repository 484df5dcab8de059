"""Which ranks read data, and how the other ranks of a tensor group get it (Megatron-LM's get_batch).

Only tensor-parallel rank 0 of the first and the last pipeline stage builds datasets and reads: the first
stage embeds the tokens, the last scores the labels. It hands each micro-batch to the other ranks of its
tensor group by one broadcast. The middle stages take the previous stage's activations and hold no data
object at all; the model chunks that neither embed nor score (middle virtual stages) get no iterator.
Bookkeeping that needs the sources' indices (data_state.json, TensorBoard's data scalars) therefore runs
on readers: rank 0 and the logging rank (distributed.is_logging_rank) are both.
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import torch
from megatron.core import parallel_state

from megatron_ext.data.index_cache import IndexCacheError
from megatron_ext.data.phases_config import PhasesConfigError
from megatron_ext.process_memory import child_processes, private_memory_mb, unshared_memory_mb


def is_reader() -> bool:
    return parallel_state.get_tensor_model_parallel_rank() == 0 and (
        parallel_state.is_pipeline_first_stage(ignore_virtual=True)
        or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    )


def chunk_takes_batches(chunk) -> bool:
    """A model chunk that embeds tokens or computes the loss."""
    module = getattr(chunk, "module", chunk)
    return bool(module.pre_process or module.post_process)


def chunk_iterators(
    model: list, read: Callable[[], Iterator[dict]], device: torch.device, positions: Callable | None = None
) -> list:
    """One entry per model chunk: the chunks that take batches get them (read() on tensor rank 0, whose
    batches the group's other ranks receive); the others None, or with `positions` (a packed evaluation,
    whose set every rank holds) its micro-batches' position ids, computed on each rank."""
    tensor_group_size = parallel_state.get_tensor_model_parallel_world_size()
    out = []
    for chunk in model:
        if not chunk_takes_batches(chunk):
            out.append(positions() if positions is not None else None)
            continue
        batches = read() if parallel_state.get_tensor_model_parallel_rank() == 0 else None
        out.append(TensorGroupBatches(batches, device) if tensor_group_size > 1 else batches)
    return out


_ALIGN = 8  # every tensor starts at a multiple of the largest element size, so that its bytes view as it


class TensorGroupBatches:
    """Micro-batches read on tensor rank 0 and broadcast to the group: the tensors' bytes packed into one
    buffer (one collective per micro-batch); their names, dtypes and shapes sent once, with the first."""

    def __init__(self, batches: Iterator[dict] | None, device: torch.device):
        self.batches, self.device = batches, device
        self.group = parallel_state.get_tensor_model_parallel_group()
        self.source = parallel_state.get_tensor_model_parallel_src_rank()
        self.layout: list[tuple[str, torch.dtype, tuple[int, ...]]] | None = None

    def __iter__(self):
        return self

    def _share_layout(self, layout) -> None:
        shared = [layout]
        torch.distributed.broadcast_object_list(shared, src=self.source, group=self.group)
        self.layout = shared[0]

    def __next__(self) -> dict:
        if self.batches is not None:
            batch = next(self.batches)
            layout = [(k, v.dtype, tuple(v.shape)) for k, v in batch.items()]
            if self.layout is None:
                self._share_layout(layout)
            elif layout != self.layout:  # a reader's batches keep one layout; the receivers rely on it
                raise RuntimeError(f"micro-batch layout changed from {self.layout} to {layout}")
            parts = []
            for name, _, _ in layout:
                raw = batch[name].contiguous().view(-1).view(torch.uint8)
                parts += [raw, torch.zeros(-len(raw) % _ALIGN, dtype=torch.uint8)]
            buffer = torch.cat(parts).to(self.device)
        else:
            if self.layout is None:
                self._share_layout(None)
            size = sum(_padded_bytes(dtype, shape) for _, dtype, shape in self.layout)
            buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        torch.distributed.broadcast(buffer, self.source, group=self.group)
        out, offset = {}, 0
        for name, dtype, shape in self.layout:
            size = _padded_bytes(dtype, shape)
            count = torch.Size(shape).numel() * dtype.itemsize
            out[name] = buffer[offset : offset + count].view(dtype).view(shape)
            offset += size
        return out


def _padded_bytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    count = torch.Size(shape).numel() * dtype.itemsize
    return count + (-count % _ALIGN)


def build_on_readers(build: Callable[[], object]):
    """build() on the reading ranks, None elsewhere. A failure on any rank fails every rank (none waits
    for the others in a collective): a user's error (a phases file, a cache directory) as the same
    one-line error, anything else as a RuntimeError naming the rank, the failing rank keeping its own."""
    result, failure = None, None
    if is_reader():
        try:
            result = build()
        except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
            failure = e
    reports: list = [None] * torch.distributed.get_world_size()
    mine = None if failure is None else (type(failure).__name__, str(failure))
    torch.distributed.all_gather_object(reports, mine)
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if failure is not None:
        raise failure
    if failed:
        rank, (kind, message) = failed[0]
        user_errors = {cls.__name__: cls for cls in (PhasesConfigError, IndexCacheError)}
        if kind in user_errors:
            raise user_errors[kind](message)
        raise RuntimeError(f"building the data failed on rank {rank}: {kind}: {message}")
    return result


class EvalShape:
    """An evaluation set as a rank without data sees it: the batches to step through with the others (only
    held-out sets come to such ranks this way, never packed)."""

    packed = False

    def __init__(self, name: str, num_slots: int, steps: int, batch_size: int):
        self.name, self.num_slots, self.steps, self.batch_size = name, num_slots, steps, batch_size


def everywhere(local):
    """An evaluation set built on the reading ranks (None elsewhere), on every rank: rank 0, a reader,
    tells the others its shape."""
    shape = [None if local is None else (local.name, local.num_slots, local.steps, local.batch_size)]
    torch.distributed.broadcast_object_list(shape, src=0)
    if local is not None:
        return local
    return EvalShape(*shape[0]) if shape[0] else EvalShape("valid", 0, 0, 0)


class SetupCost:
    """The time and private memory (RssAnon) this rank's data path took to set up, over the `with` blocks
    around its parts; report() prints every rank's on rank 0, with how many ranks read."""

    def __init__(self):
        self.seconds, self.memory_mb = 0.0, 0.0

    def __enter__(self):
        self._started, self._memory = time.perf_counter(), private_memory_mb()

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._started
        self.memory_mb += private_memory_mb() - self._memory

    def report(self, reads: bool) -> None:
        rows: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(rows, (reads, self.seconds, self.memory_mb))
        if torch.distributed.get_rank():
            return
        readers = [r for r in rows if r[0]]
        others = [r for r in rows if not r[0]]
        line = (
            f"data: read on {len(readers)} of {len(rows)} ranks (tensor rank 0 of the first and last pipeline "
            f"stages), set up in {max(r[1] for r in rows):.2f} s; private memory (RssAnon) it added: "
            f"{max(r[2] for r in readers):.1f} MB at most on a reader"
        )
        if others:
            line += f", {max(r[2] for r in others):.1f} MB at most on the other ranks"
        print(line, flush=True)


def report_workers(num_workers: int) -> None:
    """On rank 0, once the DataLoader workers have served a step: the memory each holds that it does not
    share with its rank (the indices are memory-mapped, so a constant per worker, not the index size)."""
    mine = [unshared_memory_mb(pid) for pid in child_processes()] if is_reader() else []
    rows: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(rows, mine)
    sizes = [m for r in rows for m in r]
    if torch.distributed.get_rank() == 0 and sizes:
        print(
            f"data: {num_workers} DataLoader worker(s) per reading rank, {len(sizes)} in all; memory each holds "
            f"unshared (Private_Dirty): {max(sizes):.1f} MB at most, {sum(sizes) / len(sizes):.1f} MB on average",
            flush=True,
        )
