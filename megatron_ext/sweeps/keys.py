"""The one check of a YAML section's keys the sweep files share: unknown and missing keys, one line each."""

from __future__ import annotations


def check_keys(raw: dict, known: set[str], required: tuple[str, ...], where: str, error: type[Exception]) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise error(f"{where}: unknown key {unknown[0]!r}; known: {', '.join(sorted(known))}")
    for key in required:
        if key not in raw:
            raise error(f"{where}: missing key {key!r}")
