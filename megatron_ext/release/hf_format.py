"""The released LLM360 CrystalCoder format: its config.json and its tensor names and layouts.

The pivot between Megatron and Hugging Face is the reference model's naming (megatron_ext.model.reference):
weights as nn.Linear [out, in], QKV as [q; k; v], the SwiGLU gate (c_fc2) and up (c_fc) apart, the
vocabulary unpadded. The release differs from it only by the "transformer." prefix and by GPT-2's Conv1D,
which stores every linear weight transposed ([in, out]).
"""

from __future__ import annotations

import json
import os

from megatron_ext.model.crystal_config import CrystalConfig
from megatron_ext.tokenizer import BOS_ID, EOD_ID

HF_PREFIX = "transformer."
MODELING_DIR = os.path.join(os.path.dirname(__file__), "hf_modeling")
MODELING_FILES = ("configuration_crystalcoder.py", "modeling_crystalcoder.py")
# Written in the release's key order; values are filled from the model config.
_RELEASE_TEMPLATE = {
    "attn_pdrop": 0.0,
    "scale_attn_weights": True,
    "resid_pdrop": 0.0,
    "mup_embeddings_scale": None,
    "n_inner": None,
    "n_embd": None,
    "layer_norm_epsilon": None,
    "n_positions": None,
    "activation_function": "swiglu",
    "n_head": None,
    "n_layer": None,
    "mup_output_alpha": None,
    "mup_width_scale": None,
    "position_embedding_type": "rotary",
    "rotary_dim": None,
    "mup_scale_qk_dot_by_d": True,
    "tie_word_embeddings": True,
    "vocab_size": None,
    "embd_pdrop": 0.0,
    "model_type": "crystalcoder",
    "use_cache": True,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOD_ID,
    "auto_map": {
        "AutoConfig": "configuration_crystalcoder.CrystalCoderConfig",
        "AutoModel": "modeling_crystalcoder.CrystalCoderModel",
        "AutoModelForCausalLM": "modeling_crystalcoder.CrystalCoderLMHeadModel",
    },
    "architectures": ["CrystalCoderLMHeadModel"],
}


class FormatError(ValueError):
    """A Hugging Face directory or config that is not in the CrystalCoder format; the message names it."""


def hf_config(cfg: CrystalConfig) -> dict:
    values = {
        "mup_embeddings_scale": cfg.mup_embeddings_scale,
        "n_inner": cfg.ffn_hidden_size,
        "n_embd": cfg.hidden_size,
        "layer_norm_epsilon": cfg.layernorm_epsilon,
        "n_positions": cfg.seq_length,
        "n_head": cfg.num_attention_heads,
        "n_layer": cfg.num_layers,
        "mup_output_alpha": cfg.mup_output_alpha,
        "mup_width_scale": cfg.mup_width_scale,
        "rotary_dim": cfg.rotary_dim,
        "vocab_size": cfg.vocab_size,
    }
    return {key: values.get(key, default) for key, default in _RELEASE_TEMPLATE.items()}


def crystal_config_from_hf(config: dict, where: str) -> CrystalConfig:
    """The model config of a CrystalCoder config.json; rejects anything not Crystal-shaped."""
    if config.get("model_type") != "crystalcoder":
        raise FormatError(f"{where}: model_type {config.get('model_type')!r} is not 'crystalcoder'")
    fixed = {
        "activation_function": "swiglu",
        "position_embedding_type": "rotary",
        "tie_word_embeddings": True,
        "mup_scale_qk_dot_by_d": True,
    }
    for key, expected in fixed.items():
        if config.get(key, expected) != expected:
            raise FormatError(f"{where}: {key} = {config[key]!r}; Crystal needs {expected!r}")
    try:
        hidden, heads = config["n_embd"], config["n_head"]
        cfg = CrystalConfig(
            hidden_size=hidden,
            num_layers=config["n_layer"],
            num_attention_heads=heads,
            ffn_hidden_size=config["n_inner"],
            seq_length=config["n_positions"],
            vocab_size=config["vocab_size"],
            rotary_percent=config["rotary_dim"] / (hidden // heads),
            layernorm_epsilon=config["layer_norm_epsilon"],
            mup_width_scale=config["mup_width_scale"],
            mup_embeddings_scale=config["mup_embeddings_scale"],
            mup_output_alpha=config["mup_output_alpha"],
        )
    except KeyError as e:
        raise FormatError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise FormatError(f"{where}: not a Crystal config ({e})") from None
    return cfg


def read_hf_config(hf_dir: str) -> CrystalConfig:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FormatError(f"{hf_dir}: no config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not JSON ({e})") from None
    return crystal_config_from_hf(config, path)


def reference_names(cfg: CrystalConfig) -> list[str]:
    """Every tensor of the model in the reference naming, in the release's order."""
    names = ["wte.weight"]
    for i in range(cfg.num_layers):
        for part in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_fc2", "mlp.c_proj"):
            names += [f"h.{i}.{part}.weight", f"h.{i}.{part}.bias"]
    return names + ["ln_f.weight", "ln_f.bias"]


def reference_shape(name: str, cfg: CrystalConfig) -> tuple[int, ...]:
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    if name == "wte.weight":
        return (cfg.vocab_size, h)
    part, kind = name.rsplit(".", 1)
    out_in = {
        "attn.c_attn": (3 * h, h),
        "attn.c_proj": (h, h),
        "mlp.c_fc": (f, h),
        "mlp.c_fc2": (f, h),
        "mlp.c_proj": (h, f),
    }
    for suffix, shape in out_in.items():
        if part.endswith(suffix):
            return shape if kind == "weight" else shape[:1]
    return (h,)  # layer norms


def hf_shape(reference_name: str, cfg: CrystalConfig) -> tuple[int, ...]:
    shape = reference_shape(reference_name, cfg)
    return shape[::-1] if is_conv1d_weight(reference_name) else shape


def is_conv1d_weight(reference_name: str) -> bool:
    """Linear weights, which GPT-2's Conv1D stores as [in, out]; not the embedding, not the norms."""
    return reference_name.endswith(".weight") and ".ln_" not in reference_name and reference_name.startswith("h.")


def to_hf(reference_name: str, tensor):
    """(HF name, HF tensor) of a reference-format tensor. The transpose is a view."""
    return HF_PREFIX + reference_name, tensor.t() if is_conv1d_weight(reference_name) else tensor


def from_hf(reference_name: str, tensor):
    """The reference-format tensor of the HF tensor stored under HF_PREFIX + reference_name."""
    return tensor.t() if is_conv1d_weight(reference_name) else tensor
