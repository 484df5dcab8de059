"""The three tokenizer forms the online transforms are tested in: the demo model as trained
(SentencePiece, CrystalTokenizer), as exported (its tokenizer.json), and a byte-level BPE of one's own with
FIM's tokens and CodeGen2's sentinels among its specials (trained on `texts`, so that their rarer
characters are pieces of bytes)."""

from __future__ import annotations

from helpers.distributed_run import REPO

FORMS = ("sentencepiece", "tokenizer_json", "byte_level")
DEMO_TOKENIZER = REPO / "data" / "demo" / "crystal_demo.model"


def build_form(form: str, directory, texts: list[str]):
    from megatron_ext.tokenizer import build_tokenizer
    from megatron_ext.tokenizer.hf_pipeline import save_tokenizer_json

    if form == "sentencepiece":
        return build_tokenizer("CrystalTokenizer", str(DEMO_TOKENIZER))
    path = directory / "tokenizer.json"
    if form == "tokenizer_json":
        save_tokenizer_json(str(DEMO_TOKENIZER), str(path))
    else:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        from megatron_ext.tokenizer import codegen2_sentinels

        hf = Tokenizer(models.BPE(unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        fim = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
        specials = ["<unk>", "</s>", *fim, *codegen2_sentinels(8)]
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        hf.train_from_iterator(texts * 50, trainer)
        hf.save(str(path))
    return build_tokenizer("HuggingFaceTokenizer", str(path))
