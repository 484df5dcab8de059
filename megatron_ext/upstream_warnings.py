"""Silence the known warnings of Megatron-Core 0.16.1 and torch that tell this project's users nothing.

On CPU, Megatron-Core warns at import that Transformer Engine and Apex are missing (five warnings, ten
lines) and torch repeats deprecation notices that Megatron-Core's own calls trigger; a user's one-line
error ended up under them. The start-up report already names the path taken (kernel path, optional
accelerators), so each of these is dropped, matched by its message and the module it is attributed to:
any other warning, from these modules too, still shows. Each entry point calls silence() before it
imports Megatron-Core (the warnings are raised at import); it imports nothing heavy, so that a tool's
input errors stay fast. The CPU layer (cpu_compat.activate) drops the GPU-only advice on its own.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message prefix as a regular expression, category, module the warning is attributed to)
KNOWN = (
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core\."),
    (r"Apex is not installed", UserWarning, r"megatron\.core\."),
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config"),
    (r"`load_state_dict` is deprecated", FutureWarning, r"megatron\.core\.dist_checkpointing\."),
    # torch's deprecation decorator attributes these to its own logging wrapper; Megatron-Core calls them.
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning, r"torch\.distributed\.c10d_logger"),
    (r"`torch\.distributed\.reduce_scatter_tensor` is deprecated", FutureWarning, r"torch\.distributed\.c10d_logger"),
    # Megatron-Core's DDP reads .grad of a view; the CPU layer forwards every torch call, so it is named.
    (
        r"The \.grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        UserWarning,
        r"megatron_ext\.cpu_compat",
    ),
    (
        r"Please use DTensor instead and we are deprecating ShardedTensor",
        FutureWarning,
        r"(megatron_ext\.cpu_compat|megatron\.core\.)",
    ),
)
# (logger, the start of the messages dropped from it as a regular expression)
KNOWN_LOG_LINES = (
    # Megatron-Core's GPTDataset logs this for every mock dataset (which has nothing to cache).
    ("megatron.core.datasets.gpt_dataset", r"Unable to save MockGPTDataset indexes"),
    # Its checkpoint writer logs each failed write process's error on every rank; the save's failure is
    # reported once per job, with its cause (checkpointing.CheckpointSaver).
    ("megatron.core.dist_checkpointing.strategies.filesystem_async", r"Local process \d+ encountered an error: "),
)


class _DropMessages(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_installed = False


def silence() -> None:
    global _installed
    if _installed:
        return
    for message, category, module in KNOWN:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for logger, pattern in KNOWN_LOG_LINES:
        logging.getLogger(logger).addFilter(_DropMessages(pattern))
    _installed = True
