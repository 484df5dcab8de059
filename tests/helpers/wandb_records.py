"""The scalars of a W&B offline run, read from its run-*.wandb file.

wandb 0.31 no longer ships a Python reader of its transaction log (its Go core writes and syncs it), so
this is written by hand: the file is a 7-byte header (":W&B", magic 0xBEE1, version) and then LevelDB's
log format (32 KiB blocks of records: CRC32C (4 bytes), length (2), type (1: full, 2: first, 3: middle,
4: last)), each assembled record a wandb_internal_pb2.Record.
"""

import glob
import json
import os

BLOCK, HEADER, FILE_HEADER = 32768, 7, 7


def _payloads(data: bytes):
    pos, parts = FILE_HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding written before a block's end
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            yield parts
            parts = b""


def _records(save_dir: str):
    from wandb.proto import wandb_internal_pb2

    runs = glob.glob(os.path.join(save_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1, runs
    for payload in _payloads(open(runs[0], "rb").read()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def run_history(save_dir: str) -> list[dict]:
    """Every wandb.log row of the one offline run under save_dir: {"_step": N, name: value, ...}."""
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
        for record in _records(save_dir)
        if record.WhichOneof("record_type") == "history"
    ]


def run_identity(save_dir: str) -> dict:
    """The offline run's project, entity and display name, as its run record holds them."""
    run = next(r.run for r in _records(save_dir) if r.WhichOneof("record_type") == "run")
    return {"project": run.project, "entity": run.entity, "name": run.display_name}


def scalar_series(save_dir: str) -> dict[str, list[tuple[int, float]]]:
    """name -> [(step, value), ...] of the run's logged scalars (W&B's own _step, _runtime, _timestamp out)."""
    series: dict[str, list] = {}
    for row in run_history(save_dir):
        for name, value in row.items():
            if not name.startswith("_"):
                series.setdefault(name, []).append((row["_step"], value))
    return series
