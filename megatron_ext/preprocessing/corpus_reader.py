"""Reading corpus files (.jsonl, .jsonl.gz, .jsonl.zst, .parquet) and checking each record.

The main process only reads raw lines (cheap); decoding, JSON parsing and the checks run in workers
(``parse_record``), so the reader never becomes the bottleneck.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from typing import Iterator

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
SKIP_REASONS = ("malformed_json", "missing_key", "non_string", "invalid_utf8", "lone_surrogate", "empty_text")


class InputError(ValueError):
    """Unusable input; the message names the path."""


class BadRecord(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def resolve_inputs(spec: str) -> list[str]:
    """A file, a glob, or a directory (searched recursively) -> the sorted corpus files."""
    if os.path.isdir(spec):
        found = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files]
    elif os.path.isfile(spec):
        found = [spec]
    else:
        found = glob.glob(spec, recursive=True)
        if not found:
            raise InputError(f"--input {spec}: no such file, directory or matching glob")
    files = sorted(f for f in found if f.endswith(SUFFIXES))
    if not files:
        raise InputError(f"--input {spec}: no {'/'.join(SUFFIXES)} files")
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise InputError(f"--input {unreadable[0]}: not readable")
    return files


def _open_binary(path: str) -> io.BufferedIOBase:
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


class DamagedFile(Exception):
    """A file that cannot be read to its end (truncated or corrupt compression, a broken parquet file)."""

    def __init__(self, path: str, records: int, cause: BaseException):
        super().__init__(f"{path}: unreadable after {records} records ({type(cause).__name__}: {cause})")
        self.path, self.records = path, records


def read_records_checked(path: str) -> Iterator[tuple[int, bytes | dict]]:
    """read_records, with any failure of the file's reading (gzip's EOFError, zstandard's ZstdError,
    pyarrow's ArrowInvalid, an OSError, ...: each library raises its own) as one DamagedFile that names
    the file and the records read before the damage."""
    records = 0
    try:
        for record in read_records(path):
            records += 1
            yield record
    except Exception as e:  # noqa: BLE001 - see the docstring: every reader error is a damaged file
        raise DamagedFile(path, records, e) from None


def read_records(path: str) -> Iterator[tuple[int, bytes | dict]]:
    """(line number from 1, raw line bytes) for JSONL; (row number from 1, row dict) for parquet."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches():
            for record in batch.to_pylist():
                row += 1
                yield row, record
        return
    with _open_binary(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                yield line_no, line


def parse_record(payload: bytes | dict, keys: list[str]) -> dict[str, str]:
    """The texts under `keys`, or BadRecord naming why the record is skipped."""
    if isinstance(payload, bytes):
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecord("invalid_utf8", f"byte {e.start}") from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRecord("malformed_json", e.msg) from None
        if not isinstance(record, dict):
            raise BadRecord("malformed_json", "not a JSON object")
    else:
        record = payload
    texts = {}
    for key in keys:
        if key not in record:
            raise BadRecord("missing_key", key)
        value = record[key]
        if not isinstance(value, str):
            raise BadRecord("non_string", f"{key} is {type(value).__name__}")
        if not value.strip():
            raise BadRecord("empty_text", key)
        try:  # JSON may escape a lone surrogate ("\ud800"), which is no Unicode text and no tokenizer takes
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRecord("lone_surrogate", f"{key} character {e.start}") from None
        texts[key] = value
    return texts
