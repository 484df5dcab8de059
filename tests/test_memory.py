"""The memory model (megatron_ext/model/memory.py) against the real thing: the bytes one micro-batch saves
for backward, measured with torch.autograd.graph.saved_tensors_hooks on real ranks (gloo), for no, selective
and full recomputation, at (1,1,1) with the crystal-test and crystal-tiny shapes, at TP 2 with and without
sequence parallelism and on both stages of PP 2; and the weights, gradients and optimizer state, byte for
byte against the tensors a trained step holds, with either optimizer kind."""

import pytest
import torch
from helpers.process_group import run_in_process_group

from megatron_ext.model import memory

RECOMPUTE = {
    "none": [],
    "selective": ["--recompute-activations"],
    "full_uniform_1": [
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "uniform",
        "--recompute-num-layers",
        "1",
    ],
    "full_uniform_2": [
        "--recompute-granularity",
        "full",
        "--recompute-method",
        "uniform",
        "--recompute-num-layers",
        "2",
    ],
    "full_block_2": ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "2"],
}
TOLERANCE = 0.02  # the issue asks for 10%; what is left out (RoPE and norm details) is under 1% here


def _run(flags, world_size):
    from megatron_ext.training.arguments import build_parser, validate

    base = ["--mock-data", "--num-workers", "0", "--micro-batch-size", "1", "--train-iters", "1"]
    return validate(build_parser().parse_args(base + flags), world_size)


def _saved_bytes(trainer) -> int:
    """Bytes of the distinct storages one micro-batch's forward saves for backward on this rank (the
    parameters excluded), through its pipeline stage: the first stage from tokens, a later one from an
    input tensor as the schedule would set."""
    from megatron.core import parallel_state

    chunk = trainer.model[0].module
    crystal, run = trainer.crystal, trainer.run
    s, b = crystal.seq_length, run.layout.micro_batch_size
    generator = torch.Generator().manual_seed(0)  # the same tokens on every rank
    tokens = torch.randint(0, crystal.vocab_size, (b, s), generator=generator)
    positions = torch.arange(s).expand(b, s)
    if not chunk.pre_process:
        rows = s // run.layout.tensor_model_parallel_size if run.layout.sequence_parallel else s
        chunk.set_input_tensor(torch.randn(rows, b, crystal.hidden_size, generator=generator, requires_grad=True))
    parameters = {p.untyped_storage().data_ptr() for p in chunk.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    labels = tokens.roll(-1, dims=1) if parallel_state.is_pipeline_last_stage() else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        chunk(tokens, positions, None, labels=labels)
    return sum(saved.values())


def _check_activations(flag_sets, world_size):
    """On every rank: the measured saved bytes of each configuration within TOLERANCE of the prediction
    for this rank's stage."""
    from megatron.core import parallel_state

    from megatron_ext.training.loop import Trainer
    from megatron_ext.training.memory_report import layout_of

    for flags in flag_sets:
        run = _run(flags, world_size)
        trainer = Trainer(run, torch.device("cpu"))
        stage = parallel_state.get_pipeline_model_parallel_rank()
        predicted = memory.activation_bytes(run.crystal, run.model.padded_vocab, layout_of(run), stage)
        measured = _saved_bytes(trainer)
        assert abs(measured - predicted) <= TOLERANCE * measured, (flags, stage, measured, predicted)


def _check_states(flags, world_size):
    """After one trained step: weights, gradients (the main_grad views) and the optimizer's moments on this
    rank equal the report's bytes; with the distributed optimizer, summed over the data-parallel ranks
    (each holds its bucket-aligned shard, within the padding of 1/DP)."""
    from megatron.core import parallel_state

    from megatron_ext import megatron_workarounds
    from megatron_ext.training.batches import feeds
    from megatron_ext.training.loop import Trainer
    from megatron_ext.training.memory_report import layout_of

    run = _run(flags, world_size)
    trainer = Trainer(run, torch.device("cpu"))
    trainer.set_data(feeds.build(run))
    trainer.train_step(trainer.train_iterators(1))
    layout = layout_of(run)
    report = memory.estimate(
        run.crystal, run.model.padded_vocab, layout, parallel_state.get_pipeline_model_parallel_rank()
    )
    params = [p for chunk in trainer.model for p in chunk.module.parameters()]
    assert sum(p.numel() * p.element_size() for p in params) == report.weights
    assert sum(p.main_grad.numel() * p.main_grad.element_size() for p in params) == report.gradients
    moments = sum(
        t.numel() * t.element_size()
        for inner in megatron_workarounds.inner_optimizers(trainer.optimizer)
        for state in inner.optimizer.state.values()
        for name, t in state.items()
        if name in ("exp_avg", "exp_avg_sq")
    )
    if not layout.distributed_optimizer:
        assert moments == report.optimizer
        return
    total = torch.tensor([moments])
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group())
    assert total.item() == report.parameters * 8  # Adam's two fp32 moments of every parameter, once
    assert abs(moments - report.optimizer) <= 0.05 * report.optimizer, (moments, report.optimizer)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_saved_activations_match_the_prediction_on_one_rank():
    flag_sets = [["--model", m, "--global-batch-size", "1", *r] for m in ("crystal-test", "crystal-tiny")
                 for r in RECOMPUTE.values()]  # fmt: skip
    run_in_process_group(_check_activations, flag_sets, 1, world_size=1, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_saved_activations_match_the_prediction_at_tp2_and_pp2():
    tp2 = ["--model", "crystal-test", "--global-batch-size", "1", "--tensor-model-parallel-size", "2"]
    flag_sets = [tp2, tp2 + ["--sequence-parallel"], tp2 + ["--sequence-parallel", *RECOMPUTE["full_uniform_1"]]]
    run_in_process_group(_check_activations, flag_sets, 2, world_size=2, tp=2, timeout=240)
    pp2 = ["--model", "crystal-test", "--global-batch-size", "2", "--pipeline-model-parallel-size", "2"]
    flag_sets = [pp2, pp2 + RECOMPUTE["selective"], pp2 + RECOMPUTE["full_block_2"]]
    run_in_process_group(_check_activations, flag_sets, 2, world_size=2, pp=2, timeout=240)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_weights_gradients_and_optimizer_bytes_are_the_real_tensors():
    run_in_process_group(_check_states, ["--model", "crystal-test", "--global-batch-size", "2"], 1, world_size=1)
    dp2 = ["--model", "crystal-test", "--global-batch-size", "2", "--use-distributed-optimizer"]
    run_in_process_group(_check_states, dp2, 2, world_size=2)
    tp2 = ["--model", "crystal-test", "--global-batch-size", "2", "--tensor-model-parallel-size", "2"]
    run_in_process_group(_check_states, tp2, 2, world_size=2, tp=2)
    pp2 = ["--model", "crystal-test", "--global-batch-size", "2", "--pipeline-model-parallel-size", "2"]
    run_in_process_group(_check_states, pp2, 2, world_size=2, pp=2)


def test_the_7b_fits_80gb_at_tp1_with_the_distributed_optimizer_only():
    from megatron_ext.model.crystal_config import get_preset
    from megatron_ext.model.crystal_gpt import padded_vocab_size

    crystal = get_preset("crystal-7b")
    padded = padded_vocab_size(crystal.vocab_size, 128)
    plain = memory.estimate(crystal, padded, memory.Layout(dp=64, fused_swiglu=True))
    sharded = memory.estimate(crystal, padded, memory.Layout(dp=64, distributed_optimizer=True, fused_swiglu=True))
    # 6.58B parameters: 2 + 4 + 12 bytes each = 110 GiB without sharding; 2 + 4 + 12/64 with it
    assert plain.parameters == sharded.parameters == crystal.num_parameters() + (padded - crystal.vocab_size) * 4096
    assert plain.weights + plain.gradients + plain.optimizer == 18 * plain.parameters
    assert plain.total > 80 * memory.GIB > sharded.total
