"""How text becomes ids, as a Hugging Face `tokenizers` pipeline: the training tokenizer's rule, written once.

The rule is SentencePiece's, which every corpus preprocessed with a CrystalTokenizer was encoded with:
- a document gets the dummy-prefix "▁" in front, always, even when it already starts with whitespace
  ("  lead" -> "▁▁▁lead" before the pieces are chosen);
- text right after a special token gets none (the FIM rule: CrystalTokenizer.encode_after_special);
- every space is "▁"; nothing else is normalised (LLaMA-style models: identity normalisation, extra
  whitespace kept), and decoding drops the one dummy-prefix space, so decode(encode(x)) == x.

Why the training side stays as it is and the export moves: the corpora already preprocessed keep their ids,
and the rule is the one the released LLaMA / CrystalCoder SentencePiece model follows. transformers' LLaMA
conversion (legacy=False) uses Metaspace(prepend_scheme="first"), which prepends "▁" only when the text does
not already start with one, so a document starting with whitespace got one "▁" fewer than training saw, and
its decoder's Strip then removed a real space. transformers 5's LlamaTokenizer also rebuilds that pipeline
on load, whatever tokenizer.json says, so the export is a plain PreTrainedTokenizerFast over this one.

The rule in `tokenizers`' own pieces: the normaliser turns spaces into "▁"; a first Metaspace whose
replacement is a plain space then never finds the text starting with its replacement and prepends one, on
the first split only (not after a special token); a second Metaspace turns that space into "▁".
"""

from __future__ import annotations

import os
import shutil
import tempfile

from megatron_ext.tokenizer.crystal_tokenizer import CRYSTAL_SPECIAL_TOKENS, TokenizerError, extra_special_tokens

META = "\u2581"


def apply_sentencepiece_rule(tokenizer, add_dummy_prefix: bool = True) -> None:
    """Set a `tokenizers.Tokenizer`'s normaliser, pre-tokeniser and decoder to the rule above."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Replace(" ", META)
    prefix = "first" if add_dummy_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=" ", prepend_scheme=prefix, split=False),
            pre_tokenizers.Metaspace(replacement=META, prepend_scheme="never", split=False),
        ]
    )
    steps = [decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_dummy_prefix else []))
    tokenizer.post_processor = None


def sentencepiece_to_tokenizers(model_path: str):
    """A CrystalTokenizer's SentencePiece model as a `tokenizers.Tokenizer` with the same ids: its pieces
    (transformers' conversion of the BPE model and its byte fallback), Crystal's specials and the model's
    own after them (crystal_tokenizer.py: the specials file), and
    the rule above. A model whose normalisation the rule cannot express is one line naming the field."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import LlamaTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    spec = proto.normalizer_spec
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces:
        raise TokenizerError(
            f"{model_path}: normalizer_spec name={spec.name!r} remove_extra_whitespaces="
            f"{spec.remove_extra_whitespaces} cannot be exported as the same encoding; LLaMA-style models "
            "(tools/train_tokenizer.py) use identity and keep whitespace"
        )
    with tempfile.TemporaryDirectory() as staging:
        shutil.copy(model_path, os.path.join(staging, "tokenizer.model"))
        llama = LlamaTokenizer.from_pretrained(staging, add_bos_token=False, add_eos_token=False, legacy=False)
    specials = [*CRYSTAL_SPECIAL_TOKENS, *extra_special_tokens(model_path)]
    llama.add_special_tokens({"additional_special_tokens": specials})
    ids = llama.convert_tokens_to_ids(specials)
    base = len(proto.pieces)
    if ids != list(range(base, base + len(specials))):
        raise TokenizerError(
            f"{model_path}: the converted tokenizer puts the special tokens at {ids[:3]}..., training used {base}..."
        )
    tokenizer = llama.backend_tokenizer
    apply_sentencepiece_rule(tokenizer, spec.add_dummy_prefix)
    return tokenizer


def save_tokenizer_json(model_path: str, path: str) -> None:
    """The tokenizer.json form of a SentencePiece model (for --tokenizer-type HuggingFaceTokenizer)."""
    sentencepiece_to_tokenizers(model_path).save(path)
