"""The training tokenizer as Hugging Face tokenizer files, ids unchanged."""

from __future__ import annotations

import os
import shutil
import tempfile

from megatron_ext.tokenizer import build_tokenizer
from megatron_ext.tokenizer.crystal_tokenizer import CRYSTAL_SPECIAL_TOKENS, CrystalTokenizer, TokenizerError


def save_hf_tokenizer(tokenizer_type: str, model_path: str, directory: str):
    """Write tokenizer files into directory; returns the project tokenizer (for verify's prompts).

    A CrystalTokenizer becomes a LLaMA tokenizer (its SentencePiece model converted by transformers) plus
    the 18 specials at the same ids. BOS is not added: training documents carry none (they are separated
    by EOS), so prompts encode as the model saw text.
    """
    tokenizer = build_tokenizer(tokenizer_type, model_path)
    if isinstance(tokenizer, CrystalTokenizer):
        from transformers import LlamaTokenizer

        with tempfile.TemporaryDirectory() as staging:
            shutil.copy(model_path, os.path.join(staging, "tokenizer.model"))
            hf = LlamaTokenizer.from_pretrained(staging, add_bos_token=False, add_eos_token=False, legacy=False)
        hf.add_special_tokens({"additional_special_tokens": list(CRYSTAL_SPECIAL_TOKENS)})
        ids = hf.convert_tokens_to_ids(list(CRYSTAL_SPECIAL_TOKENS))
        if ids != [tokenizer.special_tokens[t] for t in CRYSTAL_SPECIAL_TOKENS]:
            raise TokenizerError(
                f"{model_path}: the converted tokenizer puts the special tokens at {ids[:3]}..., "
                f"training used {tokenizer.base_vocab_size}..."
            )
        shutil.copy(model_path, os.path.join(directory, "tokenizer.model"))
    else:
        from transformers import PreTrainedTokenizerFast

        hf = PreTrainedTokenizerFast(tokenizer_file=model_path)
    hf.save_pretrained(directory)
    return tokenizer
