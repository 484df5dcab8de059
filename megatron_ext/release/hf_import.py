"""CrystalCoder Hugging Face directory -> a weights-only dist checkpoint that pretrain_crystal.py --load
continues from (iteration 0, fresh optimizer and schedule) at any TP / PP."""

from __future__ import annotations

from megatron_ext.checkpointing import ModelState, checkpoint_metadata, save_checkpoint
from megatron_ext.model.crystal_gpt import padded_vocab_size
from megatron_ext.release import megatron_runtime
from megatron_ext.release.hf_weights import HFWeights
from megatron_ext.release.weight_mapping import load_reference_weights


def import_checkpoint(weights: HFWeights, save_dir: str, vocab_divisible_by: int, tokenizer: dict | None) -> str:
    """Place the weights into a TP 1 / PP 1 Megatron model and save it with dist_checkpointing. The saved
    tensors are global, so the layout of this one process does not constrain the layout that loads them.
    Memory: the model once, in fp32."""
    cfg = weights.cfg
    padded = padded_vocab_size(cfg.vocab_size, vocab_divisible_by)
    with megatron_runtime.single_process() as device:
        model = megatron_runtime.build_model(cfg, padded, device)
        load_reference_weights([model], weights, cfg, padded)
        return save_checkpoint(save_dir, 0, {"model": ModelState([model])}, checkpoint_metadata(cfg, padded, tokenizer))
