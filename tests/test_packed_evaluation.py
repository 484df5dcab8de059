"""Packed evaluation rows (evaluation/eval_set.py): several requests a row, each attending only to itself
with its positions restarting, score every request as it scores alone in a row, with Megatron-Core's model
on both local attention paths and with the Hugging Face export's model. A row packed under a plain causal
mask scores differently (the check can fail)."""

import numpy as np
import pytest
import torch
from helpers.process_group import run_in_process_group

from megatron_ext.evaluation.eval_set import SLOT_COLUMNS, Piece, pack, packed_attention_mask, packed_row, slot_table
from megatron_ext.model.crystal_config import get_preset

SEQ = 96


def _requests(vocab: int) -> list[Piece]:
    """14 requests of 9 to 60 ids (the context's first id scored from position 3 on), one longer than a row."""
    rng = np.random.default_rng(0)
    lengths = [*rng.integers(9, 61, size=13), SEQ + 20]
    return [Piece(list(rng.integers(1, vocab, size=n)), 3, i) for i, n in enumerate(lengths)]


def _batches(pieces: list[Piece], together: bool) -> dict:
    rows = [packed_row([pieces[i] for i in row], SEQ, 0) for row in pack([len(p.ids) for p in pieces], SEQ, together)]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_packing_fills_rows_in_order_and_restarts_positions():
    pieces = _requests(1000)
    rows = pack([len(p.ids) for p in pieces], SEQ)
    assert [i for row in rows for i in row] == list(range(len(pieces)))
    assert len(rows) < len(pieces) and rows[-1] == [len(pieces) - 1]  # the long one alone, truncated
    batch = _batches(pieces, True)
    first = rows[0]
    starts = np.cumsum([0] + [len(pieces[i].ids) - 1 for i in first])
    positions = batch["position_ids"][0]
    assert all(positions[s] == 0 for s in starts) and positions[starts[1] - 1] == len(pieces[first[0]].ids) - 2
    assert batch["loss_mask"][0, : starts[-1]].sum() == sum(len(pieces[i].ids) - 1 - 3 for i in first)
    allowed = packed_attention_mask(batch["position_ids"][:1])[0, 0]
    assert allowed[starts[1], starts[1]] and not allowed[starts[1], starts[1] - 1] and allowed[starts[1] - 1, 0]


def _slot_tables(per_token_loss, batches: dict, num_slots: int) -> torch.Tensor:
    return slot_table(per_token_loss, batches["loss_mask"], batches["label_bytes"], batches["slot"], num_slots)


def _megatron_packed_equals_alone(attention: str):
    from megatron_ext.kernels.selection import CoreAttention, KernelPath
    from megatron_ext.model.crystal_gpt import build_model, transformer_config

    c = get_preset("crystal-test").replace(seq_length=SEQ)
    path = KernelPath(transformer_impl="local", attention=CoreAttention[attention], on_gpu=False)
    torch.manual_seed(0)
    (model,) = build_model(c, transformer_config(c, use_cpu_initialization=True), c.vocab_size, path)
    with torch.no_grad():  # larger weights than the init's, so that attention over other requests shows
        for p in model.parameters():
            p.mul_(4.0)
    model.eval()
    pieces = _requests(c.vocab_size)

    def table(batches, mask):
        with torch.no_grad():
            loss = model(batches["tokens"], batches["position_ids"], mask, labels=batches["labels"])
        return _slot_tables(loss, batches, len(pieces))

    alone = table(_batches(pieces, False), None)
    packed = _batches(pieces, True)
    together = table(packed, ~packed_attention_mask(packed["position_ids"]))
    assert torch.equal(together[:, 1:], alone[:, 1:])  # the same tokens of each request scored
    error = ((together[:, 0] - alone[:, 0]).abs() / alone[:, 0].abs()).max().item()
    assert error < 1e-5, error
    plain = table(packed, None)  # causal over the whole row: later requests see earlier ones
    assert ((plain[:, 0] - alone[:, 0]).abs() / alone[:, 0].abs()).max().item() > 1e-3


@pytest.mark.launch
@pytest.mark.timeout(180)
@pytest.mark.parametrize("attention", ["MEGATRON_UNFUSED", "TORCH_SDPA"])
def test_megatron_model_scores_packed_requests_as_alone(attention):
    run_in_process_group(_megatron_packed_equals_alone, attention)


def test_hf_model_scores_packed_requests_as_alone():
    from megatron_ext.release.hf_format import hf_config
    from megatron_ext.release.hf_modeling.configuration_crystalcoder import CrystalCoderConfig
    from megatron_ext.release.hf_modeling.modeling_crystalcoder import CrystalCoderLMHeadModel

    c = get_preset("crystal-test").replace(seq_length=SEQ)
    torch.manual_seed(0)
    model = CrystalCoderLMHeadModel(CrystalCoderConfig(**hf_config(c))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    pieces = _requests(c.vocab_size)

    def table(batches, packed: bool):
        extra = {}
        if packed:
            extra = {
                "position_ids": batches["position_ids"],
                "attention_mask": packed_attention_mask(batches["position_ids"]),
            }
        with torch.no_grad():
            logits = model(input_ids=batches["tokens"], use_cache=False, **extra).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batches["labels"].flatten(), reduction="none")
        return _slot_tables(loss.view(batches["labels"].shape), batches, len(pieces))

    alone = table(_batches(pieces, False), False)
    packed = _batches(pieces, True)
    together = table(packed, True)
    assert together.shape == (len(pieces), SLOT_COLUMNS) and torch.equal(together[:, 1:], alone[:, 1:])
    assert ((together[:, 0] - alone[:, 0]).abs() / alone[:, 0].abs()).max().item() < 1e-5
    assert ((table(packed, False)[:, 0] - alone[:, 0]).abs() / alone[:, 0].abs()).max().item() > 1e-3
