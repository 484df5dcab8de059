"""The sources' indices on disk (data/index_cache.py): the sample stream is the one of the code before the
cache (recorded digests for 13 synthetic sources; the demo corpus against the pinned revision's code),
built once and memory-mapped, rebuilt when a file changes, safe with concurrent builders, and an
unwritable cache is one line."""

import io
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
from helpers.distributed_run import REPO
from helpers.stream_record import stream_digest, synthetic_sources

from megatron_ext.data.phases_config import SourceSpec
from megatron_ext.data.source_stream import SourceStream

PINNED = "f256e11"  # the last revision that built every index in each process's memory
DIGESTS = json.loads((REPO / "tests" / "data" / "stream_digests.json").read_text())


def _synthetic_streams(prefixes: dict, cache_dir):
    """The recording's settings: every third source over two files, every fourth a 50% subset."""
    out = {}
    for i, (name, prefix) in enumerate(prefixes.items()):
        files = (prefix,) if i % 3 else (prefix, prefixes[f"source{(i + 1) % 13:02d}"])
        spec = SourceSpec(name, files, subset=0.5 if i % 4 == 1 else 1.0)
        for split in ("train", "valid"):
            out[f"{name}/{split}"] = SourceStream(spec, 16, 1234, 0.1, split, cache_dir=cache_dir)
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return synthetic_sources(str(tmp_path_factory.mktemp("sources")))


def test_13_sources_give_the_recorded_stream_in_memory_cold_and_warm(synthetic, tmp_path):
    for cache in (None, tmp_path, tmp_path):  # in memory; built; found
        streams = _synthetic_streams(synthetic, cache)
        assert {k: stream_digest(s) for k, s in streams.items()} == DIGESTS["synthetic13"], cache
    stream = streams["source03/train"]
    assert isinstance(stream.doc_ids.base, np.memmap) and stream.doc_ids.dtype == np.int32  # mapped; smallest dtype
    assert all(isinstance(a.base, np.memmap) for a in stream._epoch(0))
    assert len(list(tmp_path.iterdir())) == 13  # one directory per source (and identity)


@pytest.mark.launch
def test_the_demo_stream_is_the_pinned_revisions(tmp_path):
    """The demo corpus is built on this machine: compare with the code of PINNED run here, not a recording."""
    source = subprocess.run(
        ["git", "show", f"{PINNED}:megatron_ext/data/source_stream.py"], cwd=REPO, capture_output=True, text=True
    )
    if source.returncode != 0:
        pytest.skip(f"this checkout has no history to read revision {PINNED} from (a source archive?)")
    pinned = types.ModuleType("pinned_source_stream")
    sys.modules[pinned.__name__] = pinned  # its dataclasses look their module up
    try:
        exec(compile(source.stdout, "pinned_source_stream.py", "exec"), pinned.__dict__)
    finally:
        del sys.modules[pinned.__name__]
    for name in ("text", "code"):
        spec = SourceSpec(name, (str(REPO / "data" / "demo" / f"{name}_text_document"),))
        for split in ("train", "valid"):
            want = stream_digest(pinned.SourceStream(spec, 256, 1234, 0.02, split))
            assert stream_digest(SourceStream(spec, 256, 1234, 0.02, split, cache_dir=tmp_path)) == want
        # Nothing held out (Crystal's recipe): the pool is every document, taken without its permutation.
        want = stream_digest(pinned.SourceStream(spec, 256, 1234, 0.0))
        assert stream_digest(SourceStream(spec, 256, 1234, 0.0, cache_dir=tmp_path)) == want


def test_a_rewritten_file_gets_new_indices(synthetic, tmp_path):
    spec = SourceSpec("source00", (synthetic["source00"],))
    first = SourceStream(spec, 16, 1, cache_dir=tmp_path).cache.dir
    assert SourceStream(spec, 16, 1, cache_dir=tmp_path).cache.dir == first
    os.utime(synthetic["source00"] + ".idx", ns=(1, 1))  # as a re-preprocessed file of the same shape
    assert SourceStream(spec, 16, 1, cache_dir=tmp_path).cache.dir != first
    assert SourceStream(spec, 32, 1, cache_dir=tmp_path).cache.dir != first  # another sequence length


def _build_in_process(args):
    prefix, cache = args
    stream = SourceStream(SourceSpec("racer", (prefix,)), 16, 5, 0.1, cache_dir=cache)
    stream._epoch(1)
    return stream_digest(stream)


@pytest.mark.launch
def test_concurrent_builders_agree_and_leave_no_partial_files(synthetic, tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        digests = pool.map(_build_in_process, [(synthetic["source05"], str(tmp_path))] * 4)
    assert len(set(digests)) == 1 and digests[0] == _build_in_process((synthetic["source05"], None))
    (directory,) = list(tmp_path.iterdir())
    assert not [f for f in os.listdir(directory) if ".tmp" in f]


def _pickled_arrays(blob: bytes) -> int:
    """How many numpy arrays a pickle rebuilds (each by numpy's array reconstructor)."""
    made = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found = super().find_class(module, name)
            if name != "_reconstruct":
                return found

            def reconstruct(*args):
                made.append(args)
                return found(*args)

            return reconstruct

    Recorder(io.BytesIO(blob)).load()
    return len(made)


@pytest.mark.launch
def test_a_stream_pickled_for_a_spawned_worker_maps_its_files_again(synthetic, tmp_path):
    """A DataLoader worker started by spawn or forkserver (Python 3.14's default) gets the stream through a
    pickle: with a cache it carries no index and no token (they are mapped again there); in memory it
    carries the indices it cannot find elsewhere."""
    spec = SourceSpec("source03", (synthetic["source03"], synthetic["source04"]))
    cached, in_memory = (SourceStream(spec, 16, 1234, 0.1, cache_dir=c) for c in (tmp_path, None))
    for stream in (cached, in_memory):
        stream.sample(0)  # an epoch open: not pickled either
    blob, full = pickle.dumps(cached), pickle.dumps(in_memory)
    assert _pickled_arrays(blob) == 0 and _pickled_arrays(full) == 2  # the in-memory pool and its lengths
    again = pickle.loads(blob)
    assert isinstance(again.doc_ids.base, np.memmap) and isinstance(again._tokens[0].base, np.memmap)
    assert stream_digest(again) == stream_digest(cached) == stream_digest(pickle.loads(full))


def test_a_filesystem_without_flock_still_builds_and_maps(synthetic, tmp_path, monkeypatch):
    """Lustre mounted without -o flock answers flock with ENOSYS: the build goes on unlocked (a concurrent
    builder would write the same bytes under another temporary name); another OSError is not swallowed."""
    import errno

    from megatron_ext.data import index_cache

    def no_flock(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(index_cache.fcntl, "flock", no_flock)
    spec = SourceSpec("source05", (synthetic["source05"],))
    assert stream_digest(SourceStream(spec, 16, 5, 0.1, cache_dir=tmp_path)) == stream_digest(
        SourceStream(spec, 16, 5, 0.1)
    )
    assert isinstance(SourceStream(spec, 16, 5, 0.1, cache_dir=tmp_path).doc_ids.base, np.memmap)

    def broken(fd, operation):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(index_cache.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"):
        SourceStream(spec, 16, 6, 0.1, cache_dir=tmp_path)


def test_long_builds_say_what_they_build_and_found_indices_say_nothing(synthetic, tmp_path, capsys, monkeypatch):
    """A line before and after each build over ANNOUNCED_DOCUMENTS documents (lowered here to this source's
    size): the pool, its lengths and each epoch's orders; nothing once they are on disk, nothing below it."""
    from megatron_ext.data import index_cache

    spec = SourceSpec("source00", (synthetic["source00"],))
    documents = SourceStream(spec, 16, 1).doc_ids.size
    monkeypatch.setattr(index_cache, "ANNOUNCED_DOCUMENTS", documents)
    SourceStream(spec, 16, 1, cache_dir=tmp_path).sample(0)
    lines = capsys.readouterr().out.splitlines()
    built = [line.split(" in ")[0] for line in lines if line.startswith("data: built ")]
    assert built == ["data: built train_documents", "data: built train_lengths", "data: built train_epoch0 orders"]
    assert (
        lines[0] == f"data: building train_documents ({documents:,} documents) in {tmp_path}/" + os.listdir(tmp_path)[0]
    )
    SourceStream(spec, 16, 1, cache_dir=tmp_path).sample(0)  # found: silent
    SourceStream(spec, 16, 2, cache_dir=tmp_path).sample(0)  # another seed: new indices, three builds
    monkeypatch.setattr(index_cache, "ANNOUNCED_DOCUMENTS", documents + 1)
    SourceStream(spec, 16, 3, cache_dir=tmp_path).sample(0)  # below the threshold: silent
    assert capsys.readouterr().out.count("data: building") == 3


@pytest.mark.launch
def test_an_unwritable_cache_is_one_line_before_any_work(tmp_path):
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    phases = REPO / "tests" / "data" / "phases_small.yaml"
    proc = subprocess.run(
        [sys.executable, "pretrain_crystal.py", "--model", "crystal-test", "--phases", str(phases),
         "--tokenizer-model", str(REPO / "data" / "demo" / "crystal_demo.model"), "--data-cache-path", str(blocked)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"pretrain_crystal.py: error: --data-cache-path {blocked}: cannot write the data indices to "
        f"{blocked}/phases (Not a directory)"
    ]


@pytest.mark.launch
def test_build_data_cache_prebuilds_what_the_run_reads(tmp_path):
    sys.path.insert(0, str(REPO / "tools"))
    import build_data_cache

    argv = ["--phases", str(REPO / "examples" / "phases" / "demo.yaml"), "--seq-length", "256"]
    argv += ["--data-cache-path", str(tmp_path)]
    assert build_data_cache.main(argv) == 0
    built = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "phases").rglob("*.npy")}
    wanted = {f"{split}_epoch0_{part}.npy" for split in ("train", "valid") for part in ("documents", "ends", "samples")}
    assert {n for n in built if "_epoch" in n} == wanted  # the demo reads under one epoch of each source
    assert build_data_cache.main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "phases").rglob("*.npy")} == built  # nothing rebuilt
