"""Training on Megatron-Core: arguments, process groups, data, optimizer, checkpoints, metrics, loop."""
