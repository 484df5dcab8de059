#!/usr/bin/env python
"""Which documents went into which training steps of a --phases run: to trace a loss spike to its data.

The sample stream of a phases run is a function of the phases file, the sequence length and the saved
schedule, so nothing needs to be logged during training: this tool replays it. One JSON line per step:

  {"step": 101, "phase": "text+code", "samples": [{"source": "code", "index": 412, "epoch": 0,
    "runs": [[doc_id, offset_in_doc, length], ...]}, ...]}

  python tools/data_trace.py --phases examples/phases/demo.yaml --seq-length 256 --global-batch-size 8 \\
      --steps 101-110 [--load runs/demo/checkpoints --ckpt-step 100]

With --load, the replay starts from that checkpoint's saved schedule (needed when the phases file was
edited during the run; faster for late steps of blended phases); otherwise from the first step. Phases in
Cerebras's order (order: cerebras) are jumped over, not replayed: any step of Crystal's 322,000 is traced
in seconds.

With --ids (and the run's --tokenizer-model), each sample also carries what the model read: "ids", the
row of seq_length + 1 ids after FIM or span corruption (inputs ids[:-1], labels ids[1:]), "text", their
decoding, and each run a fourth field, what the objective did with it ("rewritten", "shortened",
"no_room", "not_rewritable"; null: left causal by the draw; data/run_transforms.py). An HDF5 sample
(data/hdf5_source.py) is named "sample": "FILE:ROW"; with --ids its "ids", "labels" and "loss_mask" are
the rows as stored.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.tokenizer import add_tokenizer_type_argument  # noqa: E402
from megatron_ext.training.arguments import add_run_flags  # noqa: E402
from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported


def _fail(message: str) -> int:
    print(f"data_trace.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", required=True)
    p.add_argument("--seq-length", type=int, required=True)
    add_run_flags(p, "global_batch_size", "seed")  # as pretrain_crystal.py defines them
    p.add_argument("--steps", required=True, help="FIRST-LAST (1-based, inclusive)")
    p.add_argument("--load", help="checkpoint directory: start from its saved schedule")
    p.add_argument("--ckpt-step", type=int)
    p.add_argument("--ids", action="store_true", help="print each sample's ids and text after the transforms")
    p.add_argument("--tokenizer-model", help="the run's tokenizer (needed with --ids)")
    add_tokenizer_type_argument(p)
    args = p.parse_args(argv)

    from megatron_ext.data.phase_schedule import PhaseSchedule
    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.data.phases_config import PhasesConfigError, load_phases

    try:
        first, last = (int(x) for x in args.steps.split("-"))
        assert 1 <= first <= last
    except (ValueError, AssertionError):
        return _fail(f"--steps {args.steps}: expected FIRST-LAST with 1 <= FIRST <= LAST")
    tokenizer = None
    if args.ids:
        from megatron_ext.tokenizer import TokenizerError, build_tokenizer

        if not args.tokenizer_model:
            return _fail("--ids needs the run's --tokenizer-model (FIM and span corruption re-encode text)")
        try:
            tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        except TokenizerError as e:
            return _fail(str(e))
    try:
        config = load_phases(args.phases, args.seq_length, args.global_batch_size, args.seed, **_tokens_of(tokenizer))
    except PhasesConfigError as e:
        return _fail(str(e))
    schedule, done = PhaseSchedule(config), 0
    if args.load:
        from megatron_ext.checkpoint_files import CheckpointError, checkpoint_path, read_common_state, saved_part

        try:
            path = checkpoint_path(args.load, args.ckpt_step)
            common = read_common_state(path) if path else None
        except CheckpointError as e:
            return _fail(str(e))
        data = saved_part(common, "data") if common else None
        if not data or not data["schedule"]:
            return _fail(f"--load {args.load}: no checkpoint with a phase schedule")
        schedule, note = PhaseSchedule.from_state_dict(config, data["schedule"], data["consumed_samples"])
        if note:
            print(f"warning: {note}", file=sys.stderr)
        done = common["iteration"]
        if first <= done:
            return _fail(f"--steps {args.steps}: the checkpoint is at step {done}; trace steps after it")
    dataset = PhasedDataset(config, args.seq_length, tokenizer)
    total = config.total_iters
    if last > total:
        return _fail(f"--steps {args.steps}: the phases have {total} steps")
    schedule.advance_to(*config.phase_step(first - 1))  # a Cerebras-ordered phase in one jump (phase_schedule.py)
    for step in range(first, last + 1):
        refs = schedule.take(schedule.next_step_batch_size())
        samples = [_described(dataset, ref, tokenizer) for ref in refs]
        print(json.dumps({"step": step, "phase": config.phases[refs[0].phase].name, "samples": samples}))
    return 0


def _described(dataset, ref, tokenizer) -> dict:
    """One sample's line entry: its document runs (an HDF5 sample: FILE:ROW), and with a tokenizer (--ids)
    what the model read."""
    from megatron_ext.data.hdf5_source import Hdf5Source
    from megatron_ext.data.run_transforms import OUTCOMES, UNCHOSEN

    stream = dataset.streams[ref.source]
    epoch, position = stream.locate(ref.index)
    sample = {"source": stream.spec.name, "phase_index": ref.phase, "index": ref.index, "epoch": epoch}
    if isinstance(stream, Hdf5Source):  # a ready sample: where it lies, and (--ids) its rows as stored
        sample["sample"] = "%s:%d" % stream.where(ref.index)
        if tokenizer is not None:
            item = dataset[ref]
            sample["ids"], sample["labels"] = item["tokens"].tolist(), item["labels"].tolist()
            sample["loss_mask"] = item["loss_mask"].int().tolist()
            sample["text"] = tokenizer.decode(item["tokens"])
        return sample
    _, runs = stream.packed(epoch, position)
    sample["runs"] = [[r.doc_id, r.doc_offset, r.length] for r in runs]
    if tokenizer is not None:
        row, _, outcomes, _, _ = dataset.transformed(ref)
        sample["ids"] = row.tolist()
        sample["text"] = tokenizer.decode(row)
        for run, outcome in zip(sample["runs"], outcomes):
            run.append(None if outcome == UNCHOSEN else OUTCOMES[outcome])
    return sample


def _tokens_of(tokenizer) -> dict:
    """What the phases file is checked against: the tokenizer's FIM tokens and sentinels (without one,
    the transforms are not replayed, so any phases file the run accepted is accepted)."""
    if tokenizer is None:
        return {"has_fim_tokens": True, "sentinels": None}
    from megatron_ext.data.fim import FimTokenIds
    from megatron_ext.data.span_corruption import sentinel_count

    return {"has_fim_tokens": FimTokenIds.of(tokenizer) is not None, "sentinels": sentinel_count(tokenizer)}


if __name__ == "__main__":
    sys.exit(main())
