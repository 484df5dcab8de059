"""crystal-megatron: the project's extensions to Megatron-Core."""
