"""Tokenizers: Crystal's (LLaMA SentencePiece + StarCoder-style specials) and Hugging Face JSON."""

from megatron_ext.tokenizer.crystal_tokenizer import (
    CRYSTAL_SPECIAL_TOKENS,
    CrystalTokenizer,
    HuggingFaceTokenizer,
    TokenizerError,
    build_tokenizer,
)

__all__ = ["CRYSTAL_SPECIAL_TOKENS", "CrystalTokenizer", "HuggingFaceTokenizer", "TokenizerError", "build_tokenizer"]
