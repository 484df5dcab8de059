"""The training tokenizer as Hugging Face tokenizer files, ids unchanged."""

from __future__ import annotations

import os
import shutil

from megatron_ext.tokenizer import build_tokenizer
from megatron_ext.tokenizer.crystal_tokenizer import CrystalTokenizer, specials_path
from megatron_ext.tokenizer.hf_pipeline import sentencepiece_to_tokenizers


def save_hf_tokenizer(tokenizer_type: str, model_path: str, directory: str):
    """Write tokenizer files into directory; returns the project tokenizer (for verify's prompts).

    Both forms become a PreTrainedTokenizerFast over a tokenizer.json that encodes as training did
    (megatron_ext/tokenizer/hf_pipeline.py says how a CrystalTokenizer's rule is written there); a
    CrystalTokenizer's SentencePiece model is copied beside it for SentencePiece users. BOS is not added:
    training documents carry none (they are separated by EOS), so prompts encode as the model saw text.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = build_tokenizer(tokenizer_type, model_path)
    if isinstance(tokenizer, CrystalTokenizer):
        hf = PreTrainedTokenizerFast(
            tokenizer_object=sentencepiece_to_tokenizers(model_path),
            bos_token=tokenizer.sp.IdToPiece(tokenizer.bos),
            eos_token=tokenizer.sp.IdToPiece(tokenizer.eod),
            unk_token=tokenizer.sp.IdToPiece(tokenizer.unk),
            additional_special_tokens=list(tokenizer.special_tokens),  # Crystal's 18, then the model's own
            clean_up_tokenization_spaces=False,
        )
        shutil.copy(model_path, os.path.join(directory, "tokenizer.model"))
        if os.path.isfile(specials_path(model_path)):  # beside the copy, so that an import finds them too
            shutil.copy(specials_path(model_path), specials_path(os.path.join(directory, "tokenizer.model")))
    else:
        hf = PreTrainedTokenizerFast(tokenizer_file=model_path, clean_up_tokenization_spaces=False)
    hf.save_pretrained(directory)
    return tokenizer
