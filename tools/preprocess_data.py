#!/usr/bin/env python
"""Tokenise JSONL / Parquet corpora into Megatron-Core indexed datasets ({prefix}_{key}_document.bin/.idx).

Megatron-LM's flags. Beyond them: bad records (malformed JSON, missing or non-string key, invalid UTF-8,
a lone surrogate, empty text) are counted per reason and skipped (--on-error skip) or stop the run naming
file and line (--on-error fail). A damaged file (truncated .gz, corrupt .zst or .parquet) is reported in
one line with the records read before the damage, which are kept; the rest of that file is skipped and the
run goes on with the other files (--on-error fail: stops there). Outputs appear under their final names only
when complete; a missing input, unreadable tokenizer or unwritable output directory fails before any worker
starts.

  python tools/preprocess_data.py --input data/ --output-prefix out/corpus \\
      --tokenizer-model tok.model --append-eod --workers 16
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import multiprocessing
import os
import sys
import threading
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.upstream_warnings import silence  # noqa: E402

silence()  # before Megatron-Core is imported

from megatron_ext.preprocessing import corpus_reader, indexed_output  # noqa: E402
from megatron_ext.preprocessing.corpus_reader import SKIP_REASONS, BadRecord, InputError  # noqa: E402
from megatron_ext.tokenizer import TokenizerError, add_tokenizer_type_argument, build_tokenizer  # noqa: E402

CHUNK_RECORDS = 256  # records per task: large enough to amortise pickling, small enough to stream


class PreprocessError(RuntimeError):
    pass


@dataclass
class ChunkResult:
    documents: dict[str, list[tuple[list[int], list[int]]]]  # key -> [(tokens, sentence lengths)]
    skipped: list[tuple[str, int, str]]  # (reason, line, detail)
    input_bytes: int
    tokens: int


@dataclass
class Totals:
    documents: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # one line per damaged file
    lock: threading.Lock = field(default_factory=threading.Lock)


# ---- worker side -------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(args: argparse.Namespace) -> None:
    _worker["tokenizer"] = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    _worker["args"] = args
    if args.split_sentences:
        from megatron_ext.preprocessing.sentence_splitter import load_punkt

        _worker["splitter"], _ = load_punkt(args.lang)


def _encode_chunk(records: list[tuple[int, bytes | dict]]) -> ChunkResult:
    args, tok = _worker["args"], _worker["tokenizer"]
    parsed, skipped, input_bytes = [], [], 0
    for line_no, payload in records:
        input_bytes += len(payload) if isinstance(payload, bytes) else 0
        try:
            parsed.append(corpus_reader.parse_record(payload, args.json_keys))
        except BadRecord as bad:
            if args.on_error == "fail":
                raise PreprocessError(f"line {line_no}: {bad.reason} ({bad.detail})") from None
            skipped.append((bad.reason, line_no, bad.detail))
    documents, n_tokens = {}, 0
    for key in args.json_keys:
        # Each document is a list of pieces (sentences, or the whole text), encoded in one batch call.
        if args.split_sentences:
            from megatron_ext.preprocessing.sentence_splitter import split_sentences

            pieces = [split_sentences(_worker["splitter"], texts[key], args.keep_newlines) for texts in parsed]
        else:
            pieces = [[texts[key]] for texts in parsed]
        flat = iter(tok.encode_batch([p for doc in pieces for p in doc]))
        documents[key] = []
        for doc in pieces:
            ids = [next(flat) for _ in doc]
            if args.append_eod:
                ids[-1] = ids[-1] + [tok.eod]
            tokens = [t for piece in ids for t in piece]
            documents[key].append((tokens, [len(piece) for piece in ids]))
            n_tokens += len(tokens)
    return ChunkResult(documents, skipped, input_bytes, n_tokens)


# ---- main side ---------------------------------------------------------------------------------


def _chunks(files: list[str], args: argparse.Namespace, totals: Totals):
    for path in files:
        batch = []
        try:
            for record in corpus_reader.read_records_checked(path):
                batch.append(record)
                if len(batch) == CHUNK_RECORDS:
                    yield path, batch
                    batch = []
        except corpus_reader.DamagedFile as e:
            if args.on_error == "fail":
                raise PreprocessError(str(e)) from None
            message = f"{e}: the records before it are kept, the rest of the file is skipped"
            from tqdm import tqdm

            tqdm.write(f"preprocess_data.py: warning: {message}", file=sys.stderr)  # on its own line, under the bar
            with totals.lock:
                totals.damaged.append(message)
        if batch:
            yield path, batch


def output_prefixes(args: argparse.Namespace) -> dict[str, str]:
    level = "sentence" if args.split_sentences else "document"
    return {key: f"{args.output_prefix}_{key}_{level}" for key in args.json_keys}


def _process_partition(files, out_prefixes, args, dtype, totals, progress) -> None:
    """Tokenise files with a bounded, ordered stream of tasks over this partition's own workers."""
    builders = {
        key: indexed_output.import_megatron_datasets().IndexedDatasetBuilder(indexed_output.bin_path(p), dtype=dtype)
        for key, p in out_prefixes.items()
    }
    workers = max(1, args.workers // args.partitions)
    pool = concurrent.futures.ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(args,))
    try:
        pending = collections.deque()
        chunks = _chunks(files, args, totals)

        def drain_one():
            path, future = pending.popleft()
            try:
                result = future.result()
            except PreprocessError as e:
                raise PreprocessError(f"{path}: {e}") from None
            for key, docs in result.documents.items():
                for tokens, lengths in docs:
                    builders[key].add_document(tokens, lengths)
            with totals.lock:
                totals.documents += len(result.documents[args.json_keys[0]])
                totals.tokens += result.tokens
                totals.input_bytes += result.input_bytes
                for reason, line_no, detail in result.skipped:
                    totals.skipped[reason] += 1
                    if len(totals.examples) < 10:
                        totals.examples.append(f"{path}:{line_no}: {reason} ({detail})")
            progress(len(result.documents[args.json_keys[0]]))

        for path, records in chunks:
            pending.append((path, pool.submit(_encode_chunk, records)))
            if len(pending) >= 4 * workers:
                drain_one()
        while pending:
            drain_one()
    except BaseException:
        # Waiting for the pool after a worker died can block for good (its queue threads), so stop
        # every worker now and let the caller clean up and report.
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():
            child.terminate()
        raise
    pool.shutdown()
    for key, prefix in out_prefixes.items():
        builders[key].finalize(indexed_output.idx_path(prefix))


def _partition(files: list[str], n: int) -> list[list[str]]:
    """Contiguous groups of files (in order), balanced by size."""
    sizes = [os.path.getsize(f) for f in files]
    target, groups, current, acc = sum(sizes) / n, [], [], 0
    for f, size in zip(files, sizes):
        current.append(f)
        acc += size
        if acc >= target * (len(groups) + 1) and len(groups) < n - 1:
            groups.append(current)
            current = []
    groups.append(current)
    return [g for g in groups if g]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="a file, a glob or a directory of .jsonl[.gz|.zst] / .parquet")
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--output-prefix", required=True)
    add_tokenizer_type_argument(p)
    p.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or tokenizers .json")
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--partitions", type=int, default=1, help="groups of input files tokenised concurrently, then merged"
    )
    p.add_argument("--split-sentences", action="store_true")
    p.add_argument("--keep-newlines", action="store_true", help="with --split-sentences: keep newlines in sentences")
    p.add_argument("--lang", default="english", help="nltk punkt language")
    p.add_argument("--log-interval", type=int, default=10000, help="documents between progress refreshes")
    p.add_argument("--on-error", choices=["skip", "fail"], default="skip")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.workers < 1 or args.partitions < 1:
            raise InputError("--workers and --partitions must be >= 1")
        files = corpus_reader.resolve_inputs(args.input)
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
        indexed_output.check_writable(args.output_prefix)
    except (InputError, TokenizerError) as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"preprocess_data.py: error: --output-prefix {args.output_prefix}: {e.strerror}", file=sys.stderr)
        return 2
    if args.split_sentences:
        from megatron_ext.preprocessing.sentence_splitter import load_punkt

        _, warning = load_punkt(args.lang)
        if warning:
            print(warning, file=sys.stderr)

    from tqdm import tqdm

    dtype = indexed_output.token_dtype(tokenizer.vocab_size)
    start = time.perf_counter()
    finals = output_prefixes(args)
    groups = _partition(files, min(args.partitions, len(files)))
    parts = [
        {key: indexed_output.temp_prefix(f"{prefix}.part{i}") for key, prefix in finals.items()}
        for i in range(len(groups))
    ]
    totals = Totals()
    bar = tqdm(unit=" docs", desc="tokenising", dynamic_ncols=True, mininterval=1.0)

    def progress(n_docs: int) -> None:
        with totals.lock:
            before = bar.n
            bar.update(n_docs)
            if bar.n // args.log_interval != before // args.log_interval or bar.n == n_docs:
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(
                    f"{totals.tokens / elapsed:,.0f} tok/s, {totals.input_bytes / elapsed / 2**20:.1f} MB/s"
                )

    try:
        with concurrent.futures.ThreadPoolExecutor(len(groups)) as drivers:
            futures = [
                drivers.submit(_process_partition, g, part, args, dtype, totals, progress)
                for g, part in zip(groups, parts)
            ]
            for f in futures:
                f.result()
        for key, final in finals.items():
            if len(parts) == 1:
                indexed_output.publish(parts[0][key], final)
            else:
                indexed_output.merge([part[key] for part in parts], final, dtype)
    except (PreprocessError, concurrent.futures.process.BrokenProcessPool, KeyboardInterrupt) as e:
        bar.close()
        reason = (
            "a worker died" if isinstance(e, concurrent.futures.process.BrokenProcessPool) else str(e) or "interrupted"
        )
        print(f"preprocess_data.py: error: {reason}; no output written", file=sys.stderr)
        return 1
    finally:
        for part in parts:
            for prefix in part.values():
                indexed_output.remove_outputs(prefix)
    bar.close()

    seconds = time.perf_counter() - start
    skipped = ", ".join(f"{r} {totals.skipped[r]}" for r in SKIP_REASONS if totals.skipped[r]) or "none"
    print(
        f"done: {totals.documents:,} documents, {totals.tokens:,} tokens, skipped: {skipped} | "
        f"{seconds:.1f} s, {totals.tokens / seconds:,.0f} tokens/s, {totals.input_bytes / seconds / 2**20:.1f} MB/s"
    )
    for example in totals.examples:
        print(f"  skipped {example}")
    if totals.damaged:
        print(f"damaged files: {len(totals.damaged)}")
        for message in totals.damaged:
            print(f"  {message}")
    for final in finals.values():
        print(f"wrote {final}.bin/.idx")
    return 0


if __name__ == "__main__":
    code = main()
    if code:
        # After a failure the outputs are already removed; leave without joining concurrent.futures'
        # threads, which a dead worker can leave blocked (Python's normal exit would wait on them).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
