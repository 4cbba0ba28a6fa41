"""Tests for ``vllm_rl_compat.ops.fp32_linear``: the Triton kernel under the
interpreter, the two CPU kernels for bf16 x bf16 (oneDNN brgemm, blocked) and
the torch path.

Error bound used throughout (Higham's worst case for recursive fp32 summation
of n terms whose products are exact): with P the number of part-dot passes
the kernel makes (1 for same-dtype 16-bit or fp32 x fp32, else the product of
the operands' bf16 part counts bf16:1, fp16:2, fp32:3) and n = P*H + 1 summands
(+1 for the bias),

    |out - ref| <= (n + 1) * 2**-24 * (|x| @ |w|.T + |b|)      (elementwise)

where ref is computed in fp64.  (For fp32 x fp32 the products themselves round
too, which the +1 covers.)  The bound is loose (errors grow like sqrt(n) in
practice), so a second check compares our max error with torch's own fp32
``F.linear`` on the same inputs, and dedicated tests make sure the bound is
still sharp enough to catch a weight rounded to bf16.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from kernel_support import blocked_expected, brgemm_expected, expected_cpu_route

from vllm_rl_compat.ops import fp32_linear
from vllm_rl_compat.ops import fp32_linear_cpu as cpu_mod
from vllm_rl_compat.ops import fp32_linear_torch as torch_mod
from vllm_rl_compat.ops.fp32_linear import cuda_auto_route, resolve_impl
from vllm_rl_compat.ops import fp32_linear_triton as triton_mod


# TRITON_INTERPRET: triton reads it (through triton.knobs, from os.environ on
# every access) whenever @triton.jit is *applied*.  That happens both when
# triton.language is imported (its own jit helpers such as tl.cdiv/tl.zeros)
# and when a kernel is decorated.  Our kernel uses only core builtins and is
# decorated lazily at its first launch (re-decorated if the variable changes,
# see ``_get_kernel``), so it does not matter that torch/triton -- imported
# above, or by other test modules -- were imported without the variable: this
# module deliberately runs in that "wrong" order.  Setting it through a
# module-scoped fixture instead of os.environ at import time keeps it from
# leaking into other test modules collected after this one (which may import
# vLLM and decorate its Triton kernels at import).
@pytest.fixture(scope="module", autouse=True)
def _triton_interpreter():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


EPS32 = 2.0**-24
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
IMPLS = ["triton", "torch"]
CPU_ROUTES = ["brgemm", "blocked"]  # CPU kernels for bf16 x bf16 (skipped where they cannot run)

# (activation dtype, weight dtype, P = part-dot passes used by the kernel)
DTYPE_TABLE = [
    (BF16, BF16, 1), (FP16, FP16, 1), (FP32, FP32, 1),
    (BF16, FP32, 3), (FP16, FP32, 6), (FP32, BF16, 3),
    (BF16, FP16, 2), (FP16, BF16, 2), (FP32, FP16, 6),
]


def _passes(xd: torch.dtype, wd: torch.dtype) -> int:
    return next(p for a, b, p in DTYPE_TABLE if a == xd and b == wd)


def _reference(x, w, b):
    """fp64 reference and the elementwise magnitude |x| @ |w|.T + |b|."""
    ref = x.double() @ w.double().T
    mag = x.double().abs() @ w.double().abs().T
    if b is not None:
        ref, mag = ref + b.double(), mag + b.double().abs()
    return ref, mag


def _bound(mag, H, passes):
    return (passes * H + 2) * EPS32 * mag


def _make(T, H, V, xd, wd, *, bias, seed=0, x_scale=1.0, layout="contig"):
    """Random inputs; layout 'rows' -> W[::2] view, 'cols' -> slice of a wider matrix."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, H, generator=g) * x_scale).to(xd)
    if layout == "rows":
        w = (torch.randn(2 * V, H, generator=g) * 0.05).to(wd)[::2]
    elif layout == "cols":
        w = (torch.randn(V, H + 37, generator=g) * 0.05).to(wd)[:, 5:5 + H]
    elif layout == "transposed":
        w = (torch.randn(H, V, generator=g) * 0.05).to(wd).t()
    else:
        w = (torch.randn(V, H, generator=g) * 0.05).to(wd)
    b = torch.randn(V, generator=g).to(wd) if bias else None
    return x, w, b


def _check(x, w, b, impl):
    """Run the op and assert the fp32 bound plus the comparison with torch's fp32."""
    out = fp32_linear(x, w, b, impl=impl)
    T, H, V = x.shape[0], x.shape[1], w.shape[0]
    assert out.dtype == FP32 and out.shape == (T, V) and out.is_contiguous()
    ref, mag = _reference(x, w, b)
    err = (out.double() - ref).abs()
    bound = _bound(mag, H, _passes(x.dtype, w.dtype))
    assert torch.all(err <= bound), f"max err/bound = {(err / bound).max().item():.3g}"
    # Three-way: not worse than torch's own fp32 computation (up to a small
    # factor for a different accumulation order).
    theirs = F.linear(x.float(), w.float(), None if b is None else b.float())
    err_t = (theirs.double() - ref).abs()
    scale = mag.clamp_min(torch.finfo(torch.float64).tiny)
    ours_rel, torch_rel = (err / scale).max().item(), (err_t / scale).max().item()
    assert ours_rel <= 4 * torch_rel + 8 * EPS32, (ours_rel, torch_rel)
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("xd,wd,passes", DTYPE_TABLE,
                         ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b, _ in DTYPE_TABLE])
def test_dtype_pairs(impl, xd, wd, passes):
    x, w, b = _make(17, 129, 1000, xd, wd, bias=True)
    _check(x, w, b, impl)


# A covering set (not the full product): every T in {1,3,17,130}, H in
# {64,129,576}, V in {1,7,1000,49165}, bias on/off and each strided layout
# appear, spread over the dtype pairs.  V=49165 only with H=64 and T=1: the
# interpreter runs one Python-level program per 16x64 tile.
SHAPES = [
    # T,  H,   V,     xd,   wd,   bias,  layout
    (1, 64, 49165, BF16, FP32, True, "contig"),
    (3, 576, 49165, BF16, BF16, False, "rows"),
    (1, 576, 1000, BF16, BF16, False, "rows"),
    (3, 129, 7, FP16, FP16, True, "cols"),
    (3, 576, 1, FP32, FP32, False, "contig"),
    (17, 64, 7, BF16, FP32, False, "transposed"),
    (17, 576, 1000, FP16, FP32, True, "rows"),
    (130, 129, 1000, BF16, BF16, True, "contig"),
    (130, 64, 1, FP32, BF16, True, "rows"),
    (130, 576, 7, BF16, FP32, True, "cols"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,H,V,xd,wd,bias,layout", SHAPES, ids=[
    f"T{t}-H{h}-V{v}-{str(a)[6:]}-{str(b)[6:]}-{'bias' if bb else 'nobias'}-{lay}"
    for t, h, v, a, b, bb, lay in SHAPES])
def test_shapes_and_layouts(impl, T, H, V, xd, wd, bias, layout):
    x, w, b = _make(T, H, V, xd, wd, bias=bias, seed=T * 7 + V, layout=layout)
    _check(x, w, b, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("xd,wd", [(BF16, FP32), (BF16, BF16), (FP16, FP32), (FP32, FP32)],
                         ids=["bf16-fp32", "bf16-bf16", "fp16-fp32", "fp32-fp32"])
def test_large_magnitude_activations(impl, xd, wd):
    # Activations ~1e4 (fp16 max is 65504; 3e3 * randn stays in range) with
    # outliers, the regime where bf16 logits are visibly wrong.
    x, w, b = _make(17, 129, 1000, xd, wd, bias=True, x_scale=3e3)
    x[0, 0] = 6e4
    _check(x, w, b, impl)


def _split_torch(w32: torch.Tensor):
    """Torch mirror of the kernel's truncation split (zero the 16 low bits)."""
    def trunc(v):
        return (v.view(torch.int32) & -65536).view(torch.float32)
    hi = trunc(w32)
    r = torch.where(hi == w32, torch.zeros_like(w32), w32 - hi)
    mid = trunc(r)
    return hi, mid, r - mid


def test_bf16_split_identity_is_exact():
    """w == hi + mid + lo with bf16-representable parts for |w| in [2**-110, max]."""
    g = torch.Generator().manual_seed(1)
    mant = torch.rand(200_000, generator=g, dtype=torch.float64) + 1.0
    expo = torch.randint(-110, 128, (200_000,), generator=g).double()
    w = (mant * torch.pow(2.0, expo)).float() * torch.where(torch.rand(200_000, generator=g) < .5, -1, 1)
    w = torch.cat([w, torch.tensor([0.0, torch.finfo(FP32).max, -torch.finfo(FP32).max,
                                    2.0**-110, float("inf"), float("-inf")])])
    parts = _split_torch(w)
    for p in parts:
        assert torch.equal(p.to(BF16).float(), p), "a part is not bf16-representable"
    total = parts[0].double() + parts[1].double() + parts[2].double()
    finite = torch.isfinite(w)
    assert torch.equal(total[finite], w[finite].double())
    assert torch.equal(parts[0][~finite], w[~finite]) and torch.all(parts[1][~finite] == 0)
    # Below 2**-110 the lowest part can lose bits (documented): show the limit is real.
    tiny = torch.tensor([2.0**-120 * (1 + 2.0**-23)])
    tp = _split_torch(tiny)
    assert not torch.equal(tp[2].to(BF16).float(), tp[2])


def _three_part_weights(V, H, seed):
    """fp32 weights with non-zero hi, mid and lo parts over a wide exponent range."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(V, H, generator=g) * torch.pow(2.0, torch.randint(-40, 40, (V, H), generator=g).float())
    hi = a.to(BF16).float()
    mid = (hi * 2.0**-9 * torch.rand(V, H, generator=g)).to(BF16).float()
    lo = (hi * 2.0**-18 * torch.rand(V, H, generator=g)).to(BF16).float()
    w = hi + mid + lo
    assert torch.all(_split_torch(w)[2] != 0).item() or (_split_torch(w)[2] != 0).float().mean() > 0.9
    return w


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_weight_split_is_bit_exact_on_one_hot(impl):
    """x = 2**k * one-hot: each logit is a single exact product, so any dropped
    weight part (or a TF32/bf16 rounding of W) shows up as a bit difference."""
    V, H, T = 300, 64, 17
    w = _three_part_weights(V, H, seed=2)
    cols = torch.arange(T) * 3 % H
    x = torch.zeros(T, H)
    x[torch.arange(T), cols] = torch.pow(2.0, torch.arange(T).float() - 8)
    out = fp32_linear(x.to(BF16), w, impl=impl)
    expected = (w[:, cols] * torch.pow(2.0, torch.arange(T).float() - 8)).T
    assert torch.equal(out, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_activation_split_is_bit_exact(impl):
    """fp16 activations need two bf16 parts: with a one-hot bf16 weight each
    logit equals one activation exactly."""
    T, H, V = 17, 129, 40
    x = (torch.randn(T, H, generator=torch.Generator().manual_seed(3)) * 100).to(FP16)
    assert not torch.equal(x.to(BF16).to(FP16), x)  # x really has bits below bf16
    w = torch.zeros(V, H)
    w[torch.arange(V), torch.arange(V) * 3] = 1.0
    out = fp32_linear(x, w.to(BF16), impl=impl)
    assert torch.equal(out, x.float()[:, torch.arange(V) * 3])


@pytest.mark.parametrize("impl", IMPLS)
def test_fp32_weight_bound_is_sensitive_to_bf16_rounding(impl):
    """Random fp32 weights with bits below bf16: ours meets the bound, while the
    same computation with the weight rounded to bf16 provably violates it."""
    T, H, V = 17, 64, 1000
    g = torch.Generator().manual_seed(4)
    x = torch.randn(T, H, generator=g).to(BF16)
    w = torch.randn(V, H, generator=g) * 0.05
    w_rounded = w.to(BF16)
    ref, mag = _reference(x, w, None)
    bound = _bound(mag, H, _passes(BF16, FP32))
    out = fp32_linear(x, w, impl=impl)
    assert torch.all((out.double() - ref).abs() <= bound)
    out_rounded = fp32_linear(x, w_rounded, impl=impl)
    assert ((out_rounded.double() - ref).abs() > bound).any(), "tolerance too loose to notice bf16 W"


def test_torch_path_chunking_and_fast_path_toggle():
    """Chunk sizes that do not divide V and both CPU paths give bound-exact results."""
    x, w, b = _make(torch_mod.FAST_PATH_MIN_TOKENS + 1, 129, 1000, BF16, BF16, bias=True)
    assert torch_mod._use_bf16_fast_path(x, w, True)
    ref, mag = _reference(x, w, b)
    bound = _bound(mag, 129, 1)
    outs = [torch_mod.fp32_linear_torch(x, w, b, chunk_rows=c, bf16_fast_path=f)
            for c in (7, 4096) for f in (True, False)]
    for out in outs:
        assert torch.all((out.double() - ref).abs() <= bound)
    with pytest.raises(ValueError, match="chunk_rows"):
        torch_mod.fp32_linear_torch(x, w, b, chunk_rows=0)


def test_bf16_fast_path_is_exact_against_fp64_at_realistic_size():
    """oneDNN with fp32_precision='bf16' on bf16-valued fp32 inputs must keep
    exact products and fp32 accumulation (a bf16 output rounding would be ~1e3x
    larger than this bound)."""
    x, w, _ = _make(64, 3584, 512, BF16, BF16, bias=False, seed=5)
    ref, mag = _reference(x, w, None)
    out = torch_mod.fp32_linear_torch(x, w, bf16_fast_path=True)
    rel = ((out.double() - ref).abs() / mag).max().item()
    assert rel <= 16 * EPS32, rel  # sqrt-like growth; the worst case bound is 3586*EPS32


def test_mkldnn_precision_context_restores_on_error():
    before = torch.backends.mkldnn.matmul.fp32_precision
    with pytest.raises(RuntimeError):
        with torch_mod.mkldnn_fp32_precision("bf16"):
            assert torch.backends.mkldnn.matmul.fp32_precision == "bf16"
            raise RuntimeError("boom")
    assert torch.backends.mkldnn.matmul.fp32_precision == before


@pytest.fixture()
def process_precision():
    """Set ``torch.set_float32_matmul_precision`` for one test, then restore every
    flag it touches (legacy value and the per-backend ``fp32_precision``)."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.mkldnn.matmul.fp32_precision,
             torch.backends.cuda.matmul.fp32_precision)
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.mkldnn.matmul.fp32_precision = saved[1]
    torch.backends.cuda.matmul.fp32_precision = saved[2]


# What vLLM hands the head: model-dtype activations with a bf16 or fp32 weight,
# and an fp32 model; T below and above the bf16 fast path's threshold.
PIN_CASES = [(BF16, BF16, 3), (BF16, BF16, 17), (BF16, FP32, 3), (BF16, FP32, 17),
             (FP32, FP32, 3), (FP32, FP32, 17)]


def _pin_outputs():
    outs = {}
    for xd, wd, T in PIN_CASES:
        x, w, b = _make(T, 257, 1000, xd, wd, bias=True, seed=T)
        for impl in ("torch", "auto"):
            outs[(xd, wd, T, impl)] = fp32_linear(x, w, b, impl=impl)
    return outs


@pytest.mark.parametrize("mode", ["medium", "high"])
def test_fp32_matmuls_run_ieee_whatever_the_process_sets(monkeypatch, process_precision, mode):
    """Every fp32 torch.mm of the head sees oneDNN at "ieee" (the bf16 fast
    path, exact by construction, sees "bf16"); the process's setting is back
    afterwards.  Runs everywhere, unlike the numerical test below, which needs
    a CPU whose oneDNN honours reduced precision."""
    process_precision(mode)
    reduced = torch.backends.mkldnn.matmul.fp32_precision
    assert reduced != "ieee"
    seen: list[tuple[torch.dtype, str]] = []
    mm = torch.mm

    def spy(a, b, *args, **kwargs):
        seen.append((a.dtype, torch.backends.mkldnn.matmul.fp32_precision))
        return mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    for xd, wd, T in PIN_CASES:
        x, w, b = _make(T, 257, 1000, xd, wd, bias=True, seed=T)
        for impl in ("torch", "auto"):
            seen.clear()
            fp32_linear(x, w, b, impl=impl)
            fast = impl == "torch" and torch_mod._use_bf16_fast_path(x, w, True)
            assert {p for _, p in seen} <= {"bf16" if fast else "ieee"}, (xd, wd, T, impl, seen)
            assert seen or resolve_impl(impl, x, w) in CPU_ROUTES, (xd, wd, T, impl)
            assert torch.backends.mkldnn.matmul.fp32_precision == reduced


def _reduced_precision_changes_plain_mm(mode: str) -> bool:
    """Probe: does a plain fp32 torch.mm on this CPU change under ``mode``?"""
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(17, 257, generator=g), torch.randn(257, 300, generator=g)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        exact = torch.mm(a, b)
        torch.set_float32_matmul_precision(mode)
        return not torch.equal(torch.mm(a, b), exact)
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("mode", ["medium", "high"])
def test_reduced_process_precision_leaves_logits_bit_identical(process_precision, mode):
    """With ``torch.set_float32_matmul_precision(mode)`` -- what vLLM does for
    ``VLLM_FLOAT32_MATMUL_PRECISION`` -- the logits are bit-identical to those
    under "highest", for bf16 and fp32 weights and fp32 x fp32."""
    if not _reduced_precision_changes_plain_mm(mode):
        pytest.skip(f"this CPU's oneDNN computes fp32 matmuls exactly under {mode!r} "
                    f"(a plain torch.mm is unchanged), so a missing pin could not show here")
    process_precision("highest")
    exact = _pin_outputs()
    process_precision(mode)
    for key, out in _pin_outputs().items():
        assert torch.equal(out, exact[key]), key


@pytest.mark.parametrize("impl", IMPLS + CPU_ROUTES)
def test_empty_dims(impl):
    if impl in CPU_ROUTES:
        _route_or_skip(impl)
    x = torch.zeros(0, 64, dtype=BF16)
    assert fp32_linear(x, torch.zeros(7, 64, dtype=BF16), impl=impl).shape == (0, 7)
    x = torch.randn(3, 64).to(BF16)
    assert fp32_linear(x, torch.zeros(0, 64, dtype=BF16), impl=impl).shape == (3, 0)


@pytest.mark.parametrize("impl", IMPLS + ["auto"] + CPU_ROUTES)
def test_bad_inputs_raise_clear_errors(impl):
    x = torch.randn(3, 64).to(BF16)
    w = torch.randn(10, 64).to(BF16)
    with pytest.raises(ValueError, match="hidden size mismatch.*x has H=64.*weight has H=65"):
        fp32_linear(x, torch.randn(10, 65).to(BF16), impl=impl)
    with pytest.raises(ValueError, match=r"bias must have shape \[V\]=\[10\]"):
        fp32_linear(x, w, torch.randn(9), impl=impl)
    with pytest.raises(ValueError, match="x must be 2-D"):
        fp32_linear(x[None], w, impl=impl)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        fp32_linear(x, w[0], impl=impl)
    with pytest.raises(TypeError, match="x has unsupported dtype torch.float64"):
        fp32_linear(x.double(), w, impl=impl)
    with pytest.raises(TypeError, match="weight has unsupported dtype torch.int8"):
        fp32_linear(x, w.to(torch.int8), impl=impl)
    with pytest.raises(TypeError, match="bias has unsupported dtype"):
        fp32_linear(x, w, torch.zeros(10, dtype=torch.int32), impl=impl)
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        fp32_linear(x, w.to("meta"), impl=impl)
    with pytest.raises(ValueError, match="bias is on meta"):
        fp32_linear(x, w, torch.zeros(10, device="meta"), impl=impl)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        fp32_linear(x, [[1.0]], impl=impl)


def test_bad_impl_and_triton_without_interpreter(monkeypatch):
    x, w = torch.randn(3, 64).to(BF16), torch.randn(10, 64).to(BF16)
    with pytest.raises(ValueError, match="impl must be one of"):
        fp32_linear(x, w, impl="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        fp32_linear(x, w, impl="triton")


# (activation, weight) -> what ``auto`` runs on CUDA: cuBLAS ("torch") where it
# has an exact fp32 route (identical dtypes), the kernel for every mixed pair.
CUDA_AUTO_TABLE = [
    (BF16, BF16, "torch"), (FP16, FP16, "torch"), (FP32, FP32, "torch"),
    (BF16, FP32, "triton"), (FP16, FP32, "triton"), (FP32, BF16, "triton"),
    (FP32, FP16, "triton"), (BF16, FP16, "triton"), (FP16, BF16, "triton"),
]


@pytest.mark.parametrize("xd,wd,route", CUDA_AUTO_TABLE,
                         ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b, _ in CUDA_AUTO_TABLE])
def test_cuda_auto_route(xd, wd, route):
    assert cuda_auto_route(xd, wd) == route


def test_auto_dispatch_and_autotune_is_off_when_interpreting(monkeypatch):
    x, w = torch.randn(3, 64).to(BF16), torch.randn(10, 64).to(BF16)
    assert resolve_impl("auto", x, w) == expected_cpu_route()
    odd_h = "blocked" if blocked_expected() else "torch"  # brgemm takes an even H only
    assert resolve_impl("auto", x[:, :63], w[:, :63]) == odd_h
    assert resolve_impl("auto", x, w.float()) == "torch"  # fp32 weight: IEEE path
    assert resolve_impl("auto", x.to("meta"), w.to("meta")) == "torch"
    monkeypatch.setenv("VLLM_RL_COMPAT_AUTOTUNE", "1")
    assert not triton_mod.autotune_enabled()  # the interpreter cannot time configs


def test_decode_config_uses_small_token_tile():
    cfg = triton_mod.default_config(1, BF16)
    assert cfg.block_t == 16 and -(-152064 // cfg.block_v) >= 1000  # many V programs
    assert triton_mod.default_config(4096, FP32).block_t <= 64


def test_launch_variants_cover_every_default_config():
    """``launch_variants`` (what ``precompile`` compiles) holds every
    configuration ``default_config`` returns, for any token count."""
    variants = triton_mod.launch_variants()
    for xd, wd in triton_mod.ENGINE_DTYPE_PAIRS:
        listed = {v.config for v in variants if (v.x_dtype, v.w_dtype) == (xd, wd)}
        assert len(listed) == len(triton_mod.TOKEN_TILES)
        for T in [*range(1, 200), 511, 512, 4096, 10**6]:
            assert triton_mod.default_config(T, wd) in listed, (xd, wd, T)
    # the 17-32-row tile for fp32 weights (closest to sm_86's limit) is listed
    assert any(v.config.block_t == 32 and v.w_dtype == FP32 for v in variants)


def _binder(kernel):
    """Triton's own argument specialiser for a CUDA target (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 80, 32))
    return create_function_from_signature(kernel.signature, kernel.params, backend)


def _launch_key(binder, x, w, b, config=None):
    """The compiled-kernel cache key (specialisation + options) of a launch."""
    out = torch.empty(x.shape[0], w.shape[0])
    variant, args, kwargs = triton_mod.launch_call(x, w, b, out, config)
    _, spec, options = binder(*args, **kwargs)
    return variant, (tuple(spec), str(options))


def test_token_count_is_not_specialised_and_warmup_matches_launches():
    """Every T in a token tile maps to one compiled kernel, and it is the one
    ``precompile`` warms up, so serving never compiles.  Checked on Triton's
    own specialiser; a kernel that specialised T (Triton's default for ints:
    == 1 and divisibility by 16) would fail the T=1/2/16 comparison."""
    from triton.runtime.jit import JITFunction, MockTensor

    kernel = JITFunction(triton_mod._fp32_linear_kernel, do_not_specialize=triton_mod.UNSPECIALIZED)
    binder = _binder(kernel)
    H, V = 576, 1000
    for variant in triton_mod.launch_variants():
        for has_bias in (True, False):
            args, kwargs = triton_mod.warmup_call(variant, H, V, has_bias)
            _, spec, options = binder(*map(MockTensor.wrap_dtype, args), **kwargs)
            warm = (tuple(spec), str(options))
            tile = variant.config.block_t
            lo = max([t for t in triton_mod.TOKEN_TILES if t < tile], default=0) + 1
            last = tile == triton_mod.TOKEN_TILES[-1]
            for T in [lo, lo + 1, tile] + ([tile + 1, 512] if last else []):
                x, w, b = _make(T, H, V, variant.x_dtype, variant.w_dtype, bias=has_bias)
                got, key = _launch_key(binder, x, w, b)
                assert got == variant and key == warm, (variant, has_bias, T)
    # control: without do_not_specialize, T=1 and T=16 would be separate kernels
    plain = _binder(JITFunction(triton_mod._fp32_linear_kernel))
    keys = {_launch_key(plain, *_make(T, H, V, BF16, BF16, bias=False))[1] for T in (1, 2, 16)}
    assert len(keys) == 3
    # precompile is a no-op where nothing is compiled (CPU device, interpreter)
    assert triton_mod.precompile("cpu", BF16, FP32, H, V, True) == []
    assert triton_mod.precompile("cuda", BF16, FP32, H, V, True) == []  # TRITON_INTERPRET=1


# Compiles every launch variant for each GPU exactly as ``precompile``'s
# ``kernel.warmup`` would (Triton's specialiser, then ``triton.compile``), with
# the serving layout of a Qwen2.5-7B head, and reports what the binary uses.
_COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, sys, time, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, MockTensor, create_function_from_signature
    from vllm_rl_compat.ops import fp32_linear_triton as m
    kernel = JITFunction(m._fp32_linear_kernel, do_not_specialize=m.UNSPECIALIZED)
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    res, start = {}, time.time()
    for cc in (80, 86, 90):
        target = GPUTarget("cuda", cc, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        for v in m.launch_variants():
            args, kwargs = m.warmup_call(v, H=3584, V=152064, has_bias=True)
            bound, spec, opts = binder(*map(MockTensor.wrap_dtype, args), **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                                      spec, opts)
            c = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
            ptx = c.asm["ptx"]
            cfg = v.config
            key = (f"{short[v.x_dtype]}-{short[v.w_dtype]}-BT{cfg.block_t}-W{cfg.num_warps}"
                   f"-S{cfg.num_stages}-sm{cc}")
            res[key] = {"mma": sorted(set(re.findall(r"mma[.\\w]*", ptx))),
                        "tf32": "tf32" in ptx.lower(), "cubin": len(c.asm["cubin"]),
                        "shared": c.metadata.shared}
    print(f"compiled {len(res)} kernels in {time.time() - start:.0f} s", file=sys.stderr)
    print(json.dumps(res))
""")


def test_kernel_compiles_for_real_gpus_without_tf32():
    """The interpreter never runs the compiled path, so compile every launch
    variant (each default configuration x dtype pair an engine can use) for
    sm_80/86/90 (ptxas ships with the triton wheel) and inspect the result:
    tensor-core MMA with fp32 accumulation for 16-bit/split modes (bf16 parts
    for split), no TF32 anywhere, no MMA (i.e. IEEE FMA) for fp32 x fp32, and
    shared memory within the 99 KB a block may use on sm_86."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("no ptxas available for an offline CUDA compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(res) == 3 * len(triton_mod.launch_variants())
    assert any(k.startswith("fp16-fp32-BT32") and k.endswith("sm86") for k in res)
    # mma.sync ... .f32.bf16.bf16.f32 (sm_80/86, sm_90 small tiles) or
    # wgmma.mma_async ... .f32.bf16.bf16 (sm_90, 64-row tiles): fp32 accumulator.
    for key, info in res.items():
        assert not info["tf32"], key
        assert info["cubin"] > 0, key
        assert info["shared"] <= 99 * 1024, (key, info["shared"])
        if key.startswith("fp32-fp32"):
            assert info["mma"] == [], key
        else:
            operands = ".f32.f16.f16" if key.startswith("fp16-fp16") else ".f32.bf16.bf16"
            assert any(operands in m for m in info["mma"]), (key, info["mma"])


# ---------------------------------------------------------------- CPU kernels

def _route_or_skip(route):
    """Skip only where the machine probe says the kernel cannot exist; elsewhere
    it must have built (``kernel_support`` asks the machine, not the product)."""
    expected = {"brgemm": brgemm_expected, "blocked": blocked_expected}[route]()
    if not expected:
        pytest.skip(f"the machine probe says the {route} kernel cannot run here")
    assert cpu_mod.available(route), f"the CPU {route} kernel failed to build or load (see the log)"


# bf16 x bf16 only. brgemm: T crosses the 16-token tile and 64-token block
# edges; H includes the smallest even size; V includes 1, a non-multiple of the
# 128/256-row vocabulary blocks and the SmolLM2 vocabulary + 13.  blocked: T
# crosses the fused matrix-vector limit (8 -> 9), H is odd or not a multiple of
# the 8-lane vectors, V crosses its 256-row work split and weight blocks.
CPU_SHAPES = [
    # T,  H,   V,    bias,  layout
    (1, 64, 49165, False, "contig"),
    (3, 576, 1000, True, "rows"),
    (16, 2, 7, False, "contig"),
    (17, 130, 1, True, "cols"),
    (64, 576, 4099, False, "contig"),
    (65, 66, 1000, True, "rows"),
    (130, 576, 49165, False, "contig"),
]
BLOCKED_ONLY_SHAPES = [
    (8, 63, 1001, True, "cols"),
    (9, 63, 257, False, "rows"),
    (2, 7, 513, False, "contig"),
    (5, 1, 300, True, "contig"),
]
CPU_CASES = ([("brgemm", *shape) for shape in CPU_SHAPES]
             + [("blocked", *shape) for shape in CPU_SHAPES + BLOCKED_ONLY_SHAPES])


@pytest.mark.parametrize("route,T,H,V,bias,layout", CPU_CASES, ids=[
    f"{r}-T{t}-H{h}-V{v}-{'bias' if bb else 'nobias'}-{lay}" for r, t, h, v, bb, lay in CPU_CASES])
def test_cpu_kernel_shapes_and_layouts(route, T, H, V, bias, layout):
    _route_or_skip(route)
    x, w, b = _make(T, H, V, BF16, BF16, bias=bias, seed=T * 5 + V, layout=layout)
    _check(x, w, b, route)
    _check(torch.randn(2 * T, H).to(BF16)[::2], w, b, route)  # row-strided x


@pytest.mark.parametrize("route", CPU_ROUTES)
def test_cpu_kernel_bound_catches_bf16_rounded_logits(route):
    """The fp32 bound is tight enough that bf16-rounded logits (what the stock
    bf16 head returns) fail it, so the shape tests would catch such a kernel."""
    _route_or_skip(route)
    for T in (4, 32):  # both blocked routes (fused loop, blocked sgemm)
        x, w, _ = _make(T, 576, 4096, BF16, BF16, bias=False, seed=9)
        ref, mag = _reference(x, w, None)
        bound = _bound(mag, 576, 1)
        out = fp32_linear(x, w, impl=route)
        assert torch.all((out.double() - ref).abs() <= bound)
        assert ((out.to(BF16).double() - ref).abs() > bound).any()


REJECTED = {"brgemm": ["odd-H", "fp32-weight", "fp16", "H-strided-weight"],
            "blocked": ["fp32-weight", "fp16", "H-strided-weight"]}


@pytest.mark.parametrize("route,case", [(r, c) for r, cases in REJECTED.items() for c in cases])
def test_cpu_kernel_rejects_what_it_cannot_run(route, case):
    """Inputs outside a kernel go elsewhere under ``auto`` and give a clear
    error when that kernel is forced (never brgemm's SIGILL on an odd H)."""
    _route_or_skip(route)
    x, w = torch.randn(3, 64).to(BF16), torch.randn(10, 64).to(BF16)
    x, w = {"odd-H": (x[:, :63], w[:, :63]), "fp32-weight": (x, w.float()),
            "fp16": (x.half(), w.half()), "H-strided-weight": (x, w.t().contiguous().t())}[case]
    assert resolve_impl("auto", x, w) != route
    with pytest.raises(ValueError, match=f"impl='{route}' needs bf16 x and weight"):
        fp32_linear(x, w, impl=route)


@pytest.mark.parametrize("probe,route", [
    ({"compiled": True, "brgemm": 1}, "brgemm"),    # Intel Xeon with AMX
    ({"compiled": True, "brgemm": 0}, "blocked"),   # AMD EPYC: AVX512-BF16 without AMX, or AVX2
    ({"compiled": True, "brgemm": -1}, "blocked"),  # oneDNN claims bf16 packing but computes wrong
    ({"compiled": False, "brgemm": None}, "torch"),  # no C++ compiler
], ids=["amx", "no-amx", "broken-brgemm", "no-compiler"])
def test_oracle_branches(monkeypatch, probe, route):
    """What the tests expect on each kind of machine follows from the probe's answer
    alone (this machine's own answer is what every other test uses)."""
    import kernel_support

    monkeypatch.setattr(kernel_support, "probe", lambda: probe)
    assert kernel_support.expected_cpu_route() == route
    assert kernel_support.brgemm_expected() == (route == "brgemm")
