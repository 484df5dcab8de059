"""A checkpoint as a Hugging Face model for evaluation: an exported directory (config.json, safetensors,
tokenizer files) as transformers loads it, or a pretrain_crystal.py checkpoint converted in memory with
the release code (the same tensors tools/convert_to_hf.py writes), so a running job's checkpoints are
evaluated without an export on disk."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class LoadedModel:
    model: torch.nn.Module  # CrystalCoderLMHeadModel, eval mode
    tokenizer: object  # the project's tokenizer (CrystalTokenizer / HuggingFaceTokenizer): same ids
    seq_length: int
    path: str
    iteration: int | None  # of a Megatron checkpoint (None for an exported directory)


class CheckpointLoadError(ValueError):
    """A checkpoint that cannot be evaluated; the message names it."""


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def load(path: str, step: int | None = None, tokenizer_model: str | None = None, tokenizer_type: str | None = None,
         dtype: torch.dtype = torch.float32, verify_integrity: bool = True) -> LoadedModel:  # fmt: skip
    from megatron_ext.tokenizer import build_tokenizer
    from megatron_ext.tokenizer.crystal_tokenizer import DEFAULT_TOKENIZER_TYPE

    if not os.path.isdir(path):
        raise CheckpointLoadError(f"--checkpoint {path}: no such directory")
    if is_hf_directory(path):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=dtype)
        if tokenizer_model is None:
            for name, kind in (("tokenizer.model", "CrystalTokenizer"), ("tokenizer.json", "HuggingFaceTokenizer")):
                if os.path.isfile(os.path.join(path, name)):
                    tokenizer_model, tokenizer_type = os.path.join(path, name), kind
                    break
        seq_length, iteration, where = model.config.n_positions, None, path
    else:
        from megatron_ext.checkpoint_files import CheckpointError
        from megatron_ext.release import hf_format
        from megatron_ext.release.dist_checkpoint_reader import DistCheckpointReader
        from megatron_ext.release.hf_modeling.configuration_crystalcoder import CrystalCoderConfig
        from megatron_ext.release.hf_modeling.modeling_crystalcoder import CrystalCoderLMHeadModel

        try:
            reader = DistCheckpointReader(path, step, verify_integrity)
        except CheckpointError as e:
            raise CheckpointLoadError(str(e)) from None
        model = CrystalCoderLMHeadModel(CrystalCoderConfig(**hf_format.hf_config(reader.crystal)))
        weights = dict(hf_format.to_hf(name, tensor) for name, tensor in reader.reference_tensors())
        model.load_state_dict(weights, strict=True)
        model.to(dtype)
        if tokenizer_model is None and reader.tokenizer:
            tokenizer_model, tokenizer_type = reader.tokenizer["model"], reader.tokenizer["type"]
        seq_length, iteration, where = reader.crystal.seq_length, reader.iteration, reader.path
    if tokenizer_model is None:
        raise CheckpointLoadError(f"{path}: no tokenizer found beside the checkpoint; give --tokenizer-model")
    model.eval()
    tokenizer = build_tokenizer(tokenizer_type or DEFAULT_TOKENIZER_TYPE, tokenizer_model)
    return LoadedModel(model, tokenizer, seq_length, where, iteration)


@torch.no_grad()
def score(loaded: LoadedModel, evaluation, batch_rows: int = 8, progress=None):
    """The slot table of an evaluation set (eval_set.py), computed with the Hugging Face model: per row the
    summed negative log-likelihood of its masked labels, its tokens and label bytes."""
    import numpy as np

    from megatron_ext.evaluation.eval_set import SLOT_COLUMNS, packed_attention_mask, slot_table

    slots = torch.zeros(evaluation.num_slots, SLOT_COLUMNS, dtype=torch.float64)
    rows = len(evaluation)
    for start in range(0, rows, batch_rows):
        items = [evaluation[i] for i in range(start, min(start + batch_rows, rows))]
        batch = {
            k: torch.stack([item[k] for item in items])
            for k in ("tokens", "labels", "loss_mask", "slot", "label_bytes", "position_ids")
        }
        used = int(batch["loss_mask"].nonzero()[:, 1].max()) + 1 if batch["loss_mask"].any() else 1
        packing = {}
        if evaluation.packed:  # several requests a row, each attending only to itself
            positions = batch["position_ids"][:, :used]
            packing = {"position_ids": positions, "attention_mask": packed_attention_mask(positions)}
        logits = loaded.model(input_ids=batch["tokens"][:, :used], use_cache=False, **packing).logits.float()
        per_token = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["labels"][:, :used].flatten(), reduction="none"
        ).view(len(items), used)
        slot = batch["slot"][:, :used] if batch["slot"].dim() == 2 else batch["slot"]  # per token or per row
        slots += slot_table(per_token, batch["loss_mask"][:, :used], batch["label_bytes"][:, :used], slot,
                            evaluation.num_slots).double()  # fmt: skip
        if progress is not None:
            progress.update(len(items))
    return np.asarray(slots)
