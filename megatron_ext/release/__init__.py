"""Hugging Face release: Megatron dist checkpoints <-> the LLM360 CrystalCoder format."""
