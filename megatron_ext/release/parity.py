"""--verify: the exported Hugging Face model against the Megatron model it came from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_ext.release import megatron_runtime
from megatron_ext.tokenizer import EOD_ID

TOLERANCE = 1e-4  # max |delta logits|, both models computing in fp32 on the same weights
_PROMPTS = ("def fibonacci(n):\n    ", "The capital of France is", "import numpy as np\n\nclass ")


@dataclass
class ParityReport:
    max_abs_diff: float
    logit_scale: float
    megatron_greedy: list[list[int]]
    hf_greedy: list[list[int]]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= TOLERANCE and self.megatron_greedy == self.hf_greedy


def prompts(crystal, tokenizer=None, count: int = 3, length: int = 12, seed: int = 0) -> list[torch.Tensor]:
    """Tokenised fixed prompts when a tokenizer is known, then random ones."""
    out = [torch.tensor([tokenizer.encode(p)]) for p in _PROMPTS] if tokenizer is not None else []
    generator = torch.Generator().manual_seed(seed)
    out += [torch.randint(0, crystal.vocab_size, (1, length), generator=generator) for _ in range(count)]
    return [p[:, : crystal.seq_length // 2] for p in out]


@torch.no_grad()
def megatron_greedy(model, ids: torch.Tensor, vocab_size: int, new_tokens: int) -> list[int]:
    """Greedy decoding by full re-computation (the plain reading of the model, no cache), stopping after
    EOS as generate() does."""
    for _ in range(new_tokens):
        next_id = megatron_runtime.logits(model, ids, vocab_size)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat((ids, next_id), dim=1)
        if next_id.item() == EOD_ID:
            break
    return ids[0].tolist()


@torch.no_grad()
def compare(megatron_model, hf_model, crystal, prompt_ids: list[torch.Tensor], new_tokens: int = 16) -> ParityReport:
    max_diff, scale, meg_gen, hf_gen = 0.0, 0.0, [], []
    for ids in prompt_ids:
        expected = megatron_runtime.logits(megatron_model, ids, crystal.vocab_size)
        got = hf_model(ids, use_cache=False).logits.float()
        max_diff = max(max_diff, (got - expected).abs().max().item())
        scale = max(scale, expected.abs().max().item())
        new = min(new_tokens, crystal.seq_length - ids.shape[1])
        meg_gen.append(megatron_greedy(megatron_model, ids, crystal.vocab_size, new))
        hf_gen.append(
            hf_model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False, pad_token_id=EOD_ID
            )[0].tolist()
        )
    return ParityReport(max_diff, scale, meg_gen, hf_gen)


def verify(
    checkpoint_path: str, crystal, padded_vocab: int, hf_dir: str, dtype: torch.dtype, tokenizer=None,
    verify_integrity: bool = True,
) -> ParityReport:  # fmt: skip
    """Load both models on this machine and compare them. A bf16 export is compared with the Megatron
    weights rounded to bf16, so that both sides hold the same numbers and the fp32 tolerance applies.
    verify_integrity: hash the checkpoint's files first (False where the caller has just done so)."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.checkpointing import load_model_weights

    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    with megatron_runtime.single_process() as device:
        model = megatron_runtime.build_model(crystal, padded_vocab, device)
        load_model_weights(checkpoint_path, [model], verify=verify_integrity)
        if dtype != torch.float32:
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_(p.to(dtype).float())
        return compare(model, hf_model, crystal, prompts(crystal, tokenizer))
