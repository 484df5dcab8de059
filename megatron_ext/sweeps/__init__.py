"""Data-mixture ablations: a sweep of phases files derived from one base file, run, evaluated, compared."""
