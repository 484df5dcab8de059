"""How many bytes of UTF-8 text each token stands for, so that a loss in nats per token becomes bits per
byte, a figure that does not depend on the tokenizer.

The table is read from the vocabulary itself (pieces, byte-fallback pieces, the byte-level alphabet), not by
decoding token by token: decoding one byte-fallback token of a multi-byte character gives U+FFFD (3 bytes
for 1), and decoding a piece alone drops or keeps its leading space depending on the decoder. No library
offers this table (lm-evaluation-harness counts the bytes of the request text instead, which needs the
text; in the training loop only token ids exist), hence this module.

The dummy prefix: a SentencePiece model with add_dummy_prefix (LLaMA's, Crystal's) encodes a document as
if it began with a space, which is not in the text. `dummy_space` marks the pieces that begin with that
space; where such a piece starts a document (the token before it is the end-of-document one), its first
byte is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPACE_PIECE = "\u2581"  # SentencePiece's "▁"


@dataclass(frozen=True)
class TokenBytes:
    lengths: np.ndarray  # int32 [vocab]: UTF-8 bytes of each token's text (0 for special and padding ids)
    dummy_space: np.ndarray | None  # bool [vocab]: the piece starts with the dummy-prefix space; None: no prefix
    eod: int

    def label_bytes(self, tokens: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Bytes of each label of a sample (tokens[i] predicts labels[i]), the dummy-prefix space of a
        document's first piece taken off."""
        out = self.lengths[labels].astype(np.float32)
        if self.dummy_space is not None:
            out -= (tokens == self.eod) & self.dummy_space[labels]
        return out

    def text_bytes(self, ids, document_start: bool = True) -> int:
        """Bytes of the text a token sequence encodes (a document when document_start)."""
        ids = np.asarray(ids, dtype=np.int64)
        total = int(self.lengths[ids].sum())
        if document_start and self.dummy_space is not None and len(ids):
            total -= int(self.dummy_space[ids[0]])
        return total


def token_bytes(tokenizer, vocab_size: int | None = None) -> TokenBytes:
    """The table of a CrystalTokenizer or HuggingFaceTokenizer, padded with zeros to vocab_size (the
    model's padded vocabulary) when given."""
    from megatron_ext.tokenizer import CrystalTokenizer, HuggingFaceTokenizer

    if isinstance(tokenizer, CrystalTokenizer):
        lengths, dummy = _sentencepiece_table(tokenizer)
    elif isinstance(tokenizer, HuggingFaceTokenizer):
        lengths, dummy = _tokenizers_table(tokenizer)
    else:
        raise TypeError(f"no byte table for {type(tokenizer).__name__}")
    size = max(vocab_size or 0, len(lengths))
    lengths = np.pad(lengths, (0, size - len(lengths)))
    if dummy is not None:
        dummy = np.pad(dummy, (0, size - len(dummy)))
    return TokenBytes(lengths.astype(np.int32), dummy, tokenizer.eod)


def _sentencepiece_table(tokenizer) -> tuple[np.ndarray, np.ndarray | None]:
    from sentencepiece import sentencepiece_model_pb2

    sp = tokenizer.sp
    n = sp.GetPieceSize()
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int32)  # the specials after the pieces: 0 bytes
    starts_with_space = np.zeros(tokenizer.vocab_size, dtype=bool)
    for i in range(n):
        if sp.IsByte(i):  # <0xNN>
            lengths[i] = 1
        elif sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            # Unknown stands for text the model cannot spell; with byte fallback it does not occur.
            continue
        else:
            piece = sp.IdToPiece(i)
            lengths[i] = len(piece.replace(SPACE_PIECE, " ").encode("utf-8"))
            starts_with_space[i] = piece.startswith(SPACE_PIECE)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return lengths, starts_with_space if proto.normalizer_spec.add_dummy_prefix else None


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each printable stand-in character -> the byte it encodes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _tokenizers_table(tokenizer) -> tuple[np.ndarray, np.ndarray | None]:
    import json

    spec = json.loads(tokenizer.tokenizer.to_str())
    lengths = np.zeros(tokenizer.vocab_size, dtype=np.int32)
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    special = {t.content for t in tokenizer.tokenizer.get_added_tokens_decoder().values() if t.special}
    alphabet = _bytes_to_unicode()
    pieces = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    starts_with_space = np.zeros(tokenizer.vocab_size, dtype=bool)
    for piece, i in pieces.items():
        if piece in special:
            continue
        if byte_level:
            lengths[i] = sum(1 for ch in piece if ch in alphabet) + len(
                "".join(ch for ch in piece if ch not in alphabet).encode("utf-8")
            )
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            lengths[i] = 1
        else:
            lengths[i] = len(piece.replace(SPACE_PIECE, " ").encode("utf-8"))
            starts_with_space[i] = piece.startswith(SPACE_PIECE)
    text = json.dumps(spec.get("pre_tokenizer")) + json.dumps(spec.get("normalizer"))
    prepends = '"prepend_scheme": "first"' in text or '"prepend_scheme": "always"' in text or '"Prepend"' in text
    return lengths, starts_with_space if prepends and not byte_level else None
