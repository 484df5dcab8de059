"""Tokenizers: Crystal's (LLaMA SentencePiece + StarCoder-style specials) and Hugging Face JSON."""

from megatron_ext.tokenizer.crystal_tokenizer import (
    BOS_ID,
    CRYSTAL_SPECIAL_TOKENS,
    EOD_ID,
    CrystalTokenizer,
    HuggingFaceTokenizer,
    TokenizerError,
    add_tokenizer_type_argument,
    build_tokenizer,
    codegen2_sentinels,
    extra_special_tokens,
    special_token_ids,
    specials_path,
)

__all__ = [
    "BOS_ID",
    "CRYSTAL_SPECIAL_TOKENS",
    "EOD_ID",
    "CrystalTokenizer",
    "HuggingFaceTokenizer",
    "TokenizerError",
    "add_tokenizer_type_argument",
    "build_tokenizer",
    "codegen2_sentinels",
    "extra_special_tokens",
    "special_token_ids",
    "specials_path",
]
