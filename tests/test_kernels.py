"""The project's Triton kernels against their PyTorch references (in Triton's interpreter on CPU, compiled
on CUDA where there is a GPU: conftest.py), and the fused modules inside a tensor-parallel model against
Megatron-Core's own.

Inputs are fresh random draws each run (seeded from the clock, printed on failure); every output buffer a
kernel allocates is poisoned (all bits set: NaN in every float format) so that an element the kernel
fails to write shows up. Tolerances, relative to the largest magnitude of the expected tensor (at least
1): fp32 1e-5 (the kernels compute in fp32, in another order than torch); bf16 2^-7 (the output's one
bf16 rounding is at most 2^-8 relative), against the reference run in fp32 on the same bf16 inputs.
"""

import json
import subprocess
import sys
import time

import pytest
import torch
from helpers.distributed_run import REPO, subprocess_environment
from helpers.process_group import run_in_process_group

from megatron_ext import cpu_compat
from megatron_ext.kernels import fp8_scaling, rope, swiglu
from megatron_ext.kernels.triton_runtime import INTERPRET, runs_on

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # see conftest.py
pytestmark = pytest.mark.skipif(
    not runs_on(torch.empty(0, device=DEVICE)), reason="needs Triton (its interpreter on CPU): pip install triton"
)

SEED = int(time.time() * 1000) % 2**31
# The multi-rank tests run on CPU ranks (gloo): only the interpreter runs the kernels there.
cpu_ranks = pytest.mark.skipif(
    not INTERPRET,
    reason="kernels on CPU ranks need Triton's interpreter; on a GPU "
    "machine the single-process tests check them on CUDA",
)
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-7}
_real_empty = torch.empty


def _poisoned_empty(*args, **kwargs):
    t = _real_empty(*args, **kwargs)
    t.view(torch.uint8).fill_(0xFF)
    return t


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty and torch.empty_like hand out NaN-filled memory while the kernel runs."""
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(
        torch, "empty_like", lambda t, **kw: _poisoned_empty(t.shape, dtype=kw.get("dtype", t.dtype), device=t.device)
    )
    yield


def _close(got, want, dtype, what, seed=SEED):
    assert not got.isnan().any(), f"{what}: NaN (an element left unwritten?) seed {seed}"
    err = (got.float() - want.float()).abs().max().item()
    bound = TOL[dtype] * max(1.0, want.abs().max().item())
    assert err <= bound, f"{what}: max |error| {err} > {bound} ({dtype}, seed {seed})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,head_dim", [(4, 16), (3, 32), (5, 8)])
def test_rope_kernel_matches_reference(poisoned, dtype, heads, head_dim):
    g = torch.Generator().manual_seed(SEED)
    s, b = 7, 3
    rot_half = head_dim // 8  # Crystal: 25% of the head rotated, in pairs
    # q and k as the strided views of one fused QKV projection, as SelfAttention hands them over.
    qkv = torch.randn(s, b, heads, 3 * head_dim, generator=g).to(DEVICE, dtype).requires_grad_()
    q, k = qkv[..., :head_dim], qkv[..., head_dim : 2 * head_dim]
    angles = (torch.rand(s, rot_half, generator=g) * 50).to(DEVICE)
    fq, fk = rope.fused_rope(q, k, angles)
    up = qkv.detach().float().requires_grad_()
    rq, rk = (
        rope.rope_reference(up[..., :head_dim], angles),
        rope.rope_reference(up[..., head_dim : 2 * head_dim], angles),
    )
    _close(fq, rq, dtype, "rope q")
    _close(fk, rk, dtype, "rope k")
    gq, gk = (torch.randn(t.shape, generator=g).to(DEVICE, dtype) for t in (fq, fk))
    (grad,) = torch.autograd.grad((fq * gq).sum() + (fk * gk).sum(), qkv)
    (ref_grad,) = torch.autograd.grad((rq * gq.float()).sum() + (rk * gk.float()).sum(), up)
    _close(grad, ref_grad, dtype, "rope grad")
    assert grad[..., 2 * head_dim :].abs().max() == 0  # v untouched


def test_rope_reference_is_megatrons_rotation():
    """The reference equals Megatron-Core's own interleaved partial rope on its own frequencies."""
    cpu_compat.activate()
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    emb = RotaryEmbedding(
        kv_channels=32, rotary_percent=0.25, rotary_interleaved=True, rotary_base=10000, use_cpu_initialization=True
    )
    freqs = emb(9)
    x = torch.randn(9, 2, 3, 32, generator=torch.Generator().manual_seed(SEED))
    want = _apply_rotary_pos_emb_bshd(x, freqs, rotary_interleaved=True)
    got = rope.rope_reference(x, rope.angles_from_megatron(freqs))
    assert (got - want).abs().max() < 1e-6 and (want - x).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_swiglu_kernel_matches_reference(poisoned, dtype, with_bias):
    g = torch.Generator().manual_seed(SEED)
    width = 88  # not a multiple of the block: the masked edges are exercised
    y = torch.randn(5, 7, 2 * width, generator=g).to(DEVICE, dtype).requires_grad_()
    bias = (torch.randn(2 * width, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_() if with_bias else None
    out = swiglu.bias_swiglu(y, bias)
    y32 = y.detach().float().requires_grad_()
    b32 = bias.detach().float().requires_grad_() if with_bias else None
    want = swiglu.bias_swiglu_reference(y32, b32)
    _close(out, want, dtype, "swiglu")
    grad_out = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    got = torch.autograd.grad((out * grad_out).sum(), [y] + ([bias] if with_bias else []))
    ref = torch.autograd.grad((want * grad_out.float()).sum(), [y32] + ([b32] if with_bias else []))
    _close(got[0], ref[0], dtype, "swiglu d(fc1 output)")
    if with_bias and dtype == torch.bfloat16:
        # d(bias) sums 35 rows of d(fc1 output), each rounded to bf16 (2^-8 relative) before the sum, and
        # rounds the sum once more: per element at most 2^-8 (sum of |terms| + |sum|), which can exceed
        # 2^-7 of the largest element where terms cancel.
        terms = ref[0].reshape(-1, ref[0].shape[-1]).abs().sum(dim=0)
        bound = 2**-8 * (terms + ref[1].abs()) * 1.001 + 1e-6
        err = (got[1].float() - ref[1]).abs()
        assert (err <= bound).all(), f"swiglu d(bias): error {err.max().item()} beyond the rounding bound (seed {SEED})"
    elif with_bias:
        _close(got[1], ref[1], dtype, "swiglu d(bias)")


@pytest.mark.parametrize("dtype", [fp8_scaling.E4M3, fp8_scaling.E5M2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("source", [torch.float32, torch.bfloat16])
def test_fp8_cast_kernel_is_bitwise_the_reference(poisoned, dtype, source):
    """Fused amax + scale + saturate + round + cast (+ transpose, + zero padding to 16): the reference's
    FP8 values exactly (+0 and -0 alike), including values that saturate and values in the format's
    subnormal range."""
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(37, 50, generator=g) * torch.logspace(-6, 3, 50)  # columns from 1e-6 to 1e3
    x[3, 4], x[5, 6] = 1e6, -1e6  # beyond either format's range once scaled
    x = x.to(DEVICE, source)
    scale = torch.tensor(float(torch.rand((), generator=g) * 4 + 0.5), device=DEVICE)
    q, qt, amax = fp8_scaling.quantize(x, scale, dtype, transpose=True)
    rq, rqt, ramax = fp8_scaling.quantize_reference(x, scale, dtype, transpose=True)
    assert q.shape == (48, 64) and qt.shape == (64, 48)
    assert torch.equal(q.float(), rq.float()), f"seed {SEED}"
    assert torch.equal(qt.float(), rqt.float()), f"seed {SEED}"
    assert amax.item() == ramax.item() == x.float().abs().max().item()
    fp8_max = torch.finfo(dtype).max
    assert q.float()[3, 4] == fp8_max and q.float()[5, 6] == -fp8_max  # saturated, not NaN
    assert (q.float()[37:] == 0).all() and (q.float()[:, 50:] == 0).all()  # the padding
    assert ((q.float() != 0) & (q.float().abs() < torch.finfo(dtype).smallest_normal)).any()  # subnormals were met


def _fused_against_plain(seed: int):
    """One crystal-test model (2 layers) built twice on the same weights, Megatron-Core's local modules
    vs this project's (fused rope, bias-SwiGLU and cross-entropy through Triton's interpreter, SDPA
    attention), at TP 2 with sequence parallelism: the per-token losses and every parameter gradient
    agree."""
    from megatron_ext.kernels.selection import CoreAttention, KernelPath
    from megatron_ext.model.crystal_config import get_preset
    from megatron_ext.model.crystal_gpt import ParallelLayout, build_model, transformer_config
    from megatron_ext.model.layer_specs import PLAIN_LOCAL

    c = get_preset("crystal-test").replace(num_layers=2)
    fused_path = KernelPath(
        transformer_impl="local",
        attention=CoreAttention.TORCH_SDPA,
        fused_rope=True,
        fused_swiglu=True,
        fused_cross_entropy=True,
        on_gpu=False,
    )
    layout = ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True)
    models, grads, losses = [], [], []
    ids, labels = torch.randint(0, c.vocab_size, (2, 2, c.seq_length), generator=torch.Generator().manual_seed(seed))
    positions = torch.arange(c.seq_length).expand(2, -1)
    for path in (PLAIN_LOCAL, fused_path):
        (model,) = build_model(c, transformer_config(c, layout, use_cpu_initialization=True, path=path), 1024, path)
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model)
        loss = model(ids, positions, None, labels=labels)  # [b, s]
        loss.backward(torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed + 1)))
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert type(models[1].decoder.layers[0].self_attention).__name__ == "FusedRopeSelfAttention"
    assert type(models[1].decoder.layers[0].mlp).__name__ == "FusedSwiGLUMLP" and models[1].fused_cross_entropy
    assert losses[0].shape == (2, c.seq_length)
    err = (losses[0] - losses[1]).abs().max().item()
    assert err < 1e-5 * losses[0].abs().max().item(), f"losses differ by {err} (seed {seed})"
    for name, want in grads[0].items():
        scale = want.abs().max().item()
        err = (grads[1][name] - want).abs().max().item()
        assert err <= 1e-5 * max(scale, 1.0), f"{name}: grad differs by {err} (scale {scale}, seed {seed})"


@pytest.mark.launch
@cpu_ranks
@pytest.mark.timeout(300)
def test_fused_modules_match_megatron_local_modules():
    run_in_process_group(_fused_against_plain, SEED, world_size=2, tp=2, timeout=280)  # one seed for both ranks


def _fused_cross_entropy_against_megatron(seed: int):
    """At TP 2 over a padded vocabulary (rank 1's columns end in padding): the fused loss and logits
    gradient equal Megatron-Core's vocab-parallel cross-entropy on logits with the padding masked out,
    and the padding columns get no gradient. fp32 and bf16 logits."""
    from megatron.core import parallel_state

    from megatron_ext.kernels.cross_entropy import cross_entropy_reference, vocab_parallel_cross_entropy

    rank = parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    vocab, padded, per_rank = 1500, 2048, 1024  # more than one 1024-wide block per row on rank 0
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(5, 3, padded, generator=g) * 3
    labels = torch.randint(0, vocab, (5, 3), generator=g)
    grad_loss = torch.rand(5, 3, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        local = full[..., rank * per_rank : (rank + 1) * per_rank].to(dtype)
        got_in, want_in = local.clone().requires_grad_(), local.float().requires_grad_()
        got = vocab_parallel_cross_entropy(got_in, labels, rank * per_rank, vocab, group)
        want = cross_entropy_reference(want_in, labels, rank * per_rank, vocab)
        _close(got, want, torch.float32, f"cross-entropy loss ({dtype})", seed)
        got.backward(grad_loss)
        want.backward(grad_loss)
        _close(got_in.grad, want_in.grad, dtype, f"cross-entropy grad ({dtype})", seed)
        if rank == 1:
            assert got_in.grad[..., vocab - per_rank :].abs().max() == 0  # the padding columns


@pytest.mark.launch
@cpu_ranks
@pytest.mark.timeout(300)
def test_fused_cross_entropy_matches_megatron_at_tp2():
    run_in_process_group(_fused_cross_entropy_against_megatron, SEED, world_size=2, tp=2, timeout=280)


# Largest shared memory one block may ask for (opt-in): A100 163 KiB, H100 227 KiB.
SHARED_MEMORY = {80: 166912, 90: 232448}


@pytest.mark.launch
@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_for_the_gpu(arch):
    """Triton's compiler, not its interpreter: each kernel down to a cubin for A100 (sm_80) and H100 (sm_90),
    through the modules' own launchers at the Crystal 7B's shapes (FP8 casts on sm_90 only), with its shared
    memory within the GPU's limit and no register spills. See compile_for_gpu.py."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "compile_for_gpu.py"), str(arch)],
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    compiled, defined = lines[:-1], set(lines[-1]["defined"])
    fp8_only = {"_amax_cast_kernel"}
    assert {c["kernel"] for c in compiled} == (defined if arch >= 89 else defined - fp8_only)
    for c in compiled:
        assert "cubin" in c["stages"], c
        assert c["shared_bytes"] <= SHARED_MEMORY[arch], c
        assert c["spill_bytes"] == 0 and c["registers"] <= 255, c  # a spill to local memory costs bandwidth
