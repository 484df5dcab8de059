"""Save and resume through Megatron-Core dist_checkpointing (torch_dist).

On-disk layout, completeness and the common state: checkpoint_files.py (no Megatron-Core there).
Model weights and optimizer state are stored as global tensors (the distributed optimizer in its
'fully_reshardable' form), so a checkpoint written at one TP / PP / VP / DP layout loads at any
other. Layout:  DIR/iter_0000010/...  and  DIR/latest_checkpointed_iteration.txt, the tracker, which is
written by rank 0 only after every rank has finished writing the step's files (CheckpointSaver: each
data-parallel rank its share with --ckpt-fully-parallel-save, in a background process with --async-save)
and after their hashes are in the checkpoint's integrity.json (checkpoint_integrity.py), which a resume
checks before it trusts the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import time
from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_ext import checkpoint_integrity, megatron_workarounds
from megatron_ext.atomic_files import write_text_atomically
from megatron_ext.checkpoint_files import (
    TRACKER,
    CheckpointError,
    abandoned_iterations,
    checkpoint_path,
    damage_reason,
    iteration_dir,
    latest_iteration,
    prune_checkpoints,
    read_common_state,
    saved_part,
)
from megatron_ext.model.crystal_config import CrystalConfig


@runtime_checkable
class Stateful(Protocol):
    """A part of a run that a checkpoint saves and restores by name, as plain (common) state."""

    def state_dict(self) -> dict | None: ...

    def load_state_dict(self, state: dict | None) -> None: ...


@runtime_checkable
class ShardedStateful(Protocol):
    """A part whose tensors are sharded over the ranks (the model, the optimizer): written and read through
    dist_checkpointing's sharded state dict. `saved_so_far` holds the sharded entries of the parts before
    it in the registry (the optimizer's refer to the model's)."""

    def sharded_state_dict(self, saved_so_far: dict, is_loading: bool) -> dict: ...

    def load_sharded(self, loaded: dict) -> None: ...


# The distributed optimizer's state in canonical per-parameter form: reshardable to any layout.
# ('fully_sharded_model_space', Megatron-Core 0.16.1's default, relies on flattened ranges that its own
# dist_checkpointing no longer accepts.)
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "fully_reshardable"}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


def _model_keys(model_chunks: list) -> list[str]:
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


class ModelState:
    """The model chunks (any TP / PP / VP) under "model", or "model0", "model1", ... with virtual stages."""

    def __init__(self, model_chunks: list):
        self.chunks = model_chunks

    def sharded_state_dict(self, saved_so_far: dict, is_loading: bool) -> dict:
        return {key: _unwrap(c).sharded_state_dict() for key, c in zip(_model_keys(self.chunks), self.chunks)}

    def load_sharded(self, loaded: dict) -> None:
        for key, chunk in zip(_model_keys(self.chunks), self.chunks):
            _unwrap(chunk).load_state_dict(loaded[key])


class OptimizerState:
    """Megatron's optimizer (plain or distributed) under "optimizer", in its reshardable form; registered
    after the model, whose entries its own refer to."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def sharded_state_dict(self, saved_so_far: dict, is_loading: bool) -> dict:
        if is_loading:
            megatron_workarounds.apply()  # (pretrain applied them at start-up already: this is for other callers)
            megatron_workarounds.materialize_optimizer_state(self.optimizer)
        model = {k: v for k, v in saved_so_far.items() if k.startswith("model")}
        state = self.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=_OPTIMIZER_FORMAT)
        return (
            {"optimizer": state} if is_loading else {"optimizer": state, "use_distributed_optimizer": self.distributed}
        )

    def load_sharded(self, loaded: dict) -> None:
        self.optimizer.load_state_dict(loaded["optimizer"])
        megatron_workarounds.unshare_adam_steps(self.optimizer)

    @property
    def distributed(self) -> bool:
        return any(isinstance(o, DistributedOptimizer) for o in megatron_workarounds.inner_optimizers(self.optimizer))

    def check_resumable(self, path: str, common: dict) -> None:
        if common["use_distributed_optimizer"] != self.distributed:
            raise CheckpointError(
                f"{path} was saved {'with' if common['use_distributed_optimizer'] else 'without'} "
                "--use-distributed-optimizer; resume the same way, or pass --finetune to take the weights only"
            )


def checkpoint_metadata(crystal: CrystalConfig, padded_vocab: int, tokenizer: dict | None) -> dict:
    """What a checkpoint says of itself besides its states: the model config, the padded vocabulary, and
    the tokenizer it trained with ({"type", "model"}, for the release tools)."""
    return {"model_config": dataclasses.asdict(crystal), "padded_vocab_size": padded_vocab, "tokenizer": tokenizer}


def _save_strategy(fully_parallel: bool):
    """torch_dist, and with fully_parallel each data-parallel rank writing its share of what its
    model-parallel group holds (Megatron-Core's FullyParallelSaveStrategyWrapper); without it the first
    data-parallel rank writes everything."""
    strategy = get_default_save_sharded_strategy("torch_dist")
    if fully_parallel and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        strategy = FullyParallelSaveStrategyWrapper(strategy, group)
    return strategy


def _load_strategy(path: str, fully_parallel: bool):
    """The checkpoint's own strategy; with fully_parallel each data-parallel rank reads a share and the
    ranks exchange the rest (FullyParallelLoadStrategyWrapper), instead of every rank reading everything."""
    if not fully_parallel:
        return None
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), group)


@dataclasses.dataclass
class _InFlight:
    iteration: int
    path: str
    started: float


class CheckpointSaver:
    """Writes checkpoints under root: DIR/iter_N, then the files beside it (data_state.json), then the
    tracker, which is written only once every rank's write is complete. A run resumes from the tracker's
    checkpoint, so a save that dies half-way (a kill, a full disk) leaves the previous one as the resume point.

    asynchronous (--async-save): save() prepares the state and hands the write to a background process
    (Megatron-Core's AsyncCallsQueue over dist_checkpointing's async torch_dist strategy) and returns; the
    step goes on. poll(), called by every rank after every step, completes a finished write (a collective,
    only while one is in flight); wait() blocks until it is done, as the run's last save and a stop signal
    do. One write is in flight at a time: a save waits for the one before it. on_complete(path) is called
    on every rank when a checkpoint is complete (the training's post_checkpoint_saved).
    """

    def __init__(self, root: str, keep_last: int | None = None, fully_parallel: bool = False,
                 asynchronous: bool = False, on_complete=None, retain_interval: int | None = None,
                 persistent_worker: bool = False, hash_files: bool = True):  # fmt: skip
        self.root, self.keep_last, self.fully_parallel = root, keep_last, fully_parallel
        self.hash_files = hash_files
        self.hash_seconds = 0.0  # of the last save: this rank's hashing of its files (see _complete)
        self.retain_interval = retain_interval
        self.on_complete = on_complete or (lambda path: None)
        self.queue = AsyncCallsQueue(persistent=persistent_worker) if asynchronous else None
        self.in_flight: _InFlight | None = None
        self.gather_seconds = 0.0  # of the last save: building the state to write (see save)

    def save(self, iteration: int, states: Mapping[str, object], metadata: dict, side_files=None) -> str:
        """Write iteration's checkpoint of states (see save_checkpoint); side_files: {name: text} written
        into it by rank 0 once the tensors are complete. Returns its path; with asynchronous, the write
        may still be in flight."""
        self.wait()
        path = iteration_dir(self.root, iteration)
        if torch.distributed.get_rank() == 0:
            if iteration in abandoned_iterations(self.root):  # a rolled-back run's, or a failed save's
                shutil.rmtree(path)
            os.makedirs(path, exist_ok=True)
        torch.distributed.barrier()
        state: dict = {}
        started = time.perf_counter()
        for name, part in states.items():
            if isinstance(part, ShardedStateful):
                state.update(part.sharded_state_dict(state, is_loading=False))
            else:
                state[name] = part.state_dict()
        # The distributed optimizer's reshardable form gathers its state over the data-parallel ranks here:
        # part of what a step waits for even with --async-save.
        self.gather_seconds = time.perf_counter() - started
        plain = sorted(name for name, part in states.items() if not isinstance(part, ShardedStateful))
        state.update(metadata, iteration=iteration, has_optimizer="optimizer" in states, parts=plain)
        self.in_flight = _InFlight(iteration, path, time.perf_counter())
        complete = functools.partial(self._complete, path, dict(side_files or {}))
        with self._failures_reported():
            strategy = _save_strategy(self.fully_parallel)
            request = dist_checkpointing.save(state, path, sharded_strategy=strategy,
                                              async_sharded_save=self.queue is not None)  # fmt: skip
            if self.queue is None:
                complete()
            else:
                request.add_finalize_fn(complete)
                self.queue.schedule_async_request(request)
        return path

    def poll(self) -> None:
        """Complete a background write that has finished on every rank (a collective while one is in flight)."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            with self._failures_reported():
                self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until the write in flight, if any, is complete."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            with self._failures_reported():
                self.queue.maybe_finalize_async_calls(blocking=True)

    def close(self, abort: bool = False) -> None:
        """Wait for the write in flight; abort: stop it instead (after an error, when other ranks may be
        gone), leaving the tracker at the previous checkpoint."""
        if self.queue is None:
            return
        if abort:
            self.queue.close(abort=True)
            self.in_flight = None
        else:
            self.wait()

    def _complete(self, path: str, side_files: dict) -> None:
        """Every rank's tensors are written: each rank hashes the shard files it wrote; rank 0 writes the side
        files and the manifest (hashing the rest), then the tracker, pruning; then on_complete."""
        torch.distributed.barrier()
        rank, started = torch.distributed.get_rank(), time.perf_counter()
        mine = {}
        if self.hash_files:
            mine = checkpoint_integrity.hash_files(path, checkpoint_integrity.shard_files_written_by(path, rank))
        every = [None] * torch.distributed.get_world_size() if rank == 0 else None
        torch.distributed.gather_object(mine, every, dst=0)
        if rank == 0:
            for name, text in side_files.items():
                write_text_atomically(os.path.join(path, name), text)
            if self.hash_files:
                checkpoint_integrity.write_manifest(path, {k: v for hashed in every for k, v in hashed.items()})
        self.hash_seconds = time.perf_counter() - started
        if rank == 0:
            write_text_atomically(os.path.join(self.root, TRACKER), str(self.in_flight.iteration))
            prune_checkpoints(self.root, self.keep_last, self.retain_interval)
        torch.distributed.barrier()
        if self.queue is not None:
            seconds = time.perf_counter() - self.in_flight.started
            if torch.distributed.get_rank() == 0:
                hashing = f" and hashed in {self.hash_seconds:.2f} s" if self.hash_files else ""
                print(f"checkpoint {path} complete: written in the background in {seconds:.1f} s{hashing}", flush=True)
        self.in_flight = None
        self.on_complete(path)

    @contextlib.contextmanager
    def _failures_reported(self):
        """A failed write (a full disk, a quota), synchronous or in the background, becomes one
        CheckpointError on every rank, the partial directory removed."""
        try:
            yield
        # It surfaces as any of several types; torch's CheckpointException, which carries every rank's
        # failure, derives from BaseException.
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            failed, self.in_flight = self.in_flight, None
            if failed is None:
                raise
            latest = latest_iteration(self.root)
            if torch.distributed.get_rank() == 0:
                shutil.rmtree(failed.path, ignore_errors=True)
            last = iteration_dir(self.root, latest) if latest is not None else "none"
            free = shutil.disk_usage(self.root).free
            raise CheckpointError(
                f"--save {self.root}: the save of iteration {failed.iteration} failed "
                f"({failure_reason(e, free, directory_bytes(last) if latest is not None else None)}); its partial "
                f"directory is removed; the last complete checkpoint: {last}"
            ) from None


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def failure_reason(error: BaseException, free: int, needed: int | None) -> str:
    """Why a save failed, with the free space: a disk with less free than the last checkpoint took is named
    full whatever the writer said (torch's zip writer reports a short write as "unexpected pos 704 vs 598",
    with no OSError behind it)."""
    cause = save_failure_cause(error)
    if needed is not None and free < needed:
        full = f"no space left on device: {free:,} bytes free there, the last checkpoint took {needed:,}"
        return f"{full}; the writer: {cause}"
    return f"{cause}; {free:,} bytes free there"


def save_checkpoint(
    root: str, iteration: int, states: Mapping[str, object], metadata: dict, keep_last: int | None = None
) -> str:
    """Write DIR/iter_N and then the tracker, synchronously (CheckpointSaver writes in the background).

    states: every part of the run by name, in order (TorchTitan's states registry): sharded ones (ModelState,
    OptimizerState) through dist_checkpointing's sharded tensors, plain ones (the scheduler, the data feed,
    the update guard) as common state under their names; adding a part to the training touches only it and
    the line registering it. Without an "optimizer" (an imported release) a run that loads the checkpoint
    takes its weights and starts at iteration 0. metadata: checkpoint_metadata(...).
    keep_last: afterwards remove all but the newest keep_last checkpoints.
    """
    return CheckpointSaver(root, keep_last).save(iteration, states, metadata)


def save_failure_cause(error: BaseException) -> str:
    """The reason a save failed, in one line: the first OSError in the chain (e.g. "[Errno 28] No space
    left on device"), else the last line of the writer's own failure (torch's CheckpointException holds
    each rank's)."""
    failures = getattr(error, "failures", None)
    if failures:  # rank -> (exception, its traceback text)
        first = next(iter(failures.values()))
        error = next((x for x in first if isinstance(x, BaseException)), error) if isinstance(first, tuple) else first
    link = error
    while link is not None:
        if isinstance(link, OSError):
            return str(link)
        link = link.__cause__ or link.__context__
    lines = str(error).strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def check_model_matches(path: str, common: dict, crystal: CrystalConfig, padded_vocab: int) -> None:
    saved = CrystalConfig(**common["model_config"])
    if saved != crystal:
        diff = {
            f.name: (getattr(saved, f.name), getattr(crystal, f.name))
            for f in dataclasses.fields(CrystalConfig)
            if getattr(saved, f.name) != getattr(crystal, f.name)
        }
        raise CheckpointError(f"{path} holds a different model: (saved, requested) = {diff}")
    saved_padded = common.get("padded_vocab_size", padded_vocab)
    if saved_padded != padded_vocab:
        raise CheckpointError(
            f"{path} has a vocabulary padded to {saved_padded} rows, this run pads to {padded_vocab}: "
            "set --make-vocab-size-divisible-by as when it was saved"
        )


def job_readers() -> checkpoint_integrity.Readers:
    """Every rank of the job checks a share of a checkpoint's files; the first changed file any rank finds is
    every rank's answer (one small all-gather per checkpoint looked at); rank 0 says it."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    def agree(reason: str | None) -> str | None:
        reasons = [None] * world
        torch.distributed.all_gather_object(reasons, reason)
        return next((r for r in reasons if r), None)

    return checkpoint_integrity.Readers(rank, world, agree, say=lambda line: rank == 0 and print(line, flush=True))


def load_model_weights(path: str, model_chunks, verify: bool = True) -> None:
    """The model weights of the checkpoint at path into these chunks (any TP / PP / VP), once its files
    verify (verify=False: unchecked)."""
    reason = damage_reason(path, job_readers() if verify else None)
    if reason is not None:
        raise CheckpointError(reason)
    model = ModelState(model_chunks)
    model.load_sharded(dist_checkpointing.load(model.sharded_state_dict({}, is_loading=True), path))


def load_checkpoint(
    root: str,
    states: Mapping[str, object],
    crystal: CrystalConfig,
    padded_vocab: int,
    step: int | None = None,
    weights_only: bool = False,
    fully_parallel: bool = False,
    skip: frozenset = frozenset(),
    verify: bool = True,
) -> int:
    """Resume from the checkpoint of iteration step (default: the latest) under root: every part of
    `states` by its name (see save_checkpoint; a plain part the checkpoint lacks gets None).

    fully_parallel (--ckpt-fully-parallel-load): each data-parallel rank reads a share and they exchange it.
    Returns the iteration; 0, with the other parts untouched, when root has no checkpoint yet or when only
    the model's weights are taken: with weights_only (--finetune), or from a checkpoint without optimizer
    state. skip: parts left as they are while the iteration and the rest are resumed (--no-load-optim).
    verify (--verify-integrity, the default): the checkpoint's files are hashed against its manifest first,
    a share by each rank; the latest one, if changed, is passed over for the newest one that verifies.
    """
    path = checkpoint_path(root, step, job_readers() if verify else None)
    if path is None:
        return 0
    common = read_common_state(path)
    check_model_matches(path, common, crystal, padded_vocab)
    weights_only = weights_only or not common.get("has_optimizer", True)
    optimizer = states.get("optimizer")
    if not weights_only and optimizer is not None and "optimizer" not in skip:
        optimizer.check_resumable(path, common)
    sharded = {
        n: p
        for n, p in states.items()
        if isinstance(p, ShardedStateful) and (n == "model" or not weights_only) and n not in skip
    }
    template: dict = {}
    for part in sharded.values():
        template.update(part.sharded_state_dict(template, is_loading=True))
    loaded = dist_checkpointing.load(template, path, sharded_strategy=_load_strategy(path, fully_parallel))
    for part in sharded.values():
        part.load_sharded(loaded)
    if (weights_only or "optimizer" in skip) and optimizer is not None:
        optimizer.optimizer.reload_model_params()  # the fresh optimizer's main copies from the loaded weights
    if weights_only:
        return 0
    for name, part in states.items():
        if not isinstance(part, ShardedStateful) and name not in skip:
            part.load_state_dict(saved_part(common, name))
    return common["iteration"]
