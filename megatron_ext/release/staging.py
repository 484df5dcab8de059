"""Output directories that appear only when complete: built under a hidden sibling, renamed at the end."""

from __future__ import annotations

import contextlib
import os
import shutil


class OutputExistsError(FileExistsError):
    pass


def check_output(path: str, flag: str) -> None:
    """Refuse a non-empty target and an unwritable parent, before any work."""
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise OutputExistsError(f"{flag} {path} already exists and is not empty")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise OutputExistsError(f"{flag} {path}: cannot write in {parent}")


@contextlib.contextmanager
def staged_directory(path: str):
    """Yield a fresh hidden directory beside path; on success it becomes path, on any error it is removed.
    A killed process leaves only the hidden '.NAME.partial-PID' directory, never a complete-looking one."""
    path = os.path.abspath(path)
    staging = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    try:
        yield staging
        if os.path.isdir(path):
            os.rmdir(path)  # an empty target (checked by check_output) makes way
        os.rename(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
