"""The Crystal model: presets, Megatron-Core build, and an independent PyTorch reference."""

from megatron_ext.model.crystal_config import PRESETS, CrystalConfig, get_preset

__all__ = ["PRESETS", "CrystalConfig", "get_preset"]
