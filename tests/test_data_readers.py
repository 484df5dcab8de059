"""Only tensor rank 0 of the first and the last pipeline stage reads data; its tensor group receives each
micro-batch by broadcast; middle stages hold no data (training/readers.py). The whole runs' side
(equal data hashes and figures at TP2 x PP2 x DP2) is in test_phases.py."""

from types import SimpleNamespace

import pytest
import torch
from helpers.process_group import run_in_process_group

pytestmark = pytest.mark.launch  # every test here starts processes


def _batches(first: int) -> list[dict]:
    """Micro-batches of the kinds a feed yields: int64 tokens, float masks, per-sample ids, a bool."""
    g = torch.Generator().manual_seed(first)
    return [
        {
            "tokens": torch.randint(0, 1000, (2, 5), generator=g),
            "loss_mask": torch.rand(2, 5, generator=g),
            "source_id": torch.tensor([i, i + 1]),
            "slot": torch.tensor([i]).to(torch.int32),
            "padding": torch.tensor([True, i % 2 == 0]),
        }
        for i in range(3)
    ]


def _check_readers():
    from megatron.core import parallel_state

    from megatron_ext.data.phases_config import PhasesConfigError
    from megatron_ext.training.batches import readers

    rank = torch.distributed.get_rank()
    tp = parallel_state.get_tensor_model_parallel_rank()
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    # Ranks are ordered tensor rank first: with TP 2 and PP 3, the readers are ranks 0 (first stage) and 4 (last).
    assert readers.is_reader() == (rank in (0, 4))

    stage = parallel_state.get_pipeline_model_parallel_rank()
    reads = []

    def read():
        reads.append(rank)
        return iter(_batches(stage))

    # A model chunk of this stage, and one that neither embeds nor scores (a middle virtual stage).
    middle = SimpleNamespace(pre_process=False, post_process=False)
    chunks = [SimpleNamespace(pre_process=first, post_process=last), middle]
    its = readers.chunk_iterators(chunks, read, torch.device("cpu"))
    assert its[1] is None
    if not (first or last):
        assert its[0] is None and not reads  # a middle stage: no iterator, nothing read
    else:
        assert reads == ([rank] if tp == 0 else [])  # only tensor rank 0 read
        for want in _batches(stage):
            got = next(its[0])
            assert list(got) == list(want)
            for key in want:
                assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key

    # Built on readers only; a failure on a reader fails every rank, a user's error as the same error.
    assert readers.build_on_readers(lambda: "built") == ("built" if rank in (0, 4) else None)

    def bad_file():
        raise PhasesConfigError("phases.yaml: sources.code.prefixes[0]: no such file")

    with pytest.raises(PhasesConfigError, match=r"^phases\.yaml: sources\.code\.prefixes\[0\]: no such file$"):
        readers.build_on_readers(bad_file)

    def bug():
        if rank == 4:
            raise KeyError("lengths")
        return "built"

    expected = (KeyError, "lengths") if rank == 4 else (RuntimeError, "failed on rank 4: KeyError: 'lengths'")
    with pytest.raises(expected[0], match=expected[1]):
        readers.build_on_readers(bug)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tensor_rank_0_of_the_first_and_last_stage_reads_and_the_group_receives():
    run_in_process_group(_check_readers, world_size=6, tp=2, pp=3, timeout=150)


def test_process_memory_sees_a_childs_own_pages():
    """The workers' report reads /proc: a child that writes 64 MB of its own is found among this process's
    children and holds that much unshared (and not much more: an interpreter's own pages)."""
    import subprocess
    import sys

    from megatron_ext.process_memory import child_processes, unshared_memory_mb

    code = "import sys; b = bytearray(64 << 20); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True)"
    code += "; sys.stdin.read()"
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        assert child.pid in child_processes()
        assert 64 <= unshared_memory_mb(child.pid) < 64 + 64  # its buffer, and an interpreter's own pages
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert child.pid not in child_processes()
