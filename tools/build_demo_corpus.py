#!/usr/bin/env python
"""Build the embedded demo corpus from what every machine with Python already has; nothing is downloaded.

- code: the Python standard library's own sources (tests excluded), one document per file;
- text: natural language: the Python reference manual's topics (pydoc_data), the standard library's
  module docstrings, and, where present, licence texts and Debian package READMEs / copyright notices.
Each is capped at --max-mb and written as JSONL ({"text": ...}) under OUT/text.jsonl and OUT/code.jsonl,
in a fixed (sorted) order.

The corpus is this machine's: another Python build (3.10 vs 3.12, or a distribution's patched standard
library) or another set of installed packages (/usr/share/doc) gives other documents, hence another
tokenizer and other demo figures. OUT/manifest.json records what it was built from (the interpreter, the
documents, bytes and sha256 of each source); `--describe DIR` prints that, with the token counts of the
preprocessed sources, in one line (the demo's first line), so two machines' figures can be compared.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import hashlib
import json
import os
import platform
import sys
import sysconfig
from typing import Iterator

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "ensurepip"}


def stdlib_sources() -> Iterator[str]:
    root = sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                yield os.path.join(dirpath, name)


def _read(path: str) -> str | None:
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def code_documents() -> Iterator[str]:
    for path in stdlib_sources():
        text = _read(path)
        if text and text.strip():
            yield text


def text_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    for path in stdlib_sources():
        source = _read(path)
        try:
            doc = ast.get_docstring(ast.parse(source)) if source else None
        except SyntaxError:
            doc = None
        if doc and len(doc) > 200:
            yield doc
    for pattern in ("/usr/share/common-licenses/*", "/usr/share/doc/*/README*", "/usr/share/doc/*/copyright"):
        for path in sorted(glob.glob(pattern)):
            text = _read(path) if os.path.isfile(path) else None
            if text and text.strip():
                yield text


def write_jsonl(documents: Iterator[str], path: str, max_bytes: int) -> dict:
    """The documents as JSONL (up to max_bytes of text); returns their count, text bytes and the file's sha256."""
    count = size = 0
    digest = hashlib.sha256()
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            line = json.dumps({"text": doc}, ensure_ascii=False) + "\n"
            f.write(line)
            digest.update(line.encode("utf-8"))
            count += 1
            size += len(doc.encode("utf-8"))
            if size >= max_bytes:
                break
    os.replace(tmp, path)
    return {"documents": count, "bytes": size, "sha256": digest.hexdigest()}


def describe(corpus_dir: str) -> str:
    """One line: what the corpus in corpus_dir (raw/ and the preprocessed sources) was built from."""
    from megatron_ext.upstream_warnings import silence

    silence()  # before Megatron-Core is imported (for its IndexedDataset)
    from megatron_ext.data.indexed_files import file_shape

    with open(os.path.join(corpus_dir, "raw", MANIFEST)) as f:
        manifest = json.load(f)
    parts = []
    for name, source in manifest["sources"].items():
        prefix = os.path.join(corpus_dir, f"{name}_text_document")
        if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
            raise FileNotFoundError(f"{prefix}.bin / .idx not there (the preprocessed {name} source)")
        tokens = file_shape(prefix)[1]
        parts.append(f"{name} {source['documents']:,} documents, {source['bytes'] / 2**20:.2f} MB, {tokens:,} tokens "
                     f"(sha256 {source['sha256'][:12]})")  # fmt: skip
    return f"demo corpus: built from {manifest['python']} ({manifest['platform']}): {'; '.join(parts)}"


MANIFEST = "manifest.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", help="where to write text.jsonl, code.jsonl and manifest.json")
    p.add_argument("--max-mb", type=float, default=4.0, help="cap per source")
    p.add_argument("--describe", metavar="DIR", help="print what the corpus in DIR (e.g. data/demo) was built from")
    args = p.parse_args(argv)
    if args.describe:
        try:
            print(describe(args.describe))
        except (OSError, KeyError, ValueError) as e:
            print(f"build_demo_corpus.py: error: --describe {args.describe}: {e} (rebuild: make clean setup)",
                  file=sys.stderr)  # fmt: skip
            return 2
        return 0
    if not args.output_dir:
        p.error("--output-dir or --describe is required")
    os.makedirs(args.output_dir, exist_ok=True)
    sources = {}
    for name, docs in (("text", text_documents()), ("code", code_documents())):
        path = os.path.join(args.output_dir, f"{name}.jsonl")
        sources[name] = write_jsonl(docs, path, int(args.max_mb * 2**20))
        print(f"{name}: {sources[name]['documents']} documents, {sources[name]['bytes'] / 2**20:.1f} MB")
    manifest = {
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": f"{platform.system()} {platform.machine()}",
        "stdlib": sysconfig.get_paths()["stdlib"],
        "sources": sources,
    }
    with open(os.path.join(args.output_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
