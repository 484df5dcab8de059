"""The Crystal model on Megatron-Core against the released architecture and an independent reference."""

import math

import pytest
import torch
from helpers.process_group import run_in_process_group

from megatron_ext.model import get_preset


def test_preset_7b_matches_release():
    c = get_preset("crystal-7b")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads, c.ffn_hidden_size) == (4096, 32, 32, 10922)
    assert (c.vocab_size, c.seq_length, c.rotary_dim, c.rotary_base) == (32032, 2048, 32, 10000)
    # muP figures from the release: logits x 2.22 x 0.0625, attention 1/head_dim, init stds.
    assert c.output_multiplier == pytest.approx(0.13875)
    assert c.softmax_scale == pytest.approx(1 / 128)
    assert c.mup_embeddings_scale == 14.6
    assert c.embedding_init_std == pytest.approx(0.073)
    assert c.init_std == pytest.approx(0.01825)
    assert c.output_layer_init_std == pytest.approx(0.01825 / 8)


def _count_7b_parameters(result_queue):
    from megatron_ext.model.crystal_gpt import build_model, transformer_config

    c = get_preset("crystal-7b")
    config = transformer_config(c, use_cpu_initialization=True, perform_initialization=False)
    with torch.device("meta"):  # shapes only: nothing of the 7B is allocated
        (model,) = build_model(c, config, padded_vocab_size=c.vocab_size)
    unique = {id(p): p.numel() for p in model.parameters()}
    result_queue.put(sum(unique.values()))


@pytest.mark.launch
def test_crystal_7b_parameter_count():
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    run_in_process_group(_count_7b_parameters, queue)
    count = queue.get()
    # The released checkpoint's unique parameters (crystal-recipe.md), counted on the Megatron model.
    assert count == 6_575_278_720
    assert get_preset("crystal-7b").num_parameters() == count


def _compare_with_reference(sequence_parallel: bool):
    from megatron.core import parallel_state

    from megatron_ext.model.crystal_gpt import ParallelLayout, build_model, padded_vocab_size, transformer_config
    from megatron_ext.model.reference import CrystalReference
    from megatron_ext.release.weight_mapping import load_reference_weights

    c = get_preset("crystal-test")
    torch.manual_seed(0)  # the same reference weights and inputs on every rank
    reference = CrystalReference(c)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            # Non-trivial norms and biases, so that a misplaced bias or gain shows up.
            p.copy_(
                torch.randn_like(p) * (0.5 if p.dim() == 2 else 0.2)
                + (1.0 if "ln" in name and "weight" in name else 0.0)
            )
    ids = torch.randint(0, c.vocab_size, (2, c.seq_length))
    expected = reference(ids)

    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = transformer_config(
        c,
        ParallelLayout(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel),
        use_cpu_initialization=True,
    )
    padded = padded_vocab_size(c.vocab_size, 128)
    (model,) = build_model(c, config, padded)
    load_reference_weights([model], reference.state_dict(), c, padded)
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    positions = torch.arange(c.seq_length).expand(2, -1)
    logits = gather_from_tensor_model_parallel_region(model(ids, positions, None))[..., : c.vocab_size]
    error = (logits - expected).abs().max().item()
    assert error < 1e-5, f"max |delta logits| {error} (logit scale {expected.abs().max().item():.3f})"
    assert expected.abs().max() > 0.1  # the comparison is not between near-zero tensors


@pytest.mark.launch
@pytest.mark.timeout(180)
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_megatron_tp2_matches_reference_logits(sequence_parallel):
    run_in_process_group(_compare_with_reference, sequence_parallel, world_size=2, tp=2)


def _check_init(hidden_size=None):
    from megatron_ext.model.crystal_gpt import build_model, transformer_config
    from megatron_ext.training.arguments import build_parser, validate

    argv = ["--model", "crystal-tiny", "--mock-data", "--vocab-size", "4096"]
    c = validate(
        build_parser().parse_args(argv + (["--hidden-size", str(hidden_size)] if hidden_size else [])), 1
    ).crystal
    if hidden_size:  # muP at twice the base width: half the width scale, the hidden std / sqrt(2)
        assert (c.mup_width_scale, c.output_multiplier) == (0.5, 2.22 * 0.5)
        assert c.init_std == pytest.approx(0.073 * 0.5**0.5) and c.embedding_init_std == 0.073
    (model,) = build_model(c, transformer_config(c, use_cpu_initialization=True), c.vocab_size)
    params = dict(model.named_parameters())
    expected = {
        "embedding.word_embeddings.weight": c.embedding_init_std,
        "decoder.layers.0.self_attention.linear_qkv.weight": c.init_std,
        "decoder.layers.0.mlp.linear_fc1.weight": c.init_std,
        "decoder.layers.0.self_attention.linear_proj.weight": c.output_layer_init_std,
        "decoder.layers.0.mlp.linear_fc2.weight": c.output_layer_init_std,
    }
    for name, std in expected.items():
        w = params[name].detach()
        # Truncated at 2 sigma: nothing beyond, and the std of the truncated normal is 0.88 sigma.
        assert w.abs().max() <= 2 * std + 1e-7, name
        assert w.std().item() == pytest.approx(0.8796 * std, rel=0.05), name
    assert torch.all(params["decoder.layers.0.self_attention.linear_qkv.bias"] == 0)
    assert torch.all(params["decoder.layers.0.input_layernorm.weight"] == 1)


@pytest.mark.launch
@pytest.mark.parametrize("hidden_size", [None, 512], ids=["preset", "twice_the_width"])
def test_mup_truncated_normal_init(hidden_size):
    run_in_process_group(_check_init, hidden_size)


def _check_param_groups(scale_bias_lr: bool):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_ext.model.crystal_gpt import build_model, transformer_config
    from megatron_ext.training.arguments import build_parser, validate
    from megatron_ext.training.optimizer import build_optimizer

    argv = ["--model", "crystal-tiny", "--mock-data", "--lr", "0.012", "--min-lr", "0.0012"]
    run = validate(build_parser().parse_args(argv + (["--mup-scale-bias-lr"] if scale_bias_lr else [])), world_size=1)
    c = run.crystal.replace(mup_width_scale=0.0625)
    run = run.replace(model={"crystal": c})
    config = transformer_config(c, use_cpu_initialization=True)
    (chunk,) = build_model(c, config, c.vocab_size)
    model = [DistributedDataParallel(config, DistributedDataParallelConfig(), chunk)]
    optimizer, _ = build_optimizer(run, model)
    group_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            group_of[id(p)] = group
    names = dict(chunk.named_parameters())

    def check(name, lr, wd_mult):
        g = group_of[id(names[name])]
        assert g["max_lr"] == pytest.approx(lr) and g["min_lr"] == pytest.approx(lr / 10), name
        assert g["wd_mult"] == wd_mult, name

    for matrix in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        check(f"decoder.layers.1.{matrix}.weight", 0.012 * 0.0625, 1.0)
        check(f"decoder.layers.1.{matrix}.bias", 0.012 * (0.0625 if scale_bias_lr else 1), 0.0)
    check("embedding.word_embeddings.weight", 0.012, 1.0)
    from megatron_ext.training.optimizer import group_rates_line

    line = group_rates_line(run)  # what the start-up prints, the groups' own rates
    bias = 0.012 * (0.0625 if scale_bias_lr else 1)
    assert f"hidden matrices {0.012 * 0.0625:.4g} -> {0.0012 * 0.0625:.4g}" in line, line
    assert f"embedding {0.012:.4g} -> {0.0012:.4g}; biases and norms {bias:.4g} -> {bias / 10:.4g}" in line, line
    check("decoder.layers.0.input_layernorm.weight", 0.012 * (0.0625 if scale_bias_lr else 1), 0.0)
    check("decoder.final_layernorm.bias", 0.012 * (0.0625 if scale_bias_lr else 1), 0.0)


@pytest.mark.launch
@pytest.mark.parametrize("scale_bias_lr", [False, True], ids=["release", "scale_bias_lr"])
def test_mup_parameter_groups(scale_bias_lr):
    run_in_process_group(_check_param_groups, scale_bias_lr)


def test_reference_rotary_is_interleaved_partial():
    """Rotate-every-two on the first rotary_dim channels; the rest pass through; norms preserved."""
    from megatron_ext.model.reference import apply_interleaved_rotary, rotary_angles

    x = torch.randn(1, 1, 5, 16, dtype=torch.float64)
    angles = rotary_angles(5, 4, 10000)
    y = apply_interleaved_rotary(x, angles, 4)
    assert torch.equal(y[..., 4:], x[..., 4:])
    pair = lambda t, i: t[0, 0, :, 2 * i : 2 * i + 2]  # noqa: E731
    for i in range(2):
        theta = angles[:, i]
        expected0 = pair(x, i)[:, 0] * theta.cos() - pair(x, i)[:, 1] * theta.sin()
        assert torch.allclose(pair(y, i)[:, 0], expected0)
        assert torch.allclose(pair(y, i).norm(dim=-1), pair(x, i).norm(dim=-1))
    assert math.isclose(angles[3, 1].item(), 3 / 10000 ** (2 / 4))
