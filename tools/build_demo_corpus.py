#!/usr/bin/env python
"""Build the embedded demo corpus from what every machine with Python already has; nothing is downloaded.

- code: the Python standard library's own sources (tests excluded), one document per file;
- text: natural language: the Python reference manual's topics (pydoc_data), the standard library's
  module docstrings, and, where present, licence texts and Debian package READMEs / copyright notices.
Each is capped at --max-mb and written as JSONL ({"text": ...}) under OUT/text.jsonl and OUT/code.jsonl,
in a fixed (sorted) order.
"""

from __future__ import annotations

import argparse
import ast
import glob
import gzip
import json
import os
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


def write_jsonl(documents: Iterator[str], path: str, max_bytes: int) -> tuple[int, int]:
    count = size = 0
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
            count += 1
            size += len(doc.encode("utf-8"))
            if size >= max_bytes:
                break
    os.replace(tmp, path)
    return count, size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-mb", type=float, default=4.0, help="cap per source")
    args = p.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, docs in (("text", text_documents()), ("code", code_documents())):
        count, size = write_jsonl(docs, os.path.join(args.output_dir, f"{name}.jsonl"), int(args.max_mb * 2**20))
        print(f"{name}: {count} documents, {size / 2**20:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
