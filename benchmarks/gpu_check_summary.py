#!/usr/bin/env python
"""The summary table of benchmarks/gpu_check.sh: each figure taken from its step's log in OUT_DIR.

python benchmarks/gpu_check_summary.py OUT_DIR [STEP_STATUS ...]
"""

from __future__ import annotations

import re
import sys

THROUGHPUT = re.compile(r"^(\w+): step time ([\d.]+) ms \| tokens/s/GPU ([\d,]+) \| TFLOP/s/GPU ([\d.]+)(.*)$", re.M)
MEMORY = re.compile(r"peak memory allocated: ([^|]+) \| predicted \(the start-up report\): ([\d.]+ \w+)")


def read(out: str, name: str) -> str:
    try:
        return open(f"{out}/{name}.log").read()
    except OSError:
        return ""


def rows(out: str) -> list[tuple[str, str]]:
    table = [("device", read(out, "device").strip().removeprefix("device: ") or "see device.log")]
    tests = re.findall(r"^(\d+ passed.*)$", read(out, "kernel_tests"), re.M)
    table.append(("kernel tests on CUDA", tests[-1] if tests else "see kernel_tests.log"))
    table += [("kernels", line.strip()) for line in read(out, "kernels").splitlines() if re.search(r"\dx\b", line)]
    for name in ("throughput_fp8", "throughput_recompute"):
        text = read(out, name)
        recompute = ", full recomputation" if name.endswith("recompute") else ""
        for run, ms, tokens, tflops, rest in THROUGHPUT.findall(text):
            table.append((f"7B width, 4 layers, {run}{recompute}", f"{ms} ms a step, {tokens} tokens/s, {tflops} "
                          f"TFLOP/s{rest}"))  # fmt: skip
        for (peak, predicted), (run, *_) in zip(MEMORY.findall(text), THROUGHPUT.findall(text)):
            table.append((f"peak memory, {run}{recompute}", f"{peak.strip()} measured, {predicted} predicted"))
        ratio = re.search(r"^fp8 / \w+ tokens/s: .*$", text, re.M)
        if ratio:
            table.append(("fp8 against bf16", ratio.group(0)))
    for line in read(out, "checkpoint_io").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 16 and cells[0].isdigit():
            table.append((f"checkpoint save, hidden {cells[0]}, {cells[1]} optimizer, {cells[3]} MB",
                          f"synchronous blocks {cells[6]} s; asynchronous blocks {cells[7]} s, complete in "
                          f"{cells[8]} s; hashing {cells[15]} s; load {cells[10]} s verified, {cells[14]} s "
                          "not"))  # fmt: skip
    return table


def main(argv: list[str]) -> int:
    out, steps = argv[0], argv[1:]
    print("\n| check | result |\n|---|---|")
    for name, value in rows(out) + [("step", s) for s in steps]:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
