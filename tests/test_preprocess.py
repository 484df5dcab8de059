"""Corpus tools: the Crystal tokenizer, preprocess_data.py into Megatron-Core's IndexedDataset format,
bad input, crashes, sentence splitting and merging."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import psutil
import pytest
from helpers.distributed_run import REPO

from megatron_ext.tokenizer import CRYSTAL_SPECIAL_TOKENS, CrystalTokenizer, TokenizerError

pytestmark = pytest.mark.launch  # every test here starts processes


RELEASED_SPECIALS = [
    "fim_prefix",
    "fim_middle",
    "fim_suffix",
    "fim_pad",
    "filename",
    "gh_stars",
    "issue_start",
    "issue_comment",
    "issue_closed",
    "jupyter_start",
    "jupyter_text",
    "jupyter_code",
    "jupyter_output",
    "empty_output",
    "commit_before",
    "commit_msg",
    "commit_after",
    "reponame",
]

DOCS = [
    "Hello world. This is a test. Another sentence here!",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n",
    "Ünïcödé — 日本語のテキスト. Emoji: 🤖🚀. Mixed scripts: Ελληνικά, русский.",
    "A literal <|fim_prefix|> and <|endoftext|> in user text stays text.",
    "line one\n\nline three after an empty line\n",
]


def indexed(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return IndexedDataset(str(prefix))


def run_tool(script, *args, timeout=300):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def preprocess(inputs, tokenizer_model, output_prefix, *flags):
    """preprocess_data.py over inputs with the given tokenizer into output_prefix."""
    return run_tool(
        "preprocess_data.py", "--input", inputs, "--tokenizer-model", tokenizer_model, "--output-prefix", output_prefix,
        *flags,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory):
    """A demo-style tokenizer trained here on the Python reference manual (seconds)."""
    from pydoc_data.topics import topics

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "train.jsonl"
    corpus.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in list(topics.values())[:150])
        + "".join(json.dumps({"text": t}) + "\n" for t in DOCS)
    )
    proc = run_tool("train_tokenizer.py", "--input", corpus, "--vocab-size", "1000", "--output-prefix", d / "demo")
    assert proc.returncode == 0, proc.stderr
    return d / "demo.model"


@pytest.fixture(scope="module")
def tok(tokenizer_model):
    return CrystalTokenizer(str(tokenizer_model))


def test_special_tokens_follow_the_vocabulary_in_release_order(tok, tokenizer_model, tmp_path):
    """Crystal's 18 in the release's order, then (train_tokenizer.py's default) CodeGen2's 8 sentinels with
    <sep> and <eom>; none is ever produced from text. --codegen2-sentinels 0 leaves Crystal's alone."""
    assert [t.strip("<|>") for t in CRYSTAL_SPECIAL_TOKENS] == RELEASED_SPECIALS
    assert [tok.special_token_id(t) for t in CRYSTAL_SPECIAL_TOKENS] == list(range(1000, 1018))
    sentinels = [f"<mask_{i}>" for i in range(1, 9)] + ["<sep>", "<eom>"]
    assert [tok.special_token_id(t) for t in sentinels] == list(range(1018, 1028))
    assert tok.vocab_size == 1056  # 1028 padded to a multiple of 32
    assert (tok.bos, tok.eod, tok.unk) == (1, 2, 0)
    ids = tok.encode("x <|fim_prefix|><|fim_middle|><|reponame|> <mask_1> <sep> <eom> y")
    assert all(i < 1000 for i in ids)  # specials are never produced from text
    assert tok.decode([5, 1018, 1026, 1027]) == tok.decode([5]) + "<mask_1><sep><eom>"
    plain = tmp_path / "plain"
    for ext in (".model", ".vocab"):
        (tmp_path / f"plain{ext}").write_bytes(tokenizer_model.with_suffix(ext).read_bytes())
    assert (
        CrystalTokenizer(str(plain) + ".model").vocab_size == 1024
    )  # no specials file: 1018 -> 1024, as 32018 -> 32032
    (tmp_path / "plain.specials.json").write_text('{"after_crystal": ["<sep>", "<|fim_pad|>"]}')
    with pytest.raises(TokenizerError, match=r"plain.specials.json: special tokens must be .* \['<\|fim_pad\|>'\]"):
        CrystalTokenizer(str(plain) + ".model")


def test_tokenizer_round_trips_text(tok):
    for doc in DOCS:
        assert tok.decode(tok.encode(doc)) == doc
    fim = tok.special_token_id("<|fim_prefix|>")
    # After a special token, text is encoded (and decoded) without SentencePiece's dummy prefix, as the
    # exported Hugging Face tokenizer does; a plainly encoded "ab" carries that prefix as a real space.
    assert tok.decode([fim] + tok.encode_after_special("ab")) == "<|fim_prefix|>ab"
    assert tok.decode([fim] + tok.encode("ab")) == "<|fim_prefix|> ab"


def test_bad_tokenizer_and_inputs_fail_fast(tmp_path, tokenizer_model):
    bad_model = tmp_path / "bad.model"
    bad_model.write_text("not a model")
    good = tmp_path / "in.jsonl"
    good.write_text(json.dumps({"text": "hi"}) + "\n")
    cases = [
        (
            [
                "--input",
                tmp_path / "missing.jsonl",
                "--tokenizer-model",
                tokenizer_model,
                "--output-prefix",
                tmp_path / "o",
            ],
            "--input",
        ),
        (
            ["--input", good, "--tokenizer-model", bad_model, "--output-prefix", tmp_path / "o"],
            "not a SentencePiece model",
        ),
        (["--input", good, "--tokenizer-model", tokenizer_model, "--output-prefix", good / "o"], "Not a directory"),
    ]
    for args, message in cases:
        start = time.perf_counter()
        proc = run_tool("preprocess_data.py", *args)
        elapsed = time.perf_counter() - start
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert elapsed < 2.0, elapsed  # ~0.1 s measured: nothing but the checks runs before failing
    assert not list(tmp_path.glob("o*"))


def write_inputs(d, docs, n_files):
    """docs spread over n_files files in several formats; returns the documents in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    chunks = [docs[i::n_files] for i in range(n_files)]
    ordered = []
    for i, chunk in enumerate(chunks):
        lines = "".join(json.dumps({"text": t, "meta": i}, ensure_ascii=False) + "\n\n" for t in chunk).encode()
        kind = i % 4
        if kind == 0:
            (d / f"f{i:02d}.jsonl").write_bytes(lines)
        elif kind == 1:
            (d / f"f{i:02d}.jsonl.gz").write_bytes(gzip.compress(lines))
        elif kind == 2:
            (d / f"f{i:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
        else:
            pq.write_table(pa.table({"text": chunk}), d / f"f{i:02d}.parquet")
        ordered.extend(chunk)
    return ordered


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers,partitions", [(1, 1), (3, 1), (2, 3)])
def test_round_trip_preserves_every_document_in_order(tmp_path, tok, tokenizer_model, workers, partitions):
    long_doc = " ".join(f"word{i} and some more text." for i in range(20000))  # ~500 KB, many chunks' worth
    docs = DOCS * 200 + [long_doc] + [f"document number {i}: {DOCS[i % 5]}" for i in range(700)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    ordered = write_inputs(inputs, docs, n_files=6)
    proc = preprocess(
        inputs,
        tokenizer_model,
        tmp_path / "out" / "corpus",
        "--append-eod",
        "--workers",
        workers,
        "--partitions",
        partitions,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"done: {len(docs):,} documents" in proc.stdout
    ds = indexed(tmp_path / "out" / "corpus_text_document")
    assert ds.index.dtype.__name__ == "uint16"
    assert len(ds) == len(docs)
    for i, doc in enumerate(ordered):
        assert ds[i].tolist() == tok.encode(doc) + [tok.eod], i
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus_text_document.bin", "corpus_text_document.idx"]


def test_bad_lines_are_skipped_counted_and_located(tmp_path, tok, tokenizer_model):
    good = [json.dumps({"text": f"good document {i}."}).encode() for i in range(4)]
    lines = [
        good[0],
        b'{"text": "unterminated',
        json.dumps({"body": "x"}).encode(),
        good[1],
        json.dumps({"text": 42}).encode(),
        b'{"text": "bad \xff utf8"}',
        json.dumps({"text": "  \n "}).encode(),
        good[2],
        b"[1, 2]",
        good[3],
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    proc = preprocess(path, tokenizer_model, tmp_path / "o", "--append-eod")
    assert proc.returncode == 0, proc.stderr
    assert ("skipped: malformed_json 2, missing_key 1, non_string 1, invalid_utf8 1, empty_text 1") in proc.stdout
    assert f"{path}:2: malformed_json" in proc.stdout and f"{path}:6: invalid_utf8" in proc.stdout
    ds = indexed(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(f"good document {i}.") + [tok.eod] for i in range(4)]

    proc = preprocess(path, tokenizer_model, tmp_path / "f", "--on-error", "fail")
    assert proc.returncode == 1
    assert f"{path}: line 2: malformed_json" in proc.stderr
    assert not list(tmp_path.glob("f_*")), list(tmp_path.glob("f*"))


@pytest.mark.timeout(300)
def test_killed_worker_leaves_no_output(tmp_path, tokenizer_model):
    path = tmp_path / "big.jsonl"
    text = json.dumps({"text": "Some sentence to tokenise again and again. " * 400}) + "\n"
    path.write_text(text * 6000)  # ~100 MB of work: long enough to kill a worker mid-run
    prefix = tmp_path / "out" / "big"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            "--input",
            str(path),
            "--tokenizer-model",
            str(tokenizer_model),
            "--output-prefix",
            str(prefix),
            "--workers",
            "2",
            "--append-eod",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    main = psutil.Process(proc.pid)
    deadline = time.time() + 60
    workers = []
    while time.time() < deadline and not workers:
        workers = [c for c in main.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert workers, "no worker process appeared"
    time.sleep(1.0)  # mid-run: tokenising has started
    assert proc.poll() is None, "finished before the kill: make the input larger"
    os.kill(workers[0].pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "a worker died; no output written" in stderr
    assert not (tmp_path / "out" / "big_text_document.bin").exists()
    assert not (tmp_path / "out" / "big_text_document.idx").exists()
    assert os.listdir(tmp_path / "out") == []  # no temporary shards left either


def test_split_sentences_keeps_text_and_marks_sentences(tmp_path, tok, tokenizer_model):
    doc = "First sentence here. Second one follows!\nThird line, third sentence? Yes.\n"
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": doc}) + "\n")
    env = dict(os.environ, NLTK_DATA=str(tmp_path / "no-nltk-data"))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "preprocess_data.py"),
            "--input",
            str(path),
            "--tokenizer-model",
            str(tokenizer_model),
            "--output-prefix",
            str(tmp_path / "s"),
            "--split-sentences",
            "--keep-newlines",
            "--append-eod",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "untrained Punkt tokenizer" in proc.stderr
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    from megatron_ext.preprocessing.sentence_splitter import split_sentences

    sentences = split_sentences(PunktSentenceTokenizer(), doc, keep_newlines=True)
    assert "".join(sentences) == doc and len(sentences) == 4
    ds = indexed(tmp_path / "s_text_sentence")
    assert len(ds.document_indices) == 2 and len(ds) == 4  # one document of four sentences
    expected = [tok.encode(s) for s in sentences]
    expected[-1].append(tok.eod)
    assert [ds[i].tolist() for i in range(4)] == expected


def test_merge_concatenates_in_order(tmp_path, tok):
    """Three shards written by Megatron-Core's own builder (preprocess_data.py's output is tested above)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefixes = []
    for i in range(3):
        prefixes.append(tmp_path / f"shard{i}_text_document")
        builder = IndexedDatasetBuilder(f"{prefixes[-1]}.bin", dtype=np.int32)
        for j in range(5):
            builder.add_document(
                tok.encode(f"shard {i} doc {j}.") + [tok.eod], [len(tok.encode(f"shard {i} doc {j}.")) + 1]
            )
        builder.finalize(f"{prefixes[-1]}.idx")
    proc = run_tool("merge_datasets.py", "--input", *prefixes, "--output-prefix", tmp_path / "all")
    assert proc.returncode == 0, proc.stderr
    ds = indexed(tmp_path / "all")
    assert [ds[k].tolist() for k in range(len(ds))] == [
        tok.encode(f"shard {i} doc {j}.") + [tok.eod] for i in range(3) for j in range(5)
    ]
    assert len(ds.document_indices) == 16


def test_huggingface_tokenizer_json_and_several_keys(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf.train_from_iterator(DOCS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "</s>"]))
    hf.save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "two_keys.jsonl"
    rows = [{"text": DOCS[i], "code": DOCS[(i + 1) % 5]} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_tool(
        "preprocess_data.py",
        "--input",
        path,
        "--tokenizer-type",
        "HuggingFaceTokenizer",
        "--tokenizer-model",
        tmp_path / "tokenizer.json",
        "--json-keys",
        "text",
        "code",
        "--output-prefix",
        tmp_path / "hf",
        "--append-eod",
    )
    assert proc.returncode == 0, proc.stderr
    eod = hf.token_to_id("</s>")
    for key in ("text", "code"):
        ds = indexed(tmp_path / f"hf_{key}_document")
        assert [ds[i].tolist() for i in range(len(ds))] == [
            hf.encode(r[key], add_special_tokens=False).ids + [eod] for r in rows
        ]


def test_a_lone_surrogate_is_a_counted_skip(tmp_path, tok, tokenizer_model):
    """JSON can escape a lone surrogate; no tokenizer takes one (it was a TypeError inside a worker)."""
    path = tmp_path / "surrogate.jsonl"
    path.write_text(
        "\n".join([json.dumps({"text": "first."}), '{"text": "bad \\ud800 here"}', json.dumps({"text": "third."})])
        + "\n"
    )
    proc = preprocess(path, tokenizer_model, tmp_path / "o", "--append-eod")
    assert proc.returncode == 0, proc.stderr
    assert "skipped: lone_surrogate 1" in proc.stdout and f"{path}:2: lone_surrogate (text character 4)" in proc.stdout
    ds = indexed(tmp_path / "o_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [tok.encode(t) + [tok.eod] for t in ("first.", "third.")]
    proc = preprocess(path, tokenizer_model, tmp_path / "f", "--on-error", "fail")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"preprocess_data.py: error: {path}: line 2: lone_surrogate (text character 4); no output written"
    )


def _damaged(kind, path):
    """(a damaged corpus file, records readable before the damage, the reader's exception type)."""
    lines = [json.dumps({"text": f"document {i} " + "words " * 30}) for i in range(400)]
    raw = ("\n".join(lines) + "\n").encode()
    if kind == "gz":
        data = gzip.compress(raw)
        path.write_bytes(data[: len(data) // 2])  # cut short, as an interrupted copy
        return None, "EOFError"
    if kind == "zst":
        import zstandard

        path.write_bytes(zstandard.ZstdCompressor().compress(raw)[:4] + b"\x00garbage" * 64)
        return 0, "ZstdError"
    import pyarrow
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.table({"text": [json.loads(line)["text"] for line in lines]}), path)
    data = path.read_bytes()
    path.write_bytes(data[:-12] + b"\x00" * 12)  # the footer (its length and magic) overwritten
    return 0, "ArrowInvalid"


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gz", "zst", "parquet"])
def test_a_damaged_file_is_reported_and_the_run_goes_on(tmp_path, tok, tokenizer_model, kind):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    damaged = corpus / {"gz": "a.jsonl.gz", "zst": "a.jsonl.zst", "parquet": "a.parquet"}[kind]
    before, error = _damaged(kind, damaged)
    (corpus / "b.jsonl").write_text(json.dumps({"text": "the good file."}) + "\n")
    proc = preprocess(corpus, tokenizer_model, tmp_path / "o", "--append-eod")
    assert proc.returncode == 0, proc.stderr
    warning = next(line for line in proc.stderr.splitlines() if "warning" in line)
    assert warning.startswith(f"preprocess_data.py: warning: {damaged}: unreadable after ") and f"({error}: " in warning
    read = int(warning.split("unreadable after ")[1].split()[0])
    assert read == before if before is not None else 0 < read < 400  # a truncated gzip: the lines before the cut
    assert "damaged files: 1" in proc.stdout and "the records before it are kept" in proc.stdout
    ds = indexed(tmp_path / "o_text_document")
    assert len(ds) == read + 1 and ds[len(ds) - 1].tolist() == tok.encode("the good file.") + [tok.eod]
    if read:
        assert ds[0].tolist() == tok.encode("document 0 " + "words " * 30) + [tok.eod]
    proc = preprocess(corpus, tokenizer_model, tmp_path / "f", "--on-error", "fail")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"preprocess_data.py: error: {damaged}: unreadable after ") and last.endswith(
        "no output written"
    )
    assert not list(tmp_path.glob("f_*"))
