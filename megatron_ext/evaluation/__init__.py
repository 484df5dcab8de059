"""Evaluation: per-source bits per byte inside the training loop, the benchmark data the packages ship,
code execution in a sandbox, and the estimators of the papers' figures."""
