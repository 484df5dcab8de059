"""The remote code shipped in every exported directory (copied there; transformers imports it from there)."""
