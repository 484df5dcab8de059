"""Indices of the sources (document pools, each epoch's orders) on disk: built once, by whichever process
needs them first, and memory-mapped by every rank, DataLoader worker and relaunch after it, so that a
source of 10^9 documents costs its index memory once per node (shared page cache), not once per process.

A cache directory holds one subdirectory per source and identity (the files' shapes, seed, subset,
validation fraction, sequence length, layout version): a change to any of them names another directory,
so stale indices are never reused. Files are written to a temporary name and renamed (a reader never sees
a partial one); an exclusive lock makes the other processes wait for a build instead of repeating it.
Builds are deterministic, so where the lock does not reach (a filesystem without flock) the worst case is
the same file written twice. This replaces a barrier, which DataLoader workers and an epoch built ahead
in the background could not take part in.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import threading
import time

import numpy as np

_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}  # what flock raises where a filesystem lacks it
ANNOUNCED_DOCUMENTS = 5_000_000  # builds over this many documents print a line before and after


class IndexCacheError(RuntimeError):
    """A cache directory that cannot be used; the message is one line naming it."""


def make_writable_directory(path: str) -> None:
    """Create path and write a probe file in it: an OSError says why indices cannot be cached there."""
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".probe{os.getpid()}.{threading.get_ident()}")
    with open(probe, "w"):
        pass
    os.remove(probe)


def check_writable_directory(path: str) -> None:
    """Whether path is, or can be made, a directory this process writes in, creating nothing (a refused
    start must leave no directory behind): its nearest existing ancestor is a directory it may write to.
    An OSError says why not."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), existing)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), existing)


def smallest_index_type(count: int):
    return np.int32 if count < 2**31 else np.int64


class IndexCache:
    def __init__(self, root: str, identity: dict):
        digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.dir = os.path.join(root, f"{identity['source']}-{digest}")
        try:
            make_writable_directory(self.dir)
        except OSError as e:
            raise IndexCacheError(
                f"--data-cache-path {root}: cannot write the data indices there ({e.strerror or e}); "
                "give a writable directory"
            ) from None
        if not os.path.isfile(os.path.join(self.dir, "identity.json")):  # for people: what these indices are
            self._atomic(os.path.join(self.dir, "identity.json"), lambda f: f.write(json.dumps(identity).encode()))

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name + ".npy")

    def has(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def load(self, name: str) -> np.ndarray:
        """Memory-mapped, as a plain array view (np.memmap's own indexing is slow per element)."""
        return np.load(self._path(name), mmap_mode="r").view(np.ndarray)

    def write(self, name: str, array: np.ndarray) -> None:
        self._atomic(self._path(name), lambda f: np.save(f, np.ascontiguousarray(array)))

    @staticmethod
    def _atomic(path: str, write) -> None:
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"
        try:
            with open(tmp, "wb") as f:
                write(f)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    @contextlib.contextmanager
    def lock(self):
        """Exclusive among processes where the filesystem supports flock; where it does not (Lustre
        mounted without -o flock, NFS without a lock manager) builders may overlap, which costs time,
        not correctness (deterministic builds, atomic renames)."""
        fd = os.open(os.path.join(self.dir, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
        locked = False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                locked = True
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
            yield
        finally:
            if locked:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def announced(self, what: str, documents: int):
        """A line before and after a build over many documents (10^9 take minutes), so that a job's log
        says what it waits on; smaller builds take under a second and say nothing."""
        loud = documents >= ANNOUNCED_DOCUMENTS
        # One write per line (end=""): sources building side by side in threads must not interleave them.
        if loud:
            print(f"data: building {what} ({documents:,} documents) in {self.dir}\n", end="", flush=True)
        started = time.perf_counter()
        yield
        if loud:
            print(f"data: built {what} in {time.perf_counter() - started:.1f} s\n", end="", flush=True)

    def array(self, name: str, build, documents: int = 0) -> np.ndarray:
        """The cached array, built (under the lock) if no process has yet."""
        if not self.has(name):
            with self.lock():
                if not self.has(name):
                    with self.announced(name, documents):
                        array = build()
                    self.write(name, array)
        return self.load(name)

    def meta(self, name: str, build) -> dict:
        path = os.path.join(self.dir, name + ".json")
        if not os.path.isfile(path):
            with self.lock():
                if not os.path.isfile(path):
                    text = json.dumps(build())
                    self._atomic(path, lambda f: f.write(text.encode()))
        with open(path) as f:
            return json.load(f)
