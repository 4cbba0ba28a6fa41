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
from vllm_rl_compat.ops.fp32_linear import resolve_impl
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


_COMPILE_SCRIPT = textwrap.dedent("""
    import json, re, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    from vllm_rl_compat.ops import fp32_linear_triton as m
    kernel = JITFunction(m._fp32_linear_kernel)
    sig = {n: "i64" if n.startswith("stride") else "i32" for n in
           ("T", "V", "H", "stride_xt", "stride_xh", "stride_wv", "stride_wh",
            "stride_b", "stride_ot", "stride_ov", "t_bucket")}
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    res = {}
    for xd, wd in [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                   (torch.float32, torch.float32), (torch.float16, torch.float32)]:
        mode, xp, wp = m.kernel_mode(xd, wd)
        s = dict(sig, x_ptr="*" + short[xd], w_ptr="*" + short[wd], b_ptr="*fp32",
                 out_ptr="*fp32")
        for T in (1, 512):  # the decode and the prefill default configuration
            cfg = m.default_config(T, wd)
            const = dict(HAS_BIAS=True, MODE=mode, X_PARTS=xp, W_PARTS=wp, INTERPRET=False,
                         BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
                         GROUP_T=cfg.group_t)
            for k in const:
                s[k] = "constexpr"
            for cc in (80, 86, 90):
                c = triton.compile(ASTSource(fn=kernel, signature=s, constexprs=const),
                                   target=GPUTarget("cuda", cc, 32),
                                   options={"num_warps": cfg.num_warps,
                                            "num_stages": cfg.num_stages})
                ptx = c.asm["ptx"]
                res[f"{short[xd]}-{short[wd]}-T{T}-sm{cc}"] = {
                    "mma": sorted(set(re.findall(r"mma[.\\w]*", ptx))),
                    "tf32": "tf32" in ptx.lower(), "cubin": len(c.asm["cubin"]),
                    "shared": c.metadata.shared}
    print(json.dumps(res))
""")


def test_kernel_compiles_for_real_gpus_without_tf32():
    """The interpreter never runs the compiled path, so compile the default
    decode/prefill configurations for sm_80/86/90 (ptxas ships with the triton
    wheel) and inspect the result: bf16 tensor-core MMA with fp32 accumulation
    for 16-bit/split modes, no TF32 anywhere, no MMA (i.e. IEEE FMA) for
    fp32 x fp32, and shared memory within the 99 KB a block may use on sm_86."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True,
                          env=env, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    if proc.returncode != 0 and ("ptxas" in proc.stderr and "not found" in proc.stderr):
        pytest.skip("no ptxas available for an offline CUDA compile")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # mma.sync ... .f32.bf16.bf16.f32 (sm_80/86, sm_90 small tiles) or
    # wgmma.mma_async ... .f32.bf16.bf16 (sm_90, 64-row tiles): fp32 accumulator.
    for key, info in res.items():
        assert not info["tf32"], key
        assert info["cubin"] > 0, key
        assert info["shared"] <= 99 * 1024, (key, info["shared"])
        if key.startswith("fp32-fp32"):
            assert info["mma"] == [], key
        else:
            assert any(".f32.bf16.bf16" in m for m in info["mma"]), (key, info["mma"])


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
