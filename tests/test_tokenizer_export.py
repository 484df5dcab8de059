"""The exported tokenizer encodes as training did and decodes back to the text: the whole demo corpus
against its preprocessed .bin ids (both tokenizer forms), and round trips of text that starts with
whitespace, at a document's start and after a special token, for the demo tokenizer and for a LLaMA-style
model trained here by tools/train_tokenizer.py."""

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers.distributed_run import REPO

from megatron_ext.release.hf_tokenizer import save_hf_tokenizer
from megatron_ext.tokenizer import CRYSTAL_SPECIAL_TOKENS, TokenizerError, build_tokenizer
from megatron_ext.tokenizer.hf_pipeline import save_tokenizer_json

DEMO = REPO / "data" / "demo"
SOURCES = ("text", "code")
LEADING = [
    "  lead",
    " x",
    "    return 1\n",
    " " * 20 + "return 1",
    "\tdef f():\n\t\treturn 2\n",
    "\n\nafter two newlines",
    "\r\nwindows",
    "\u00a0non-breaking space first",
    "\u00a0\u00a0 two of them",
    "\U0001f600 emoji first",
    " \U0001f600 space then emoji",
    " ",
    "   ",
    "",
    "x",
    "ends with spaces   ",
    "a  b\t\tc",
]


def _run(*args):
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _export(tmp_path, tokenizer_type, model):
    from transformers import AutoTokenizer

    out = tmp_path / f"hf_{tokenizer_type}"
    out.mkdir()
    save_hf_tokenizer(tokenizer_type, str(model), str(out))
    return AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)  # as transformers' users load it


def _documents(source):
    with open(DEMO / "raw" / f"{source}.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _bin_ids(prefix):
    """Each document's ids as Megatron-Core's IndexedDataset reads them (its lengths and dtype; the .bin
    split in one go, since item-by-item reads cost seconds here)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    flat = np.fromfile(f"{prefix}.bin", dtype=dataset.index.dtype)
    assert (
        len(flat) == dataset.sequence_lengths.sum()
        and dataset[0].tolist() == flat[: dataset.sequence_lengths[0]].tolist()
    )
    return [ids.tolist() for ids in np.split(flat, np.cumsum(dataset.sequence_lengths)[:-1])]


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo_json") / "crystal_demo.json"
    save_tokenizer_json(str(DEMO / "crystal_demo.model"), str(path))
    return path


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.parametrize("form", ["sentencepiece", "tokenizer_json"])
def test_the_export_encodes_the_whole_demo_corpus_as_preprocessing_did(form, demo_json, tmp_path):
    """Every document of both sources re-encoded by the exported tokenizer (AutoTokenizer) equals the ids
    preprocess_data.py wrote, end-of-document id appended. For the tokenizer.json form the corpus is first
    preprocessed with that file (--tokenizer-type HuggingFaceTokenizer), and its ids also equal the
    SentencePiece model's: one rule, two forms."""
    if form == "sentencepiece":
        tokenizer_type, model, prefixes = "CrystalTokenizer", DEMO / "crystal_demo.model", {}
        for source in SOURCES:
            prefixes[source] = DEMO / f"{source}_text_document"
    else:
        tokenizer_type, model, prefixes = "HuggingFaceTokenizer", demo_json, {}
        for source in SOURCES:
            out = tmp_path / source
            _run(REPO / "tools" / "preprocess_data.py", "--input", DEMO / "raw" / f"{source}.jsonl",
                 "--output-prefix", out, "--tokenizer-type", tokenizer_type, "--tokenizer-model", model,
                 "--append-eod", "--workers", "1")  # fmt: skip
            prefixes[source] = tmp_path / f"{source}_text_document"
    hf = _export(tmp_path, tokenizer_type, model)
    eod = build_tokenizer(tokenizer_type, str(model)).eod
    total, leading = 0, 0
    for source in SOURCES:
        documents, written = _documents(source), _bin_ids(prefixes[source])
        assert len(documents) == len(written)
        if form == "tokenizer_json":
            assert written == _bin_ids(DEMO / f"{source}_text_document"), source  # the same ids as SentencePiece
        encoded = hf(documents, add_special_tokens=False)["input_ids"]
        for i, (text, ids, ours) in enumerate(zip(documents, written, encoded)):
            assert ours + [eod] == ids, (source, i, text[:40])
        assert hf.batch_decode([ids[:-1] for ids in written]) == documents, source
        leading += sum(text[:1].isspace() for text in documents)
        total += len(documents)
    # The corpus is built from this machine's Python (877 documents here, 79 starting with whitespace): the
    # test needs enough of those to mean something, not a count.
    assert total > 500 and leading > 20, (total, leading)


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory):
    """A LLaMA-style SentencePiece model trained here by tools/train_tokenizer.py on the demo's raw code."""
    d = tmp_path_factory.mktemp("trained")
    _run(REPO / "tools" / "train_tokenizer.py", "--input", DEMO / "raw" / "code.jsonl", "--vocab-size", "600",
         "--output-prefix", d / "llama_style")  # fmt: skip
    return d / "llama_style.model"


@pytest.mark.launch
@pytest.mark.parametrize("which", ["demo", "trained"])
def test_round_trips_of_text_starting_with_whitespace(which, trained_model, tmp_path):
    """Training's SentencePiece encoding, its tokenizer.json form and the export agree on every text, at a
    document's start and after a special token (the FIM rule: no dummy prefix there), and both decode back
    to the text exactly."""
    model = DEMO / "crystal_demo.model" if which == "demo" else trained_model
    ours = build_tokenizer("CrystalTokenizer", str(model))
    save_tokenizer_json(str(model), str(tmp_path / "tokenizer.json"))
    as_json = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tokenizer.json"))
    hf = _export(tmp_path, "CrystalTokenizer", model)
    fim_prefix = ours.special_token_id("<|fim_prefix|>")
    assert hf.convert_tokens_to_ids(list(CRYSTAL_SPECIAL_TOKENS)) == [
        ours.special_token_id(t) for t in CRYSTAL_SPECIAL_TOKENS
    ]
    for text in LEADING:
        ids = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == as_json.encode(text) == ids, text
        assert hf.decode(ids) == ours.decode(ids) == as_json.decode(ids) == text, text
        after = [fim_prefix, *ours.encode_after_special(text)]
        assert hf("<|fim_prefix|>" + text, add_special_tokens=False)["input_ids"] == after, text
        assert as_json.encode_after_special(text) == after[1:], text
        assert hf.decode(after) == ours.decode(after) == "<|fim_prefix|>" + text, text
    # What the issue saw: 20 spaces then 'return 1' starts with 21 '▁' (the dummy prefix and the spaces).
    pieces = hf.convert_ids_to_tokens(hf(" " * 20 + "return 1", add_special_tokens=False)["input_ids"])
    assert "".join(pieces).startswith("\u2581" * 21 + "return")


def test_a_normalisation_the_export_cannot_express_is_one_line(tmp_path):
    """A SentencePiece model that removes extra whitespace (SentencePiece's default, not LLaMA's) would
    encode differently through the export: refused, naming the file and the field."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((DEMO / "crystal_demo.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    path = tmp_path / "collapsing.model"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(TokenizerError, match=r"collapsing\.model: normalizer_spec .*remove_extra_whitespaces=True"):
        save_tokenizer_json(str(path), str(tmp_path / "tokenizer.json"))
