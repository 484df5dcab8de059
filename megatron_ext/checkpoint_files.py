"""Where a run's checkpoints live and whether one can be read: DIR/iter_0000010/ directories, the tracker
DIR/latest_checkpointed_iteration.txt (written last, so it names only a complete save), completeness down to
each shard file's length and, with its manifest, to each file's hash (checkpoint_integrity.py), pruning, and a
checkpoint's common (non-tensor) state.

The rule: nothing here imports Megatron-Core. Tools that only read checkpoints (tools/evaluate.py and its
--watch, tools/data_trace.py, the HF export's reader) start without its 1.5 s import; saving and
loading sharded state stays in checkpointing.py.
"""

from __future__ import annotations

import os
import shutil

import torch

from megatron_ext import checkpoint_integrity
from megatron_ext.checkpoint_integrity import Readers

TRACKER = "latest_checkpointed_iteration.txt"


class CheckpointError(RuntimeError):
    pass


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int | None:
    """The iteration named by the tracker, or None for a directory with no checkpoint yet."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _saved_iterations(root: str) -> list[int]:
    return sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("iter_") and d[5:].isdigit())


def saved_iterations(root: str) -> list[int]:
    """The complete checkpoints a resume could read (at or before the tracker's iteration), oldest first."""
    latest = latest_iteration(root) if os.path.isdir(root) else None
    if latest is None:
        return []
    return [it for it in _saved_iterations(root) if it <= latest and incomplete_reason(iteration_dir(root, it)) is None]


def incomplete_reason(path: str, tensors: str = "all") -> str | None:
    """Why the checkpoint at path cannot be read in full (None if it can): its index files, and every
    file its tensors live in, present and long enough. tensors="model" checks the model's alone."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in ("metadata.json", "common.pt", ".metadata"):
        if not os.path.isfile(os.path.join(path, name)):
            return (
                f"{path} is not a dist checkpoint (no {name})"
                if name == "metadata.json"
                else f"{path}: {name} is missing"
            )
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated or garbled .metadata raises whatever its unpickling hits
        return f"{path}: cannot read the DCP metadata ({type(e).__name__})"
    needed: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if tensors == "all" or not index.fqn.startswith("optimizer"):
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{path}: shard file {name} is missing"
        if os.path.getsize(file) < end:
            return f"{path}: shard file {name} is truncated ({os.path.getsize(file)} < {end} bytes)"
    return None


def damage_reason(path: str, readers: Readers | None = Readers()) -> str | None:
    """Why the checkpoint at path must not be read (None if it can): with readers, a file whose bytes changed
    since it was written (checkpoint_integrity.py); a file missing or cut short. With several readers every
    rank must call this for the same path (their answers are agreed)."""
    local = checkpoint_integrity.changed_file(path, readers.rank, readers.world) if readers else None
    local = local or incomplete_reason(path)
    return readers.agree(local) if readers else local


def checkpoint_path(root: str, step: int | None = None, readers: Readers | None = Readers()) -> str | None:
    """DIR/iter_N for --ckpt-step N, else the tracker's iteration; None when root has no checkpoint yet.

    readers: who hashes the checkpoint's files against its manifest before it is trusted (default: this
    process alone; None: nobody, --no-verify-integrity). The latest checkpoint, when damaged (a file changed,
    lost or cut short after it was written), is passed over with a line naming the file for the newest one
    before it that is whole; a --ckpt-step checkpoint that is damaged is refused."""
    say = readers.say if readers else print
    if step is not None:
        path = iteration_dir(root, step)
        if not os.path.isdir(path):
            saved = sorted(d for d in os.listdir(root) if d.startswith("iter_"))
            raise CheckpointError(f"{root} has no checkpoint of iteration {step} (found: {', '.join(saved) or 'none'})")
        reason = damage_reason(path, readers)
        if reason is not None:
            raise CheckpointError(f"--ckpt-step {step}: {reason}")
        _say_if_unverified(path, readers)
        return path
    latest = latest_iteration(root)
    if latest is None:
        return None
    reasons = []
    for candidate in [it for it in reversed(_saved_iterations(root)) if it <= latest]:
        path = iteration_dir(root, candidate)
        reason = damage_reason(path, readers)
        if reason is None:
            _say_if_unverified(path, readers)
            return path
        say(f"warning: skipping a damaged checkpoint: {reason}")
        reasons.append(reason)
    raise CheckpointError(
        f"no complete checkpoint at or before iteration {latest}: "
        f"{reasons[0] if reasons else f'{iteration_dir(root, latest)} is missing'}"
    )


def _say_if_unverified(path: str, readers: Readers | None) -> None:
    if readers and not checkpoint_integrity.has_manifest(path):
        readers.say(
            f"warning: {path} has no {checkpoint_integrity.MANIFEST} (saved before checkpoints were hashed): "
            "read unverified"
        )


def abandoned_iterations(root: str) -> list[int]:
    """Checkpoints newer than the tracker's: left by a run that was rolled back (--ckpt-step), or
    half-written by a save that failed. No resume reads them."""
    latest = latest_iteration(root)
    return [] if latest is None else [it for it in _saved_iterations(root) if it > latest]


def prune_checkpoints(root: str, keep: int | None, retain_interval: int | None = None) -> None:
    """Keep the newest `keep` checkpoints at or before the tracker's iteration (the last among them is
    the tracker's own; None: all, or with retain_interval only the tracker's) and those whose iteration is a
    multiple of retain_interval (--save-retain-interval); remove the others, and first the abandoned ones newer
    than the tracker, which would otherwise count towards `keep` and push out a rollback's fallback."""
    if keep is None and retain_interval is None:
        return
    latest = latest_iteration(root)
    valid = [it for it in _saved_iterations(root) if latest is None or it <= latest]
    newest = set(valid[-(keep or 1) :])
    retained = {it for it in valid if retain_interval and it % retain_interval == 0}
    for iteration in abandoned_iterations(root) + [it for it in valid if it not in newest | retained]:
        shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)


def read_common_state(path: str) -> dict:
    """The non-tensor part of a checkpoint (iteration, model config, ...), with a one-line error if absent."""
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointError(f"{path} is not a dist checkpoint (no metadata.json)")
    try:
        # What dist_checkpointing.load_common_state_dict reads (common.pt, torch.load's defaults), without
        # importing Megatron-Core for it.
        common = torch.load(os.path.join(path, "common.pt"), map_location="cpu")
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: cannot read common.pt ({e})") from None
    if "model_config" not in common:
        raise CheckpointError(f"{path} was not written by pretrain_crystal.py (no model_config)")
    return common


def saved_part(common: dict, name: str):
    """The saved state of a plain part, from a checkpoint's common state; None if it has none. Checkpoints
    written before parts were saved by name kept the data stream and the update guard under keys of their
    own (consumed_samples, data_state, guard_state)."""
    if name in common:
        return common[name]
    if name == "data":
        return {"consumed_samples": common.get("consumed_samples", 0), "schedule": common.get("data_state")}
    if name == "update_guard":
        return common.get("guard_state")
    return None
