"""Crystal's tokenizer: a LLaMA-style SentencePiece model plus 18 StarCoder-style special tokens.

The specials follow the SentencePiece vocabulary in the released order (ids 32000..32017 on LLaMA's
32000 pieces) and the vocabulary is padded to a multiple of 32 (32032). They live outside the
SentencePiece model, so plain encoding of user text never produces them: "<|fim_prefix|>" typed in a
document is ordinary text. BOS, EOS (the end-of-document id) and UNK are the model's own (1, 2, 0).

A model may carry more specials after Crystal's 18, listed in a file beside it (PREFIX.specials.json,
which tools/train_tokenizer.py writes): CodeGen2's span-corruption sentinels <mask_1>..<mask_N>, <sep>,
<eom>. With up to 14 of them a 32000-piece vocabulary stays at 32032 rows (the padding rows take them),
so the export keeps the release's shape. Crystal's released tokenizer has no such file, hence none.
"""

from __future__ import annotations

import functools
import json
import os

CRYSTAL_SPECIAL_TOKENS = (
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|filename|>",
    "<|gh_stars|>",
    "<|issue_start|>",
    "<|issue_comment|>",
    "<|issue_closed|>",
    "<|jupyter_start|>",
    "<|jupyter_text|>",
    "<|jupyter_code|>",
    "<|jupyter_output|>",
    "<|empty_output|>",
    "<|commit_before|>",
    "<|commit_msg|>",
    "<|commit_after|>",
    "<|reponame|>",
)
VOCAB_PAD_MULTIPLE = 32
SPECIALS_SUFFIX = ".specials.json"  # beside PREFIX.model: {"after_crystal": [token, ...]}


def codegen2_sentinels(spans: int) -> tuple[str, ...]:
    """CodeGen2's infilling specials: a sentinel per masked span, the separator before the spans, and the
    end-of-mask token each span ends with (its model card's names)."""
    return (*(f"<mask_{i}>" for i in range(1, spans + 1)), "<sep>", "<eom>") if spans else ()


def specials_path(model_path: str) -> str:
    return os.path.splitext(model_path)[0] + SPECIALS_SUFFIX


def extra_special_tokens(model_path: str) -> tuple[str, ...]:
    """The specials after Crystal's 18 that the file beside the model lists (none without one)."""
    path = specials_path(model_path)
    if not os.path.isfile(path):
        return ()
    try:
        with open(path) as f:
            tokens = tuple(json.load(f)["after_crystal"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TokenizerError(f'{path}: not a specials file ({{"after_crystal": [...]}}): {e}') from None
    clash = [t for t in tokens if t in CRYSTAL_SPECIAL_TOKENS or tokens.count(t) > 1]
    if clash or not all(isinstance(t, str) and t for t in tokens):
        raise TokenizerError(f"{path}: special tokens must be non-empty, distinct and not Crystal's: {clash or tokens}")
    return tokens


# LLaMA's ids, which Crystal keeps: BOS, and EOS, which ends every document (the release's eos_token_id).
BOS_ID, EOD_ID = 1, 2


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded; the message names the file."""


class CrystalTokenizer:
    def __init__(self, model_path: str):
        import sentencepiece

        if not os.path.isfile(model_path):
            raise TokenizerError(f"--tokenizer-model {model_path}: no such file")
        self.model_path = model_path
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"--tokenizer-model {model_path}: not a SentencePiece model ({e})") from None
        self.base_vocab_size = self.sp.GetPieceSize()
        specials = (*CRYSTAL_SPECIAL_TOKENS, *extra_special_tokens(model_path))
        self.special_tokens = {tok: self.base_vocab_size + i for i, tok in enumerate(specials)}
        self._id_to_special = {i: tok for tok, i in self.special_tokens.items()}
        unpadded = self.base_vocab_size + len(specials)
        self.vocab_size = -(-unpadded // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
        self.bos, self.eod, self.unk = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        if self.eod < 0:
            raise TokenizerError(f"--tokenizer-model {model_path}: the model has no EOS piece to end documents")

    @property
    def unique_identifiers(self) -> dict:
        """Part of the hash naming Megatron-Core's cached dataset indices."""
        return {"class": type(self).__name__, "model": os.path.abspath(self.model_path), "vocab_size": self.vocab_size}

    def special_token_id(self, token: str) -> int:
        return self.special_tokens[token]

    def encode(self, text: str) -> list[int]:
        return self.sp.EncodeAsIds(text)

    @functools.cached_property
    def _sp_after_special(self):
        """The same model with add_dummy_prefix off: how the exported tokenizer (tokenizer/hf_pipeline.py)
        encodes and decodes the text that follows a special token."""
        import sentencepiece
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        sp = sentencepiece.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto.SerializeToString())
        return sp

    def encode_after_special(self, text: str) -> list[int]:
        """text as it is encoded right after a special token (no dummy-prefix space): a FIM part."""
        return self._sp_after_special.EncodeAsIds(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: preprocess_data parallelises with processes, and SentencePiece's default (every
        # hardware thread per call) would oversubscribe the cores once per worker.
        return self.sp.Encode(texts, out_type=int, num_threads=1)

    def decode(self, ids) -> str:
        """Pieces decode as SentencePiece does; special ids render as their strings; padding ids vanish.
        Text after a special token keeps its leading space (it was encoded without a dummy prefix), as
        the exported Hugging Face tokenizer decodes it."""
        return self._decode(ids, after_special=False)

    def decode_after_special(self, ids) -> str:
        """ids as they decode right after a special token, or inside a document: a leading "▁" stays a
        space (decode drops it as the dummy prefix). What encode_after_special gives back these ids from."""
        return self._decode(ids, after_special=True)

    def _decode(self, ids, after_special: bool) -> str:
        out, run = [], []

        def flush():
            if run:
                out.append((self._sp_after_special if out or after_special else self.sp).DecodeIds(run))
                run.clear()

        for i in ids:
            i = int(i)
            if i < self.base_vocab_size:
                run.append(i)
                continue
            flush()
            out.append(self._id_to_special.get(i, ""))
        flush()
        return "".join(out)


class HuggingFaceTokenizer:
    """A Hugging Face `tokenizers` JSON file, for users who bring their own vocabulary."""

    EOD_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")

    def __init__(self, json_path: str):
        import tokenizers

        if not os.path.isfile(json_path):
            raise TokenizerError(f"--tokenizer-model {json_path}: no such file")
        self.model_path = json_path
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(json_path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"--tokenizer-model {json_path}: not a tokenizers JSON file ({e})") from None
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        eod = next((vocab[t] for t in self.EOD_CANDIDATES if t in vocab), None)
        if eod is None:
            raise TokenizerError(f"--tokenizer-model {json_path}: no end-of-document token among {self.EOD_CANDIDATES}")
        self.eod = eod
        added = {t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special}
        # A special token to encode after (see encode_after_special): a FIM one where there is one.
        self._special = next((t for t in ("<|fim_prefix|>", *self.EOD_CANDIDATES) if t in added), None)
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def unique_identifiers(self) -> dict:
        return {"class": type(self).__name__, "model": os.path.abspath(self.model_path), "vocab_size": self.vocab_size}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_after_special(self, text: str) -> list[int]:
        """text as it is encoded right after a special token: encoded behind one, which is then dropped
        (a Metaspace or Prepend normaliser adds its space only where the text starts)."""
        if self._special is None:
            return self.encode(text)
        ids = self.tokenizer.encode(self._special + text, add_special_tokens=False).ids
        return ids[1:]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_after_special(self, ids) -> str:
        """ids as they decode right after a special token (a Metaspace decoder keeps the first piece's
        space there): decoded behind one, whose text is then dropped."""
        if self._special is None:
            return self.decode(ids)
        special = self.tokenizer.token_to_id(self._special)
        return self.decode([special, *ids])[len(self.decode([special])) :]


def special_token_ids(tokenizer) -> dict[str, int]:
    """Where a tokenizer's special tokens are looked up by name (FIM's, CodeGen2's sentinels): a
    CrystalTokenizer's specials, or a tokenizers JSON file's vocabulary with its added tokens."""
    ids = getattr(tokenizer, "special_tokens", None)
    if ids is not None:
        return ids
    return tokenizer.tokenizer.get_vocab(with_added_tokens=True) if hasattr(tokenizer, "tokenizer") else {}


TOKENIZER_TYPES = {"CrystalTokenizer": CrystalTokenizer, "HuggingFaceTokenizer": HuggingFaceTokenizer}
DEFAULT_TOKENIZER_TYPE = "CrystalTokenizer"  # pretrain_crystal.py's --tokenizer-type default too (run_config.py)


def add_tokenizer_type_argument(parser) -> None:
    """--tokenizer-type, the same in every command line."""
    parser.add_argument("--tokenizer-type", default=DEFAULT_TOKENIZER_TYPE, choices=list(TOKENIZER_TYPES))


def build_tokenizer(tokenizer_type: str, tokenizer_model: str):
    if tokenizer_type not in TOKENIZER_TYPES:
        raise TokenizerError(f"--tokenizer-type {tokenizer_type!r}: choose one of {sorted(TOKENIZER_TYPES)}")
    return TOKENIZER_TYPES[tokenizer_type](tokenizer_model)
