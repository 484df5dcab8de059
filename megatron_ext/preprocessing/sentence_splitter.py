"""Sentence splitting with nltk's Punkt.

Punkt's trained parameters are a download that these machines cannot make; when they are not installed
(NLTK_DATA), an untrained Punkt tokenizer is used (it still splits at sentence punctuation followed by
whitespace and a capital, but knows no abbreviations) and the caller is told once.
"""

from __future__ import annotations


def load_punkt(lang: str):
    """Returns (tokenizer, warning or None)."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    for resource in (f"tokenizers/punkt_tab/{lang}/", f"tokenizers/punkt/{lang}.pickle"):
        try:
            if resource.endswith("/"):
                return nltk.tokenize.PunktTokenizer(lang), None
            return nltk.data.load(resource), None
        except (LookupError, OSError, AttributeError):
            continue
    return PunktSentenceTokenizer(), (
        f"warning: nltk punkt data for {lang!r} is not installed (set NLTK_DATA); "
        "splitting sentences with an untrained Punkt tokenizer"
    )


def split_sentences(tokenizer, text: str, keep_newlines: bool) -> list[str]:
    """Sentences of text. With keep_newlines every character is kept: each sentence runs up to the next
    one's start, so newlines and indentation survive; without, sentences are Punkt's stripped spans."""
    spans = list(tokenizer.span_tokenize(text))
    if not spans:
        return [text]
    if not keep_newlines:
        return [text[a:b] for a, b in spans]
    starts = [0] + [a for a, _ in spans[1:]]
    ends = starts[1:] + [len(text)]
    return [text[a:b] for a, b in zip(starts, ends)]
