"""Files that appear whole or not at all: written under a temporary name beside the target, then renamed
(a rename within a directory is atomic on POSIX filesystems), so a reader or a killed job never sees half."""

from __future__ import annotations

import os


def write_text_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"  # per process: two writers of one file do not share a temporary name
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
