"""Evaluation: the token -> byte table behind bits per byte, for each tokenizer form."""

from pathlib import Path

import numpy as np
import pytest

from megatron_ext.evaluation.token_bytes import token_bytes
from megatron_ext.tokenizer import CrystalTokenizer, HuggingFaceTokenizer

REPO = Path(__file__).resolve().parents[1]
DEMO_TOKENIZER = REPO / "data" / "demo" / "crystal_demo.model"
# Multi-byte characters the demo vocabulary spells with byte-fallback pieces, runs of spaces, tabs, a NUL.
TEXTS = [
    "hello world",
    "  two  spaces\n\ttab\n",
    "naïve café — 日本語 😀 ∑",
    "def f(x):\n    return x**2  # squared\n",
    "Zürich\x00end",
    " a leading space",
]


def _hf_tokenizer(tmp_path, kind: str) -> HuggingFaceTokenizer:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "exported":  # the demo model's tokenizer.json form, as the export writes it
        from megatron_ext.tokenizer.hf_pipeline import save_tokenizer_json

        save_tokenizer_json(str(DEMO_TOKENIZER), str(tmp_path / "exported.json"))
        return HuggingFaceTokenizer(str(tmp_path / "exported.json"))
    corpus = TEXTS * 30 + ["the quick brown fox jumps over the lazy dog"] * 30
    if kind == "byte_level":
        hf = Tokenizer(models.BPE(unk_token="<unk>"))
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<unk>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    else:  # LLaMA-like in tokenizers: a "▁" prepended, spaces as "▁", byte fallback
        hf = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
        hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Strip(" ", 1, 0)])
        bytes_ = [f"<0x{b:02X}>" for b in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "</s>", *bytes_])
    hf.train_from_iterator(corpus, trainer)
    path = tmp_path / f"{kind}.json"
    hf.save(str(path))
    return HuggingFaceTokenizer(str(path))


@pytest.mark.parametrize("form", ["sentencepiece", "byte_level", "metaspace_byte_fallback", "exported"])
def test_token_bytes_add_up_to_the_texts_utf8_length(tmp_path, form):
    """Summed over a document's tokens, the table gives len(text.encode()) exactly: byte-fallback pieces
    count one byte each, the dummy-prefix space of the first piece none."""
    tok = CrystalTokenizer(str(DEMO_TOKENIZER)) if form == "sentencepiece" else _hf_tokenizer(tmp_path, form)
    table = token_bytes(tok, vocab_size=tok.vocab_size + 64)
    assert len(table.lengths) == tok.vocab_size + 64 and table.lengths[tok.vocab_size :].sum() == 0
    for text in TEXTS:
        ids = tok.encode(text)
        assert table.text_bytes(ids) == len(text.encode("utf-8")), (form, text, ids)
    if form != "byte_level":  # both prepend a space the text does not have
        assert table.dummy_space is not None
    # In a packed sample the correction applies where a document starts, i.e. after the end-of-document id.
    a, b = tok.encode(TEXTS[0]), tok.encode(TEXTS[2])
    row = np.array(a + [tok.eod] + b + [tok.eod])
    per_label = table.label_bytes(row[:-1], row[1:])
    assert per_label.sum() == len(TEXTS[0].encode()) - table.text_bytes(a[:1]) + len(TEXTS[2].encode())


def test_uniform_logits_give_log2_vocab_times_tokens_over_bytes():
    """A model that predicts the uniform distribution over V ids loses ln V nats per token: bits per byte
    are log2(V) x tokens / bytes, on the real held-out samples of the demo corpus, through the slot table
    the training loop fills."""
    import math

    import torch

    from megatron_ext.data.phased_dataset import PhasedDataset
    from megatron_ext.data.phases_config import load_phases
    from megatron_ext.evaluation.eval_set import slot_table
    from megatron_ext.evaluation.validation import PhasesValidation

    tok = CrystalTokenizer(str(DEMO_TOKENIZER))
    vocab = 8064
    config = load_phases(str(REPO / "tests" / "data" / "phases_small.yaml"), 32, 8, 7, has_fim_tokens=True)
    valid = PhasedDataset(config, 32, tok, split="valid")
    data = PhasesValidation(valid, 5, 8, token_bytes(tok, vocab))
    assert len(data) == 16 and data.steps == 2 and data.num_slots == 10  # 2 sources x 5, padded to 2 batches
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in data[0]}
    logits = torch.zeros(*batch["labels"].shape, vocab)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    slots = slot_table(
        per_token.view(batch["labels"].shape), batch["loss_mask"], batch["label_bytes"], batch["slot"], data.num_slots
    )
    figures = {(f.task, f.metric): f for f in data.figures(slots.numpy())}
    assert set(figures) == {("valid", "loss"), *((f"valid/{n}", m) for n in ("text", "code") for m in ("loss", "bpb"))}
    for name in ("text", "code"):
        loss, bpb = figures[f"valid/{name}", "loss"], figures[f"valid/{name}", "bpb"]
        assert loss.n == 5 * 32 and bpb.n == 5
        assert loss.value == pytest.approx(math.log(vocab), rel=1e-6)
        nbytes = float(
            sum(data[i]["label_bytes"].sum() for i in range(10) if data.samples[i][0] == data.names.index(name))
        )
        assert bpb.value == pytest.approx(math.log2(vocab) * loss.n / nbytes, rel=1e-6)


def test_choice_tasks_from_the_request_files_and_an_oracle_scores_one():
    """OLMo's ARC-Easy requests become one slot per choice, packed several to a row, each continuation
    masked in under its slot; an oracle that gives the gold choice the highest likelihood scores accuracy
    1.0 (normalised too), the reverse 0."""
    from megatron_ext.evaluation.tasks import build_task_set

    tok = CrystalTokenizer(str(DEMO_TOKENIZER))
    task = build_task_set("arc_easy", 30, tok, seq_length=256, batch_size=8)
    assert task.docs == 30 and task.num_slots == sum(1 for r in task.requests) and len(task) % 8 == 0
    assert {len([r for r in task.requests if r.doc == d]) for d in range(30)} <= {3, 4, 5}
    first = task.requests[0]
    question = "Question: Which technology was developed most recently?\nAnswer:"
    assert tok.decode(first.context[1:] + first.continuation) == question + " cellular telephone"
    assert tok.decode(first.context[1:]) == question and first.gold == 0
    item = task[0]
    assert len(task.rows[0]) > 1 and task.rows[0][0] == 0  # several requests share the first row
    for j in task.rows[0]:
        mine = item["slot"] == j
        scored = item["labels"][item["loss_mask"].bool() & mine].tolist()
        assert scored == task.requests[j].continuation  # exactly each continuation's labels, under its slot
        start = int(mine.nonzero()[0])
        assert item["tokens"][start] == tok.eod and item["position_ids"][start] == 0  # a question starts a document
    gold = np.array([r.choice == r.gold for r in task.requests], dtype=np.float64)
    oracle = np.stack([1.0 - gold, np.ones_like(gold), np.ones_like(gold)], axis=1)  # loss 0 for the gold choice
    figures = {f.metric: f for f in task.figures(oracle)}
    assert figures["acc"].value == 1.0 and figures["acc_norm"].value == 1.0 and figures["acc"].n == 30
    contrarian = {f.metric: f.value for f in task.figures(np.stack([gold, *[np.ones_like(gold)] * 2], axis=1))}
    assert contrarian == {"acc": 0.0, "acc_norm": 0.0}
    # Length normalisation divides by each choice's UTF-8 bytes: with a loss proportional to the bytes,
    # acc prefers the shortest choice and acc_norm is indifferent (ties go to the first choice).
    nbytes = np.array([r.continuation_bytes for r in task.requests], dtype=np.float64)
    figures = {f.metric: f.value for f in task.figures(np.stack([nbytes, nbytes, nbytes], axis=1))}
    shortest = [
        min((r for r in task.requests if r.doc == d), key=lambda r: (r.continuation_bytes, r.choice)) for d in range(30)
    ]
    firsts = [min(r.choice for r in task.requests if r.doc == d) for d in range(30)]
    assert figures["acc"] == pytest.approx(np.mean([r.choice == r.gold for r in shortest]))
    assert figures["acc_norm"] == pytest.approx(
        np.mean([c == task.requests[[r.doc for r in task.requests].index(d)].gold for d, c in enumerate(firsts)])
    )


def test_gold_bpb_and_infilling_tasks_use_the_training_fim_layout():
    from megatron_ext.data.fim import FimTokenIds, infilling_prompt
    from megatron_ext.evaluation import benchmark_data
    from megatron_ext.evaluation.infilling import derive
    from megatron_ext.evaluation.tasks import build_task_set

    tok = CrystalTokenizer(str(DEMO_TOKENIZER))
    infill = build_task_set("infill_single_gold", 5, tok, seq_length=1024, batch_size=4)
    first = derive(benchmark_data.humaneval_problems(), "single")[0]
    ids = FimTokenIds.of(tok)
    assert infill.requests[0].context == [tok.eod, *infilling_prompt(tok, ids, first.prefix, first.suffix)]
    assert tok.decode([ids.middle, *infill.requests[0].continuation]) == "<|fim_middle|>" + first.middle
    humaneval = build_task_set("humaneval_gold", None, tok, seq_length=1024, batch_size=4)
    assert humaneval.num_slots == 164 and humaneval.truncated == 0
    slots = np.zeros((humaneval.num_slots, 3))
    slots[:, 0] = [len(r.continuation) * np.log(2) * 8 for r in humaneval.requests]  # 8 bits per token
    (bpb,) = humaneval.figures(slots)
    tokens = sum(len(r.continuation) for r in humaneval.requests)
    assert bpb.value == pytest.approx(8 * tokens / sum(r.continuation_bytes for r in humaneval.requests))


def test_codegen2_gold_infilling_uses_the_span_corruption_layout(tmp_path):
    """infill_single_gold_codegen2: the middle (the same ids and bytes as the FIM task's) after CodeGen2's
    prompt, prefix <mask_1> suffix <eod> <sep> <mask_1>, as training lays out a document with one span."""
    from megatron_ext.evaluation import benchmark_data
    from megatron_ext.evaluation.infilling import derive
    from megatron_ext.evaluation.tasks import TaskError, build_task_set

    tok = CrystalTokenizer(str(DEMO_TOKENIZER))
    codegen2 = build_task_set("infill_single_gold_codegen2", 5, tok, seq_length=1024, batch_size=4)
    fim = build_task_set("infill_single_gold", 5, tok, seq_length=1024, batch_size=4)
    first = derive(benchmark_data.humaneval_problems(), "single")[0]
    request = codegen2.requests[0]
    mask, sep = tok.special_token_id("<mask_1>"), tok.special_token_id("<sep>")
    assert request.context[0] == tok.eod and request.context[-3:] == [tok.eod, sep, mask]
    assert tok.decode(request.context[1:-3]) == first.prefix + "<mask_1>" + first.suffix
    assert tok.decode([mask, *request.continuation]) == "<mask_1>" + first.middle
    assert [r.continuation for r in codegen2.requests] == [r.continuation for r in fim.requests]
    assert [r.continuation_bytes for r in codegen2.requests] == [r.continuation_bytes for r in fim.requests]
    with pytest.raises(TaskError, match="infill_multi_gold_codegen2: the tokenizer has no CodeGen2 sentinels"):
        build_task_set("infill_multi_gold_codegen2", 2, _hf_tokenizer(tmp_path, "byte_level"), 256, 4)


def test_mmlu_spans_its_subjects_and_scores_like_the_other_choice_tasks():
    from megatron_ext.evaluation import benchmark_data
    from megatron_ext.evaluation.tasks import build_task_set

    questions = benchmark_data.mmlu_questions()
    assert len(questions) == 14042  # MMLU's test split
    assert len({q["subject"] for q in questions[:57]}) == 57  # interleaved: a cap of 57 spans every subject
    tok = CrystalTokenizer(str(DEMO_TOKENIZER))
    task = build_task_set("mmlu", 57, tok, seq_length=512, batch_size=8)
    assert task.docs == 57 and task.num_slots == 4 * 57
    first = task.requests[0]
    assert tok.decode(first.context[1:]) == f"Question: {questions[0]['question']}\nAnswer:"
    gold = np.array([r.choice == r.gold for r in task.requests], dtype=np.float64)
    figures = {f.metric: f.value for f in task.figures(np.stack([1.0 - gold, gold * 0 + 1, gold * 0 + 1], axis=1))}
    assert figures == {"acc": 1.0, "acc_norm": 1.0}
