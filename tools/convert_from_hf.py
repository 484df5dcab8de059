#!/usr/bin/env python
"""Import a CrystalCoder Hugging Face directory (LLM360's release, or one convert_to_hf.py wrote) as a
dist checkpoint that pretrain_crystal.py --load continues from.

  python tools/convert_from_hf.py --input LLM360/CrystalCoder --save ckpt/crystal-release \\
      [--tensor-model-parallel-size 2 --pipeline-model-parallel-size 4]

The checkpoint holds global tensors and loads at any TP / PP; the sizes given here are the layout you
intend to train at and are checked against the model now. It holds weights only: the run that loads it
starts at iteration 0 with a fresh optimizer and learning-rate schedule (a new phase, a cooldown).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported

from megatron_ext.tokenizer import add_tokenizer_type_argument  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="Hugging Face directory (config.json + weights)")
    p.add_argument("--save", required=True, help="checkpoint directory to create")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="as pretrain_crystal.py will use")
    p.add_argument(
        "--tokenizer-model", help="tokenizer to record in the checkpoint (default: the input's tokenizer.model)"
    )
    add_tokenizer_type_argument(p)
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"convert_from_hf.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_ext.release.hf_format import FormatError, read_hf_config
    from megatron_ext.release.hf_import import import_checkpoint
    from megatron_ext.release.hf_weights import HFWeights
    from megatron_ext.release.staging import OutputExistsError, check_output, staged_directory

    if not os.path.isdir(args.input):
        return _fail(f"--input {args.input}: no such directory")
    try:
        check_output(args.save, "--save")
        cfg = read_hf_config(args.input)
        weights = HFWeights(args.input, cfg)
    except (OutputExistsError, FormatError) as e:
        return _fail(str(e))
    from megatron_ext.model.crystal_config import layout_problem

    problem = layout_problem(
        cfg, args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.make_vocab_size_divisible_by
    )
    if problem:
        return _fail(problem)
    tokenizer_model = args.tokenizer_model
    if tokenizer_model is None and os.path.isfile(os.path.join(args.input, "tokenizer.model")):
        tokenizer_model = os.path.join(args.input, "tokenizer.model")
    if tokenizer_model is not None and not os.path.isfile(tokenizer_model):
        return _fail(f"--tokenizer-model {tokenizer_model}: no such file")
    tokenizer = {"type": args.tokenizer_type, "model": os.path.abspath(tokenizer_model)} if tokenizer_model else None

    print(f"importing {args.input}: {cfg.num_parameters():,} parameters, {cfg.num_layers} layers -> {args.save}")
    start = time.time()
    with staged_directory(args.save) as staging:
        path = import_checkpoint(weights, staging, args.make_vocab_size_divisible_by, tokenizer)
    print(
        f"wrote {os.path.join(args.save, os.path.basename(path))} in {time.time() - start:.1f}s; train from it with "
        f"pretrain_crystal.py --load {args.save} (iteration 0, fresh optimizer)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
