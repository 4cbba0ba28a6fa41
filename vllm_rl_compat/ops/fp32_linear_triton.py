"""Triton kernel for ``out[T, V] = x[T, H] @ weight[V, H]^T (+ bias)`` in fp32.

Why a kernel at all: online RL needs the sampler's log-probs to match the
trainer's, so the LM-head projection must produce *fp32* logits that are exact
up to fp32 accumulation error, without materialising an fp32 copy of a
(vocab x hidden) weight on every step.

Precision strategy (every ``tl.dot`` names ``input_precision`` explicitly,
because Triton's default for fp32 operands on NVIDIA is TF32):

* same-dtype 16-bit operands (bf16 x bf16, fp16 x fp16): one tensor-core dot
  with fp32 accumulation.  The product of two bf16 (8-bit significand) or two
  fp16 (11-bit) numbers fits in fp32's 24-bit significand, so every product is
  exact and only the fp32 accumulation rounds (inside the MMA unit the
  accumulation order and rounding are the hardware's, not strictly IEEE
  sequential; the error stays at the fp32-accumulation level and is what the
  GPU run of the benchmark's error column measures).
* fp32 x fp32: IEEE fp32 dot (FMA on CUDA cores, no TF32).
* every other combination ("split" mode): each operand is cut *exactly* into
  bf16-representable parts (bf16: 1 part, fp16: 2 parts, fp32: 3 parts) and
  the kernel sums ``dot(x_i, w_j)`` over all part pairs on bf16 tensor cores
  (at most 3 x 2 = 6 dots).  Each part-product is exact in fp32, so the result
  again only carries fp32 accumulation error.  The split is done on the fly
  from the loaded tile, so there is no extra memory.

Exactness of the split.  ``_trunc`` keeps the top 8 significant bits of an fp32
value by zeroing its 16 low bits (truncation, so it can never overflow to inf
and does not depend on a rounding mode).  For a finite fp32 value ``w`` with
exponent ``e`` (``2**e <= |w| < 2**(e+1)``): ``hi = trunc(w)``; ``r = w - hi``
is exact, a multiple of ``2**(e-23)`` with ``|r| < 2**(e-7)``;
``mid = trunc(r)`` and ``lo = r - mid`` leaves at most 8 significant bits
(positions ``f-8 .. e-23`` where ``2**f <= |r|``), so ``lo`` is a bf16 value as
long as ``2**(e-23)`` is not below bf16's smallest subnormal ``2**-133``, i.e.
``|w| >= 2**-110``.  Hence ``w == hi + mid + lo`` exactly for every finite
``|w| >= 2**-110`` and for 0; for tinier weights the dropped bits are below
``2**-133`` in absolute value.  ``+-inf`` is kept in ``hi`` (``mid = lo = 0``);
NaN propagates.  (With a multi-part operand facing an inf, a zero part times
inf gives NaN where IEEE fp32 would give inf: LM heads are finite.)  fp16 values (11 bits, exponent >= -24) need two parts.
``tests/test_ops_fp32_linear.py`` checks the identity bit-for-bit in torch.

Interpreter: ``TRITON_INTERPRET=1`` multiplies bf16 dot operands wrongly (it
stores bf16 as uint16 and feeds the raw integers to ``np.matmul``; upstream
triton issue 11584), so when interpreting the ``INTERPRET`` constexpr makes the
kernel feed the (bf16-representable) parts to an IEEE fp32 dot instead.  Since
all part products are exact in fp32 either way, results are the same up to
accumulation order.

Launch: a 1-D grid over (T-block, V-block) tiles in grouped order: within a
group of ``GROUP_T`` token blocks the token block varies fastest, so
concurrently running programs share weight tiles in L2.  For decode
(``T <= BLOCK_T``) this degenerates to one program per V-block (V is the fast
axis), and ``BLOCK_T`` is sized from ``T`` (16 rows minimum, the smallest tile
``tl.dot`` accepts) so a single token does not waste a 128-row tile.  A 1-D
grid also avoids CUDA's 65535 limit on grid axes 1 and 2.  All pointer offsets
are int64 (a 152064 x 3584 weight has 5.4e8 elements: fits int32, but
strided views / larger vocabularies need not).

No compile while serving: Triton compiles one binary per specialisation of
the arguments, and by default it specialises every int argument on ``== 1``
and on divisibility by 16.  The token count ``T`` (and ``t_bucket``, derived
from it) is therefore declared ``do_not_specialize``: a decode step with one
token, 3 or 16 tokens all reuse one binary.  The other ints (``V``, ``H``,
strides) are fixed by the model, so their specialisation is harmless.  The
tile configuration follows ``T`` only through ``TOKEN_TILES`` (three buckets),
so ``launch_variants`` lists every kernel ``fp32_linear`` can launch for the
engine's dtypes and ``precompile`` compiles them at load time.

Autotuning is off by default (one fixed heuristic configuration, no warm-up
benchmarks at serve time).  ``VLLM_RL_COMPAT_AUTOTUNE=1`` enables
``triton.autotune`` over a few configs (which compiles and times them at serve
time, by design); it is ignored under the interpreter.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from vllm_rl_compat import envs

MODE_NATIVE16 = 0  # same-dtype 16-bit operands, one tensor-core dot
MODE_IEEE = 1  # fp32 x fp32, IEEE dot
MODE_SPLIT = 2  # exact bf16 split of each operand, sum of part dots

_PARTS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
SUPPORTED_DTYPES = tuple(_PARTS)


def _fp32_linear_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    T,
    V,
    H,
    stride_xt,
    stride_xh,
    stride_wv,
    stride_wh,
    stride_b,
    stride_ot,
    stride_ov,
    t_bucket,  # autotune key only (power-of-two bucket of T)
    HAS_BIAS: tl.constexpr,
    MODE: tl.constexpr,
    X_PARTS: tl.constexpr,
    W_PARTS: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_T: tl.constexpr,
):
    # Only core builtins, no @triton.jit helpers: the jit wrapper is built
    # lazily (see _get_kernel) and a jit helper, including triton's own
    # tl.cdiv / tl.zeros, is interpreted or compiled according to
    # TRITON_INTERPRET at the time *its* module was imported.
    pid = tl.program_id(0)
    num_t = (T + BLOCK_T - 1) // BLOCK_T
    num_v = (V + BLOCK_V - 1) // BLOCK_V
    per_group = GROUP_T * num_v
    first_t = (pid // per_group) * GROUP_T
    group_t = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_t
    pid_v = (pid % per_group) // group_t

    offs_t = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    mask_t = offs_t < T
    mask_v = offs_v < V
    x_rows = x_ptr + offs_t[:, None] * stride_xt  # [BLOCK_T, 1]
    w_cols = w_ptr + offs_v[None, :] * stride_wv  # [1, BLOCK_V]: W^T tile

    acc = tl.full((BLOCK_T, BLOCK_V), 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < H
        x = tl.load(x_rows + kk[None, :] * stride_xh, mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wh, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if MODE == 0:
            if INTERPRET:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w, acc, input_precision="ieee")
        elif MODE == 1:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            # Exact bf16 parts, kept in fp32 registers: truncation = zero the
            # 16 low bits.  (-65536 == 0xFFFF0000 as int32.)
            x0 = x.to(tl.float32)
            xa = (x0.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
            xr = x0 - xa
            xb = (xr.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
            xc = xr - xb
            w0 = w.to(tl.float32)
            wa = (w0.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
            wr = tl.where(wa == w0, 0.0, w0 - wa)  # inf stays in the top part
            wb = (wr.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)
            wc = wr - wb
            if INTERPRET:
                DT: tl.constexpr = tl.float32
            else:
                DT: tl.constexpr = tl.bfloat16
            # Smallest terms first; pairs beyond an operand's part count are
            # skipped at compile time (their parts are exactly zero anyway).
            if X_PARTS > 2:
                if W_PARTS > 1:
                    acc = tl.dot(xc.to(DT), wb.to(DT), acc, input_precision="ieee")
            if X_PARTS > 1:
                if W_PARTS > 2:
                    acc = tl.dot(xb.to(DT), wc.to(DT), acc, input_precision="ieee")
            if X_PARTS > 2:
                acc = tl.dot(xc.to(DT), wa.to(DT), acc, input_precision="ieee")
            if W_PARTS > 2:
                acc = tl.dot(xa.to(DT), wc.to(DT), acc, input_precision="ieee")
            if X_PARTS > 1:
                if W_PARTS > 1:
                    acc = tl.dot(xb.to(DT), wb.to(DT), acc, input_precision="ieee")
            if X_PARTS > 1:
                acc = tl.dot(xb.to(DT), wa.to(DT), acc, input_precision="ieee")
            if W_PARTS > 1:
                acc = tl.dot(xa.to(DT), wb.to(DT), acc, input_precision="ieee")
            acc = tl.dot(xa.to(DT), wa.to(DT), acc, input_precision="ieee")

    if HAS_BIAS:
        b = tl.load(b_ptr + offs_v * stride_b, mask=mask_v, other=0.0)
        acc += b.to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_t[:, None] * stride_ot + offs_v[None, :] * stride_ov
    tl.store(out_ptrs, acc, mask=mask_t[:, None] & mask_v[None, :])


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and launch parameters of one kernel instance."""

    block_t: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    group_t: int = 8


# Every BLOCK_T ``default_config`` can choose: the token count only selects
# one of these, which is what keeps the set of compiled kernels finite.
TOKEN_TILES = (16, 32, 64)


def token_tile(T: int) -> int:
    """The smallest tile of ``TOKEN_TILES`` that holds ``T`` rows, else the largest."""
    return next((b for b in TOKEN_TILES if T <= b), TOKEN_TILES[-1])


def tile_config(block_t: int, w_dtype: torch.dtype) -> LaunchConfig:
    """The fixed (untuned) configuration for a ``TOKEN_TILES`` entry.

    BLOCK_T follows T (16, 32 or 64 rows) so decode does not compute 127 dead
    rows; BLOCK_V=64 at decode gives V/64 programs (2376 for a 152k vocab),
    enough to fill any current GPU.  BLOCK_K=64 with a 3-stage pipeline, or 2
    stages for 32- and 64-row tiles of fp32 weights, stays under the 99 KB of
    shared memory a block may use on sm_86: with 3 stages Triton 3.8 needs
    108 KB for fp16 x fp32 at 32 rows and 104 KB for 64 rows (the offline
    compile test checks every configuration).
    """
    if block_t not in TOKEN_TILES:
        raise ValueError(f"block_t must be one of {TOKEN_TILES}, got {block_t}")
    if block_t == 16:
        return LaunchConfig(16, 64, 64, num_warps=4, num_stages=3)
    warps = 8 if (w_dtype == torch.float32 or block_t == 64) else 4
    stages = 2 if w_dtype == torch.float32 else 3
    return LaunchConfig(block_t, 128, 64, num_warps=warps, num_stages=stages)


def default_config(T: int, w_dtype: torch.dtype) -> LaunchConfig:
    """The configuration ``fp32_linear`` launches for ``T`` tokens (see ``tile_config``)."""
    return tile_config(token_tile(T), w_dtype)


# (activation, weight) dtypes an engine can hand the head: the model dtype
# for both (``fp32_head="compute"``) or an fp32 weight (``"weights"``).
ENGINE_DTYPE_PAIRS = (
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
)


@dataclass(frozen=True)
class KernelVariant:
    """One compiled kernel: operand dtypes (which fix MODE and parts) and a launch config."""

    x_dtype: torch.dtype
    w_dtype: torch.dtype
    config: LaunchConfig

    @property
    def mode(self) -> tuple[int, int, int]:
        """(MODE, X_PARTS, W_PARTS), see ``kernel_mode``."""
        return kernel_mode(self.x_dtype, self.w_dtype)


def launch_variants(pairs: Sequence[tuple[torch.dtype, torch.dtype]] = ENGINE_DTYPE_PAIRS,
                    ) -> list[KernelVariant]:
    """Every kernel the default (untuned) launch can need for these dtype pairs.

    Complete by construction: ``default_config`` is ``tile_config`` of a
    ``TOKEN_TILES`` entry, and ``T`` itself is not specialised.  (``HAS_BIAS``
    doubles the count; it is fixed per model and passed to ``precompile``.)
    """
    return [KernelVariant(xd, wd, tile_config(bt, wd)) for xd, wd in pairs for bt in TOKEN_TILES]


def autotune_enabled() -> bool:
    """``VLLM_RL_COMPAT_AUTOTUNE=1`` and not interpreting (needs real timing)."""
    return envs.VLLM_RL_COMPAT_AUTOTUNE and not interpreting()


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _autotune_configs() -> list[triton.Config]:
    shapes = [(16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 64, 128, 4, 3),
              (32, 128, 64, 4, 3), (64, 128, 64, 8, 3), (128, 128, 32, 8, 3),
              (128, 64, 64, 4, 4)]
    return [triton.Config({"BLOCK_T": t, "BLOCK_V": v, "BLOCK_K": k, "GROUP_T": 8},
                          num_warps=w, num_stages=s) for t, v, k, w, s in shapes]


# Arguments Triton must not specialise on: they change with every batch.
UNSPECIALIZED = ("T", "t_bucket")


@functools.lru_cache(maxsize=None)
def _get_kernel(interpret: bool, autotune: bool):
    """Build the jit kernel lazily, keyed by mode.

    ``triton.jit`` decides interpreter vs compiler when it is *applied*, so
    decorating at import time would make the result depend on whether
    TRITON_INTERPRET was set before this module was first imported.  (The
    kernel body avoids triton's own jit helpers for the same reason.)  The
    ``interpret`` key only exists to re-decorate when the variable changes;
    running both modes in one process is not something Triton supports.
    """
    kernel = triton.jit(_fp32_linear_kernel, do_not_specialize=UNSPECIALIZED)
    if autotune:
        kernel = triton.autotune(configs=_autotune_configs(), key=["t_bucket", "V", "H", "MODE",
                                                                   "X_PARTS", "W_PARTS"])(kernel)
    return kernel


def kernel_mode(x_dtype: torch.dtype, w_dtype: torch.dtype) -> tuple[int, int, int]:
    """(MODE, X_PARTS, W_PARTS) for an activation/weight dtype pair."""
    if x_dtype == w_dtype and x_dtype != torch.float32:
        return MODE_NATIVE16, 1, 1
    if x_dtype == torch.float32 and w_dtype == torch.float32:
        return MODE_IEEE, 1, 1
    return MODE_SPLIT, _PARTS[x_dtype], _PARTS[w_dtype]


def _kernel_call(x: Any, w: Any, b: Any, out: Any, T: int, V: int, H: int,
                 strides: tuple[int, ...], variant: KernelVariant, has_bias: bool,
                 interpret: bool) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional and keyword arguments of one kernel launch (or warm-up).

    The single place that maps a call to the kernel's arguments, shared by
    ``launch_call`` and ``warmup_call`` so that a warm-up compiles exactly the
    specialisation a later launch looks up.  ``strides``: x (2), weight (2),
    bias (1), out (2).
    """
    mode, x_parts, w_parts = variant.mode
    cfg = variant.config
    args = (x, w, b, out, T, V, H, *strides, triton.next_power_of_2(T))
    kwargs = dict(HAS_BIAS=has_bias, MODE=mode, X_PARTS=x_parts, W_PARTS=w_parts,
                  INTERPRET=interpret, BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v,
                  BLOCK_K=cfg.block_k, GROUP_T=cfg.group_t, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    return args, kwargs


def launch_call(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor, config: LaunchConfig | None = None, interpret: bool = False,
                ) -> tuple[KernelVariant, tuple[Any, ...], dict[str, Any]]:
    """The variant and kernel arguments ``fp32_linear_triton`` launches with."""
    T, H = x.shape
    V = weight.shape[0]
    variant = KernelVariant(x.dtype, weight.dtype, config or default_config(T, weight.dtype))
    b = bias if bias is not None else out  # dummy pointer, never read
    strides = (*x.stride(), *weight.stride(), bias.stride(0) if bias is not None else 0,
               *out.stride())
    return variant, *_kernel_call(x, weight, b, out, T, V, H, strides, variant,
                                  bias is not None, interpret)


def warmup_call(variant: KernelVariant, H: int, V: int, has_bias: bool,
                bias_dtype: torch.dtype | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments ``precompile`` passes to ``kernel.warmup`` for ``variant``.

    Tensors are given as dtypes (Triton's warm-up treats them as 16-byte
    aligned tensors); the layouts are the contiguous ones a serving call has:
    ``x`` [T, H], ``weight`` [V, H], ``out`` [T, V], ``bias`` [V].
    """
    b = (bias_dtype or variant.w_dtype) if has_bias else torch.float32
    strides = (H, 1, H, 1, 1 if has_bias else 0, V, 1)
    return _kernel_call(variant.x_dtype, variant.w_dtype, b, torch.float32,
                        variant.config.block_t, V, H, strides, variant, has_bias, interpret=False)


def precompile(device: torch.device | str, x_dtype: torch.dtype, w_dtype: torch.dtype, H: int,
               V: int, has_bias: bool, *, bias_dtype: torch.dtype | None = None,
               ) -> list[KernelVariant]:
    """Compile, without launching, every kernel ``fp32_linear`` can need for this head.

    Why: a first-time Triton compile takes seconds; during serving it would
    stall a decode step.  Call once the head weight is known (after the model
    is loaded), on each worker, for the (activation, weight) dtypes and the
    local ``[V, H]`` shard of the weight it will be called with, when those
    dtypes resolve to the kernel (``impl="triton"``, or ``auto`` with
    ``cuda_auto_route(...) == "triton"``).  Covers the three ``TOKEN_TILES``
    configurations; ``T`` is not specialised, so no batch size compiles
    anything afterwards.  Assumes what vLLM passes: contiguous, 16-byte aligned
    tensors (another layout or alignment compiles once more on first use).
    ``bias_dtype`` defaults to ``w_dtype``.  Returns the variants compiled:
    none off CUDA, under the interpreter, or with ``VLLM_RL_COMPAT_AUTOTUNE=1``
    (the autotuner compiles and times its own configurations on first use).
    """
    device = torch.device(device)
    if device.type != "cuda" or interpreting() or autotune_enabled():
        return []
    kernel = _get_kernel(False, False)
    variants = launch_variants([(x_dtype, w_dtype)])
    with torch.cuda.device(device):
        for variant in variants:
            args, kwargs = warmup_call(variant, H, V, has_bias, bias_dtype)
            kernel.warmup(*args, grid=(1,), **kwargs)
    return variants


def fp32_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       *, config: LaunchConfig | None = None) -> torch.Tensor:
    """Launch the kernel; arguments must already be validated by ``fp32_linear``.

    Any strides are accepted for ``x``, ``weight`` and ``bias`` (they are passed
    to the kernel, nothing is copied); unit stride along H gives coalesced loads.
    """
    T, V = x.shape[0], weight.shape[0]
    out = torch.empty((T, V), dtype=torch.float32, device=x.device)
    if T == 0 or V == 0:
        return out
    interpret = interpreting()
    autotune = config is None and autotune_enabled()
    kernel = _get_kernel(interpret, autotune)
    variant, args, kwargs = launch_call(x, weight, bias, out, config, interpret)
    if autotune:
        for key in ("BLOCK_T", "BLOCK_V", "BLOCK_K", "GROUP_T", "num_warps", "num_stages"):
            del kwargs[key]  # the autotuner supplies them

        def grid(meta):
            return (triton.cdiv(T, meta["BLOCK_T"]) * triton.cdiv(V, meta["BLOCK_V"]),)
        kernel[grid](*args, **kwargs)
        return out
    cfg = variant.config
    kernel[(triton.cdiv(T, cfg.block_t) * triton.cdiv(V, cfg.block_v),)](*args, **kwargs)
    return out
