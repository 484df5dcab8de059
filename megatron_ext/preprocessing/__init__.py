"""Corpus preprocessing: input readers, record checks, sentence splitting, atomic indexed outputs."""
