"""How the training gets its batches: the run's data feeds (feeds.py: what the loop asks of a blend or of
phases), the ranks that read and broadcast them (readers.py), Megatron-Core's datasets and the micro-batch
loaders (datasets.py)."""
