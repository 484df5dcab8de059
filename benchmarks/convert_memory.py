#!/usr/bin/env python
"""Peak resident memory of the release tools on a model of the 7B's width (fewer layers), in one run:
  (0) baseline: a process that imports the tools' modules and nothing more;
  (1) tools/convert_from_hf.py (HF -> dist checkpoint, streaming tensor by tensor);
  (2) tools/convert_to_hf.py --no-verify (dist checkpoint -> HF, streaming tensor by tensor).
Prints each peak, and each tool's peak above the baseline as a multiple of the largest tensor and of the
model's fp32 size (goal for both: a small multiple of the largest tensor, flat as the layers grow).

  python benchmarks/convert_memory.py --layers 2 4 --workdir /tmp/convert-bench
"""

from __future__ import annotations

from megatron_ext.upstream_warnings import silence

silence()  # before Megatron-Core is imported

import argparse
import os
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron_ext.model import get_preset  # noqa: E402
from megatron_ext.release import hf_export, hf_format  # noqa: E402
from megatron_ext.release.safetensors_writer import write_sharded  # noqa: E402

IMPORTS = (
    "import megatron_ext.release.hf_export, megatron_ext.release.dist_checkpoint_reader, megatron_ext.release.parity, "
    "megatron_ext.release.hf_import"
)


# Runs a script or code in a child and reports the child's own high-water mark (VmHWM belongs to the
# address space made at exec; ru_maxrss would also count the pages inherited from this process at fork).
_WRAPPER = """
import atexit, runpy, sys
def report():
    hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))
    sys.stderr.write('PEAK_KIB ' + hwm.split()[1] + '\\n')
atexit.register(report)
if sys.argv[1] == '-c':
    exec(sys.argv[2])
else:
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
"""


def peak_rss(args: list[str]) -> tuple[int, float]:
    """(peak resident bytes, seconds) of python running args (a script and its flags, or -c CODE)."""
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    kib = int(proc.stderr.rsplit("PEAK_KIB ", 1)[1].split()[0])
    return kib * 1024, time.time() - start


def write_random_hf(directory: str, cfg) -> tuple[int, int]:
    """A CrystalCoder directory of random fp32 weights, generated one tensor at a time."""
    os.makedirs(directory)
    hf_export.write_metadata_files(cfg, directory)
    names = hf_format.reference_names(cfg)
    entries = [(hf_format.HF_PREFIX + n, hf_format.hf_shape(n, cfg)) for n in names]
    tensors = ((name, torch.randn(shape) * 0.02) for name, shape in entries)
    index = write_sharded(directory, entries, tensors, torch.float32, 5 * 2**30)
    largest = max(torch.Size(shape).numel() for _, shape in entries) * 4
    return index["metadata"]["total_size"], largest


def measure(layers: int, workdir: str, base: int) -> None:
    cfg = get_preset("crystal-7b").replace(num_layers=layers)
    shutil.rmtree(workdir, ignore_errors=True)
    hf_in, ckpt, hf_out = (os.path.join(workdir, d) for d in ("hf_in", "ckpt", "hf_out"))
    model_bytes, largest = write_random_hf(hf_in, cfg)
    mib = 2**20
    print(
        f"model: 7B width, {layers} layers, {cfg.num_parameters():,} parameters, "
        f"{model_bytes / mib:,.0f} MiB fp32; "
        f"largest tensor {largest / mib:,.0f} MiB"
    )
    imported, t_import = peak_rss(["tools/convert_from_hf.py", "--input", hf_in, "--save", ckpt])
    exported, t_export = peak_rss(
        ["tools/convert_to_hf.py", "--load", ckpt, "--output", hf_out, "--dtype", "fp32", "--no-verify"]
    )
    print(f"(0) baseline (imports only)       peak {base / mib:8,.0f} MiB")
    for label, peak, seconds in (
        ("(1) convert_from_hf.py (streaming)", imported, t_import),
        ("(2) convert_to_hf.py (streaming)", exported, t_export),
    ):
        above = peak - base
        print(
            f"{label:34s} peak {peak / mib:8,.0f} MiB ({seconds:.1f}s): above baseline {above / mib:,.0f} MiB = "
            f"{above / largest:.2f} x largest tensor = {above / model_bytes:.2f} x model"
        )
    shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--workdir", default="/tmp/convert-bench")
    args = p.parse_args()
    base, _ = peak_rss(["-c", IMPORTS])
    for layers in args.layers:
        measure(layers, args.workdir, base)


if __name__ == "__main__":
    main()
