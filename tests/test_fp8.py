"""FP8: the scaling rules, the FP8 linear against its dequantised reference and against fp32, tiny
training runs in FP8 (torch._scaled_mm's CPU kernel, --fp8-cpu-emulation) against fp32 and across a
resume, and the kernel-path selection for every machine kind with the probes substituted.

Bounds, stated once: e4m3 keeps 3 mantissa bits (a rounding error of at most 2^-4 relative per
element), e5m2 keeps 2 (2^-3). A dot product of K terms with independent rounding errors has a relative
error of about 2^-4 / sqrt(3) ~ 3.6% at worst-case alignment, far less on average; the tests allow 5%
(relative Frobenius norm) for the e4m3 forward and 10% for the gradients, which pass through e5m2.
"""

import pytest
import torch
from helpers.distributed_run import TINY_RUN, read_metrics, train
from helpers.process_group import run_in_process_group

from megatron_ext.kernels import fp8_scaling
from megatron_ext.kernels.fp8_linear import FP8LinearState, _FP8Linear, dequantized_mm, scaled_mm
from megatron_ext.kernels.fp8_scaling import E4M3, E5M2, FP8Recipe, ScalingState
from megatron_ext.kernels.selection import CoreAttention, KernelPathError, Probes, select


def _state(recipe="delayed", history=4, margin=0, dtype=E4M3):
    return ScalingState(FP8Recipe("hybrid", recipe, history, margin), dtype, "cpu")


def _end_step(*states, applied=True):
    fp8_scaling.update_delayed_scales(list(states), applied)


def test_delayed_scaling_uses_the_amax_history_of_steps():
    s = _state(history=3)
    _, _, inv = s.quantize(torch.full((4, 4), 2.0))
    assert inv.item() == pytest.approx(2.0 / 448.0)  # the first use has no history: its own amax sets the scale
    s.quantize(torch.full((4, 4), 8.0))  # later micro-batches of the step: the same scale, their amaxes noted
    _, _, inv = s.quantize(torch.full((4, 4), 1.0))
    assert inv.item() == pytest.approx(2.0 / 448.0) and s.amax_history.tolist() == [0.0, 0.0, 0.0]
    _end_step(s)
    assert s.amax_history.tolist() == [8.0, 0.0, 0.0] and s.scale.item() == 448.0 / 8.0  # the step's largest
    s.quantize(torch.full((4, 4), 1.0))
    _end_step(s)
    assert s.amax_history.tolist() == [1.0, 8.0, 0.0] and s.scale.item() == 448.0 / 8.0  # the history's max
    s.quantize(torch.full((4, 4), 100.0))
    _end_step(s, applied=False)  # a skipped step (or an evaluation) leaves no trace
    assert s.amax_history.tolist() == [1.0, 8.0, 0.0] and s.scale.item() == 448.0 / 8.0
    for _ in range(2):  # 8.0 rolls out
        s.quantize(torch.full((4, 4), 1.0))
        _end_step(s)
    assert s.amax_history.tolist() == [1.0, 1.0, 1.0] and s.scale.item() == 448.0


def test_margin_zero_amax_and_non_finite_amax():
    s = _state(margin=2)
    s.quantize(torch.full((2, 2), 7.0))
    assert s.scale.item() == 448.0 / 7.0 / 4.0
    _end_step(s)
    before = s.scale.clone()
    s.quantize(torch.zeros(2, 2))
    _end_step(s)
    assert s.scale.item() == before.item()  # the history still holds 7: unchanged
    fresh = _state(history=1)
    fresh.quantize(torch.zeros(2, 2))
    assert fresh.scale.item() == 1.0  # amax 0 keeps the previous scale
    _end_step(fresh)
    assert fresh.scale.item() == 1.0
    fresh.quantize(torch.tensor([[float("inf"), 1.0]]))
    _end_step(fresh)
    assert fresh.scale.item() == 1.0  # so does an infinite one


def test_tensorwise_scaling_uses_the_current_amax_and_saturates():
    s = _state("tensorwise", dtype=E5M2)
    x = torch.tensor([[1000.0, -3.0, 0.5, 1e-9]])
    q, _, inv = s.quantize(x)
    assert inv.item() == pytest.approx(1000.0 / 57344.0)
    assert q.float()[0, 0].item() * inv.item() == pytest.approx(1000.0)
    assert s.amax_history[0].item() == 1000.0  # each use enters the history at once
    sat = _state("delayed", dtype=E4M3)
    sat.quantize(torch.ones(1, 4))
    _end_step(sat)  # scale 448, from amax 1: 1000 is far beyond e4m3's range
    q, _, _ = sat.quantize(x)
    assert q.float()[0, 0].item() == 448.0 and not q.float().isnan().any()


def test_scaling_state_round_trips_through_a_state_dict():
    a, other = _state(history=3), _state(history=3)
    for v in (3.0, 5.0):
        a.quantize(torch.full((2, 2), v))
        other.quantize(torch.full((2, 2), v))
        _end_step(a, other)  # updated together: their histories are rows of one tensor
    saved = a.state_dict()
    assert saved["amax_history"].untyped_storage().nbytes() == 3 * 4  # its own row, not both
    b = _state(history=3)
    b.load_state_dict(saved)
    assert torch.equal(b.amax_history, a.amax_history) and b.scale.item() == a.scale.item() and b.calibrated
    _, _, inv = b.quantize(torch.full((2, 2), 1.0))
    assert inv.item() == pytest.approx(5.0 / 448.0)  # calibrated: the history's scale, not the first use's


def _amaxes_reduced_once_per_step():
    """Two tensor-parallel ranks see different amaxes over three micro-batches; no collective runs until
    the step ends, then one, after which both ranks hold the largest amax and the same scale."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    states = [ScalingState(FP8Recipe("hybrid", "delayed", 4, 0), dtype, "cpu", group) for dtype in (E4M3, E5M2)]
    for s in states:
        s.quantize(torch.ones(2, 2))  # calibration: the one use that reduces at once
    calls = []
    real = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        for micro_batch in range(3):
            for i, s in enumerate(states):
                s.quantize(torch.full((2, 2), float(1 + micro_batch + 10 * rank + 100 * i)))
        assert calls == []
        _end_step(*states)
        assert len(calls) == 1
    finally:
        torch.distributed.all_reduce = real
    assert [s.amax_history[0].item() for s in states] == [13.0, 113.0]
    assert [s.scale.item() for s in states] == pytest.approx([448.0 / 13.0, 57344.0 / 113.0], rel=1e-6)


@pytest.mark.launch
def test_delayed_amaxes_are_reduced_in_one_all_reduce_per_step():
    run_in_process_group(_amaxes_reduced_once_per_step, world_size=2, tp=2, timeout=120)


def _linear(x, w, mm, recipe="delayed"):
    state = FP8LinearState(FP8Recipe("hybrid", recipe, 8, 0), "cpu")
    if recipe == "delayed":  # warm the scales up as training does: one use per step
        g = torch.Generator().manual_seed(1)
        for _ in range(2):
            _FP8Linear.apply(x.detach(), w.detach(), state, False, False, None, mm)
            state.grad_output.quantize(torch.randn(x.shape[0], w.shape[0], generator=g) * 1e-3)
            fp8_scaling.update_delayed_scales(state.scaling_states(), applied=True)
            state.weight_fp8 = None  # a new step: the weight is cast afresh
    return _FP8Linear.apply(x, w, state, False, False, None, mm)


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_linear_scaled_mm_is_the_dequantised_reference_and_tracks_fp32(recipe):
    """Shapes that are not multiples of 16 (the 7B's FFN width is not): padding must not leak."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 72, generator=g)
    w = torch.randn(40, 72, generator=g) * 0.05
    grad = torch.randn(50, 40, generator=g) * 1e-3  # gradients are small: e5m2's range at work
    outs = {}
    for name, mm in (("scaled_mm", scaled_mm), ("reference", dequantized_mm)):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = _linear(xi, wi, mm, recipe)
        y.backward(grad)
        outs[name] = (y.detach(), xi.grad, wi.grad)
    for a, b in zip(outs["scaled_mm"], outs["reference"]):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    xf, wf = x.clone().requires_grad_(), w.clone().requires_grad_()
    yf = xf @ wf.t()
    yf.backward(grad)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    y, gx, gw = outs["scaled_mm"]
    assert rel(y, yf) < 0.05 and rel(gx, xf.grad) < 0.10 and rel(gw, wf.grad) < 0.10
    assert rel(y, yf) > 1e-4  # it did quantise


def test_a_weight_is_cast_once_per_step():
    """Every micro-batch of a step reuses the FP8 weight; end_fp8_step (after each step) recasts it."""
    from megatron_ext.kernels.fp8_linear import _FP8Mixin, end_fp8_step

    class Layer(_FP8Mixin, torch.nn.Module):
        pass

    layer = Layer()
    layer.fp8_state = FP8LinearState(FP8Recipe(), "cpu")
    casts = []
    real = layer.fp8_state.weight.quantize
    layer.fp8_state.weight.quantize = lambda *a, **k: casts.append(1) or real(*a, **k)
    w = torch.randn(16, 32)
    for _ in range(3):
        _FP8Linear.apply(torch.randn(4, 32), w, layer.fp8_state, False, False, None, dequantized_mm)
    assert len(casts) == 1
    end_fp8_step([torch.nn.ModuleList([layer])], applied=True)
    _FP8Linear.apply(torch.randn(4, 32), w, layer.fp8_state, False, False, None, dequantized_mm)
    assert len(casts) == 2


# ---- selection: the probes of each machine kind, substituted
H100 = dict(gpu_name="NVIDIA H100 80GB HBM3", compute_capability=(9, 0), triton=True)
A100 = dict(gpu_name="NVIDIA A100-SXM4-80GB", compute_capability=(8, 0), triton=True)
CPU = dict(triton=True)


@pytest.mark.parametrize("te", [None, "2.8.0"], ids=["no_te", "te"])
@pytest.mark.parametrize("machine", ["H100", "A100", "CPU"])
def test_auto_selection(te, machine):
    probes = Probes(te_version=te, **{"H100": H100, "A100": A100, "CPU": CPU}[machine])
    path = select(probes=probes)
    assert path.transformer_impl == ("transformer_engine" if te and machine != "CPU" else "local")
    assert path.fused_rope == path.fused_swiglu == path.fused_cross_entropy == (machine != "CPU")
    assert path.fp8 is None
    if machine == "CPU":
        assert path.attention is CoreAttention.TORCH_SDPA
    line = path.describe()
    assert ("Transformer Engine 2.8.0" in line) == (path.transformer_impl == "transformer_engine")
    if machine == "H100":
        fp8 = select(fp8_format="hybrid", fp8_recipe="tensorwise", probes=probes)
        assert fp8.fp8 == FP8Recipe("hybrid", "tensorwise", 1024, 0)
        assert ("torch._scaled_mm" in fp8.describe()) == (te is None)


def test_selection_errors():
    with pytest.raises(KernelPathError, match=r"NVIDIA A100-SXM4-80GB \(compute capability 8.0\) has no FP8"):
        select(fp8_format="hybrid", probes=Probes(te_version="2.8.0", **A100))
    with pytest.raises(KernelPathError, match="pass --fp8-cpu-emulation"):
        select(fp8_format="e4m3", probes=Probes(**CPU))
    assert select(fp8_format="e4m3", fp8_cpu_emulation=True, probes=Probes(**CPU)).fp8.format == "e4m3"
    with pytest.raises(KernelPathError, match="Transformer Engine does not import"):
        select("transformer_engine", probes=Probes(**H100))
    with pytest.raises(KernelPathError, match="needs a GPU"):
        select("transformer_engine", probes=Probes(te_version="2.8.0", **CPU))
    with pytest.raises(KernelPathError, match="mxfp8 needs Transformer Engine"):
        select(fp8_format="hybrid", fp8_recipe="mxfp8", probes=Probes(**H100))
    assert select(fp8_format="hybrid", fp8_recipe="mxfp8", probes=Probes(te_version="2.8.0", **H100)).uses_te
    with pytest.raises(KernelPathError, match="fused is Transformer Engine's"):
        select(attention_backend="fused", probes=Probes(**H100))
    assert select(attention_backend="unfused", probes=Probes(**H100)).attention is CoreAttention.MEGATRON_UNFUSED


@pytest.mark.launch
def test_fp8_on_cpu_without_emulation_fails_before_any_work():
    proc = train(1, TINY_RUN + ["--train-iters", "2", "--fp8-format", "hybrid"], check=False, timeout=120)
    assert proc.returncode != 0
    assert "error: --fp8-format hybrid on CPU: FP8 is emulated there, for tests only" in proc.stderr + proc.stdout


STEPS = 8
RUN = TINY_RUN + ["--train-iters", str(STEPS), "--tensor-model-parallel-size", "2", "--sequence-parallel"]
FP8 = ["--fp8-format", "hybrid", "--fp8-cpu-emulation", "--fp8-amax-history-len", "16"]


def _losses(path):
    return {r["iteration"]: r["lm_loss"] for r in read_metrics(path)}


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fp8_training_tracks_fp32_and_resumes_exactly(tmp_path):
    """TP 2 with sequence parallelism (FP8 GEMMs behind all-gather / reduce-scatter): the FP8 loss stays
    within 0.5% of the fp32 loss at every step; and resuming the FP8 run from its iteration-4 checkpoint
    gives its own losses exactly (at TP 1: within 1e-5): the amax histories and scales come back from the
    checkpoint (_extra_state). A checkpoint trained without FP8 resumes with FP8 (fresh scales)."""
    fp32_ckpt, fp8_ckpt = tmp_path / "fp32_ckpt", tmp_path / "fp8_ckpt"
    train(2, RUN + ["--metrics-jsonl", str(tmp_path / "fp32.jsonl"), "--save", str(fp32_ckpt), "--save-interval", "4"])
    out = train(
        2, RUN + FP8 + ["--metrics-jsonl", str(tmp_path / "fp8.jsonl"), "--save", str(fp8_ckpt), "--save-interval", "4"]
    )
    assert "fp8: hybrid delayed (amax history 16, margin 0; torch._scaled_mm on CPU" in out.stdout
    fp32, fp8 = _losses(tmp_path / "fp32.jsonl"), _losses(tmp_path / "fp8.jsonl")
    assert sorted(fp8) == list(range(1, STEPS + 1))
    for i in fp8:
        assert abs(fp8[i] - fp32[i]) <= 5e-3 * fp32[i], (i, fp8[i], fp32[i])
    assert fp8 != fp32  # FP8 did round something
    assert fp32[STEPS] < fp32[1] - 0.5  # and the run learned
    train(
        2, RUN + FP8 + ["--load", str(fp8_ckpt), "--ckpt-step", "4", "--metrics-jsonl", str(tmp_path / "resumed.jsonl")]
    )
    assert _losses(tmp_path / "resumed.jsonl") == {i: fp8[i] for i in range(5, STEPS + 1)}
    # At TP 1: the saved scales are every rank's (amaxes reduced over TP x DP), so any layout takes them.
    train(
        1,
        TINY_RUN
        + ["--train-iters", str(STEPS)]
        + FP8
        + ["--load", str(fp8_ckpt), "--ckpt-step", "4", "--metrics-jsonl", str(tmp_path / "tp1.jsonl")],
    )
    tp1 = _losses(tmp_path / "tp1.jsonl")
    assert sorted(tp1) == list(range(5, STEPS + 1)) and all(abs(tp1[i] - fp8[i]) <= 1e-5 * fp8[i] for i in tp1)
    train(
        2,
        RUN + FP8 + ["--load", str(fp32_ckpt), "--ckpt-step", "4", "--metrics-jsonl", str(tmp_path / "switched.jsonl")],
    )
    switched = _losses(tmp_path / "switched.jsonl")
    assert sorted(switched) == list(range(5, STEPS + 1))
    assert all(abs(switched[i] - fp32[i]) <= 5e-3 * fp32[i] for i in switched)


def test_layer_spec_follows_the_path(monkeypatch):
    """The modules each path puts in the layer's slots. Transformer Engine's classes are stood in for (TE
    is not installed here): its spec must use them, leave the norm slots empty (TE fuses LayerNorm into the
    next linear) and save those fused norms under the local spec's names."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_ext.model import layer_specs
    from megatron_ext.model.layer_norm import CrystalLayerNorm

    def parts(spec):
        sub = spec.submodules
        attn = sub.self_attention
        return (
            sub.input_layernorm,
            attn.module.__name__,
            attn.submodules.linear_qkv,
            attn.submodules.core_attention,
            sub.mlp.module.__name__,
            sub.mlp.submodules.linear_fc1,
            sub.sharded_state_dict_keys_map,
        )

    plain = parts(layer_specs.crystal_layer_spec())
    assert plain == (
        CrystalLayerNorm,
        "SelfAttention",
        ColumnParallelLinear,
        layer_specs.DotProductAttention,
        "MLP",
        ColumnParallelLinear,
        {},
    )
    h100 = Probes(**H100)
    norm, attn, qkv, core, mlp, fc1, keys = parts(
        layer_specs.crystal_layer_spec(select(fp8_format="hybrid", probes=h100))
    )
    assert (norm, attn, core.__name__, mlp) == (
        CrystalLayerNorm,
        "FusedRopeSelfAttention",
        "TorchSDPAttention",
        "FusedSwiGLUMLP",
    )
    assert qkv.__name__ == fc1.__name__ == "FP8ColumnParallelLinear" and keys == {}

    stand_ins = tuple(
        type(name, (), {})
        for name in ("TELayerNormColumnParallelLinear", "TEDotProductAttention", "TERowParallelLinear")
    )
    monkeypatch.setattr(layer_specs, "_te_modules", lambda: stand_ins)
    te = parts(layer_specs.crystal_layer_spec(select(probes=Probes(te_version="2.8.0", **H100))))
    assert te == (
        IdentityOp,
        "FusedRopeSelfAttention",
        stand_ins[0],
        stand_ins[1],
        "FusedSwiGLUMLP",
        stand_ins[0],
        {
            "self_attention.linear_qkv.layer_norm_": "input_layernorm.",
            "mlp.linear_fc1.layer_norm_": "pre_mlp_layernorm.",
        },
    )
