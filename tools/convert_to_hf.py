#!/usr/bin/env python
"""Export a pretrain_crystal.py checkpoint (any TP / PP / DP layout, with or without the distributed
optimizer) as a Hugging Face directory in LLM360's CrystalCoder format, and check its logits.

  python tools/convert_to_hf.py --load runs/demo/checkpoints --output runs/demo/hf [--ckpt-step N]
      [--dtype bf16|fp32] [--verify | --no-verify]

The output loads with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True). It is built in a
hidden sibling directory and renamed at the end, so an interrupted export never looks complete.
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

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
VERIFY_BY_DEFAULT_UP_TO = 2_000_000_000  # parameters; above this --verify holds two copies of a big model


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint directory (as given to pretrain_crystal.py --save)")
    p.add_argument("--ckpt-step", type=int, help="iteration to export (default: the latest)")
    p.add_argument("--output", required=True, help="Hugging Face directory to create")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the stored weights")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size")
    p.add_argument("--tokenizer-model", help="tokenizer to ship (default: the one the checkpoint was trained with)")
    add_tokenizer_type_argument(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--verify",
        dest="verify",
        action="store_true",
        default=None,
        help=f"compare logits and greedy output with the Megatron model (default on up to "
        f"{VERIFY_BY_DEFAULT_UP_TO / 1e9:.0f}B parameters)",
    )
    g.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument(
        "--no-verify-integrity",
        dest="verify_integrity",
        action="store_false",
        help="read the checkpoint without hashing its files against its integrity.json first (as pretrain_crystal.py)",
    )
    return p.parse_args(argv)


def _fail(message: str) -> int:
    print(f"convert_to_hf.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from megatron_ext.checkpoint_files import CheckpointError
    from megatron_ext.release import hf_export, parity
    from megatron_ext.release.dist_checkpoint_reader import DistCheckpointReader
    from megatron_ext.release.hf_tokenizer import save_hf_tokenizer
    from megatron_ext.release.staging import OutputExistsError, check_output, staged_directory
    from megatron_ext.tokenizer import TokenizerError

    dtype = getattr(torch, DTYPES[args.dtype])
    try:
        check_output(args.output, "--output")
        reader = DistCheckpointReader(args.load, args.ckpt_step, args.verify_integrity)
    except (OutputExistsError, CheckpointError) as e:
        return _fail(str(e))
    cfg = reader.crystal
    tokenizer_type, tokenizer_model = args.tokenizer_type, args.tokenizer_model
    if tokenizer_model is None and reader.tokenizer:
        tokenizer_type, tokenizer_model = reader.tokenizer["type"], reader.tokenizer["model"]
    if tokenizer_model is not None and not os.path.isfile(tokenizer_model):
        return _fail(
            f"tokenizer {tokenizer_model} (from {'--tokenizer-model' if args.tokenizer_model else reader.path}) "
            "does not exist"
        )
    verify = args.verify if args.verify is not None else cfg.num_parameters() <= VERIFY_BY_DEFAULT_UP_TO
    print(
        f"exporting {reader.path} (iteration {reader.iteration}): {cfg.num_parameters():,} parameters, "
        f"{cfg.num_layers} layers, vocab {cfg.vocab_size} (padded {reader.padded_vocab}) -> {args.output} "
        f"({args.dtype})"
    )

    start = time.time()
    try:
        with staged_directory(args.output) as staging:
            tokenizer = None
            if tokenizer_model is not None:
                tokenizer = save_hf_tokenizer(tokenizer_type, tokenizer_model, staging)
            else:
                print(
                    "warning: the checkpoint names no tokenizer (mock data?) and none was given: "
                    "no tokenizer files written"
                )
            hf_export.write_metadata_files(cfg, staging)
            index = hf_export.write_weights(reader, staging, dtype, int(args.max_shard_size_gb * 2**30))
            peak = hf_export.peak_rss_bytes()
            shards = len(set(index["weight_map"].values()))
            print(
                f"wrote {len(index['weight_map'])} tensors, {index['metadata']['total_size'] / 2**20:,.1f} MiB "
                f"in {shards} shard(s) in {time.time() - start:.1f}s; peak resident memory {peak / 2**20:,.0f} MiB"
            )
            if verify:
                # The reader hashed the checkpoint's files already (or was told not to).
                report = parity.verify(
                    reader.path, cfg, reader.padded_vocab, staging, dtype, tokenizer, verify_integrity=False
                )
                decode = tokenizer.decode if tokenizer is not None else str
                for meg, hf in zip(report.megatron_greedy, report.hf_greedy):
                    print(f"  greedy  megatron: {decode(meg)!r}\n          hf:       {decode(hf)!r}")
                print(
                    f"verify: max |delta logits| {report.max_abs_diff:.3e} (tolerance {parity.TOLERANCE:g}, "
                    f"logits up to {report.logit_scale:.2f}); greedy continuations "
                    f"{'identical' if report.megatron_greedy == report.hf_greedy else 'DIFFER'}"
                )
                if not report.ok:
                    raise SystemExit(
                        _fail(
                            "verification failed: the export does not reproduce the Megatron model; nothing was written"
                        )
                    )
    except (CheckpointError, TokenizerError) as e:
        return _fail(str(e))
    print(f"done: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
