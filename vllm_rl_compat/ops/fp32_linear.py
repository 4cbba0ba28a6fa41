"""``fp32_linear``: fp32 logits from a 16-bit or fp32 projection, exactly.

Why: RL importance ratios compare sampler and trainer log-probs, so the
LM-head projection must give the same fp32 logits a trainer computes in fp32,
up to fp32 accumulation error, not bf16-rounded logits.  This is the public
entry point; it validates arguments and dispatches to the Triton kernel
(``fp32_linear_triton``, CUDA), the CPU kernels for bf16 x bf16
(``fp32_linear_cpu``: oneDNN's bf16 brgemm where the CPU has AMX, the
``blocked`` kernel on any other CPU) or the pure-torch path
(``fp32_linear_torch``: cuBLAS on CUDA, chunked upcast on CPU).

``auto`` on CUDA (``cuda_auto_route``, decided per call from the dtypes):
cuBLAS wherever it has an exact fp32 route -- same-dtype operands, i.e.
``torch.mm(x, W.t(), out_dtype=float32)`` for bf16/fp16 (exact products,
fp32 accumulation: what vLLM itself runs for ``head_dtype="float32"``) and an
IEEE-pinned fp32 ``torch.mm`` for fp32 x fp32 (what vLLM runs for an fp32
model) -- and the Triton kernel everywhere else.  cuBLAS has no mixed-dtype
GEMM, so for mixed dtypes, e.g. bf16 activations with an fp32 head
(``fp32_head="weights"``), its only exact route is an IEEE fp32 GEMM on CUDA
cores after upcasting the 16-bit operand (a full fp32 copy of W when that is
the weight; TF32 would round), while the kernel reads both operands in place
and runs its exact bf16 split on tensor cores.  Whether the kernel should
also be the default for bf16 x bf16 is for a GPU run of
``benchmarks/bench_fp32_linear.py`` to show (its ``torch_mm_fp32`` and
``ours_triton`` rows); until then that default is the library vLLM trusts.

Accepted layouts: ``x`` and ``weight`` may have any strides, including
row-strided views such as ``W[::2]`` or a column slice of a wider matrix;
nothing is copied by this wrapper.  Unit stride along H (``stride(1) == 1``)
is what the kernel is tuned for (coalesced loads); other layouts are correct
but slower.
"""

from __future__ import annotations

import torch

from . import fp32_linear_cpu
from .fp32_linear_torch import fp32_linear_torch
from .fp32_linear_triton import SUPPORTED_DTYPES, interpreting

IMPLS = ("auto", "triton", "brgemm", "blocked", "torch")
CPU_ROUTES = fp32_linear_cpu.ROUTES  # in the order ``auto`` tries them


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fp32_linear: {name} has unsupported dtype {t.dtype}; "
                        f"expected one of bfloat16, float16, float32")


def _validate(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              impl: str) -> None:
    """Raise a ValueError/TypeError naming the offending argument."""
    if impl not in IMPLS:
        raise ValueError(f"fp32_linear: impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"fp32_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"fp32_linear: x must be 2-D [T, H], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"fp32_linear: weight must be 2-D [V, H], got shape {tuple(weight.shape)}")
    _check_dtype("x", x)
    _check_dtype("weight", weight)
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"fp32_linear: hidden size mismatch: x has H={x.shape[1]} but weight "
                         f"has H={weight.shape[1]} (weight must be [V, H])")
    if weight.device != x.device:
        raise ValueError(f"fp32_linear: weight is on {weight.device} but x is on {x.device}")
    if bias is not None:
        _check_dtype("bias", bias)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"fp32_linear: bias must have shape [V]=[{weight.shape[0]}], "
                             f"got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"fp32_linear: bias is on {bias.device} but x is on {x.device}")


def cuda_auto_route(x_dtype: torch.dtype, w_dtype: torch.dtype) -> str:
    """What ``auto`` runs on CUDA for these dtypes: ``"torch"`` (cuBLAS) or ``"triton"``.

    A pure function of the dtypes, so the rule is testable without a GPU:
    identical dtypes have an exact cuBLAS call (see the module docstring),
    mixed dtypes go to the kernel's exact bf16 split.
    """
    return "torch" if x_dtype == w_dtype else "triton"


def resolve_impl(impl: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """``auto``: ``cuda_auto_route`` on CUDA; on CPU the first CPU route that applies,
    else torch.  A forced impl is checked against the tensors and returned."""
    if impl == "auto":
        if x.is_cuda:
            return cuda_auto_route(x.dtype, weight.dtype)
        return next((r for r in CPU_ROUTES if _cpu_route_applies(r, x, weight)), "torch")
    if impl == "triton" and not x.is_cuda and not interpreting():
        raise ValueError(f"fp32_linear: impl='triton' needs CUDA tensors (x is on {x.device}) "
                         f"or TRITON_INTERPRET=1 for the CPU interpreter")
    if impl in CPU_ROUTES and not _cpu_route_applies(impl, x, weight):
        even = ", an even H" if impl == "brgemm" else ""
        raise ValueError(f"fp32_linear: impl={impl!r} needs bf16 x and weight on a CPU where "
                         f"the kernel is available{even} and weight.stride(1) == 1 (got x "
                         f"{x.dtype} on {x.device}, weight {weight.dtype} with stride "
                         f"{tuple(weight.stride())}, H={x.shape[1]}, kernel: "
                         f"{fp32_linear_cpu.unavailable_reason(impl) or 'available'})")
    return impl


def _cpu_route_applies(route: str, x: torch.Tensor, weight: torch.Tensor) -> bool:
    return fp32_linear_cpu.eligible(x, weight, route) and fp32_linear_cpu.available(route)


def fp32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                *, impl: str = "auto") -> torch.Tensor:
    """Return fp32 ``x @ weight.T (+ bias)`` of shape ``[T, V]``.

    ``x``: ``[T, H]``; ``weight``: ``[V, H]``; ``bias``: ``[V]`` or None; each
    bf16, fp16 or fp32 (mixed dtypes allowed).  The result is the exact
    product sum rounded only by fp32 accumulation: elementwise
    |err| <= (P*H + 2) * 2**-24 * (|x| @ |w|.T + |b|), with P the kernel's
    part-dot passes (1 for same-dtype or fp32 x fp32, up to 6 for mixed
    dtypes); in practice errors are ~sqrt(H) smaller.  Non-finite inputs: NaN
    propagates; an inf may come out as NaN in mixed-dtype (split) mode.  The
    output is a new contiguous fp32 tensor; inputs are never modified or
    copied whole.
    fp32 matmuls run with IEEE precision even if the process set
    ``torch.set_float32_matmul_precision("high")`` or ``("medium")``.
    ``impl``: "auto" (on CUDA cuBLAS for same-dtype operands, the Triton
    kernel for mixed dtypes; on CPU for bf16 x bf16 brgemm where oneDNN has
    it, else the blocked kernel; torch otherwise), "triton", "brgemm",
    "blocked" or "torch" (cuBLAS on CUDA for same-dtype operands).
    """
    _validate(x, weight, bias, impl)
    resolved = resolve_impl(impl, x, weight)
    if resolved == "triton":
        from .fp32_linear_triton import fp32_linear_triton
        return fp32_linear_triton(x, weight, bias)
    if resolved in CPU_ROUTES:
        return fp32_linear_cpu.fp32_linear_cpu(x, weight, bias, route=resolved)
    return fp32_linear_torch(x, weight, bias)
