"""Fill-in-the-middle, online, per document run, as Crystal applied it to code.

With probability fim_rate a document run (its end-of-document token kept outside) is decoded to text,
cut at two character positions drawn uniformly, and the three parts re-encoded each as text that follows
a special token (encode_part: no SentencePiece dummy-prefix space, exactly as the exported Hugging Face
tokenizer encodes an infilling prompt, so the ids of prefix + middle + suffix decode to the run, whether
it starts its document or inside one: data/run_transforms.py):
  PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle
  SPM (probability fim_spm_rate): <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle
A rewrite never loses its middle to the row's end: a run whose rewrite does not fit the room left is
rewritten shortened (data/run_transforms.py); short rows are padded with <fim_pad>, which carries no loss.

Every draw comes from a generator seeded by (seed, source, epoch, document id, the run's start inside the
document): the output for a document does not depend on the worker that builds it or on access order
(data/run_transforms.py, which span corruption shares).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_ext.data.run_transforms import UNCHOSEN, RunText, rewrite_runs
from megatron_ext.data.source_stream import Segment
from megatron_ext.tokenizer.crystal_tokenizer import special_token_ids

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>")
_FIM_STREAM = 2


@dataclass(frozen=True)
class FimTokenIds:
    prefix: int
    middle: int
    suffix: int
    pad: int

    @classmethod
    def of(cls, tokenizer) -> "FimTokenIds | None":
        """The ids in this tokenizer, or None when it lacks any of them."""
        ids = special_token_ids(tokenizer)
        if not all(t in ids for t in FIM_TOKENS):
            return None
        return cls(*(ids[t] for t in FIM_TOKENS))


def encode_part(tokenizer, text: str) -> list[int]:
    """A FIM part, in training and in prompts: each part follows a special token."""
    return tokenizer.encode_after_special(text)


def infilling_prompt(tokenizer, ids: FimTokenIds, prefix: str, suffix: str) -> list[int]:
    """The PSM prompt for infilling with a trained model: the model continues with the middle. The
    exported Hugging Face tokenizer encodes "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    to these ids (tests/test_release.py)."""
    return [ids.prefix, *encode_part(tokenizer, prefix), ids.suffix, *encode_part(tokenizer, suffix), ids.middle]


def permute_document(run: RunText, rng: np.random.Generator, spm_rate: float, tokenizer, ids: FimTokenIds) -> list[int]:
    text = run.text
    lo, hi = sorted(rng.integers(0, len(text) + 1, size=2))
    prefix, middle, suffix = run.encode(tokenizer, [text[:lo], text[lo:hi], text[hi:]], first_follows_special=True)
    if rng.random() < spm_rate:
        return [ids.prefix, ids.suffix, *suffix, ids.middle, *prefix, *middle]
    return [ids.prefix, *prefix, ids.suffix, *suffix, ids.middle, *middle]


def apply_fim(
    tokens: np.ndarray,
    segments: list[Segment],
    rate: float,
    spm_rate: float,
    key: tuple[int, ...],
    tokenizer,
    ids: FimTokenIds,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(tokens of the same length, loss mask for the labels tokens[1:], each run's outcome: run_transforms).
    key: (seed, source, epoch)."""
    if rate <= 0:
        return tokens, np.ones(len(tokens) - 1, dtype=np.float32), [UNCHOSEN] * len(list(segments))
    rewrite = lambda run, rng: permute_document(run, rng, spm_rate, tokenizer, ids)  # noqa: E731
    return rewrite_runs(tokens, segments, rate, key, _FIM_STREAM, tokenizer, rewrite, ids.pad)
