#!/usr/bin/env python
"""Train a LLaMA-style SentencePiece model (BPE, byte fallback, split digits, identity normalisation,
unk/bos/eos = 0/1/2) on JSONL or plain-text files. Crystal's 18 special tokens follow its vocabulary
when megatron_ext's CrystalTokenizer loads it (ids vocab_size..vocab_size+17, padded to a multiple of 32),
then CodeGen2's span-corruption sentinels (<mask_1>..<mask_N>, <sep>, <eom>; --codegen2-sentinels N,
listed in PREFIX.specials.json beside the model; 0: none).

  python tools/train_tokenizer.py --input corpus/*.jsonl --vocab-size 8000 --output-prefix tok/crystal
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.atomic_files import write_text_atomically  # noqa: E402
from megatron_ext.tokenizer import (  # noqa: E402
    CRYSTAL_SPECIAL_TOKENS,
    CrystalTokenizer,
    codegen2_sentinels,
    specials_path,
)


def lines_of(paths: list[str], json_key: str) -> Iterator[str]:
    """SentencePiece trains on lines: each non-empty line of each document."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                text = json.loads(line).get(json_key, "") if path.endswith(".jsonl") else line
                for piece in text.splitlines():
                    if piece.strip():
                        yield piece


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help=".jsonl (documents under --json-key) or plain text")
    p.add_argument("--json-key", default="text")
    p.add_argument("--vocab-size", type=int, default=32000, help="SentencePiece pieces (LLaMA: 32000)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    p.add_argument("--max-lines", type=int, default=2_000_000, help="lines sampled for training")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--codegen2-sentinels",
        type=int,
        default=8,
        help="CodeGen2's <mask_1>..<mask_N> after Crystal's specials, with <sep> and <eom> (the most spans a "
        "document's span corruption can cut; 0: none). Up to 12 keep a 32000-piece vocabulary at 32032 rows",
    )
    args = p.parse_args(argv)
    if args.codegen2_sentinels < 0:
        p.error(f"--codegen2-sentinels {args.codegen2_sentinels}: must be >= 0")
    for path in args.input:
        if not os.path.isfile(path):
            p.error(f"--input {path}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    import sentencepiece

    sentencepiece.set_random_generator_seed(args.seed)  # the sampled training lines
    tmp_prefix = f"{args.output_prefix}.tmp{os.getpid()}"
    sentencepiece.SentencePieceTrainer.Train(
        sentence_iterator=lines_of(args.input, args.json_key),
        model_prefix=tmp_prefix,
        model_type="bpe",
        vocab_size=args.vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        character_coverage=0.99995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        input_sentence_size=args.max_lines,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        max_sentence_length=16384,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    model = args.output_prefix + ".model"
    sentinels = codegen2_sentinels(args.codegen2_sentinels)
    if sentinels:
        write_text_atomically(specials_path(model), json.dumps({"after_crystal": list(sentinels)}) + "\n")
    elif os.path.exists(specials_path(model)):  # a previous model's, which this one must not inherit
        os.remove(specials_path(model))
    for ext in (".model", ".vocab"):
        os.replace(tmp_prefix + ext, args.output_prefix + ext)
    tok = CrystalTokenizer(model)
    crystal_end = tok.base_vocab_size + len(CRYSTAL_SPECIAL_TOKENS)
    extra = (
        f", {len(sentinels)} CodeGen2 sentinels at {crystal_end}..{crystal_end + len(sentinels) - 1}"
        if sentinels
        else ""
    )
    print(
        f"wrote {model}: {tok.base_vocab_size} pieces + {len(CRYSTAL_SPECIAL_TOKENS)} Crystal specials at "
        f"{tok.base_vocab_size}..{crystal_end - 1}{extra}, padded vocabulary {tok.vocab_size}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
