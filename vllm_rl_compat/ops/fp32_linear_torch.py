"""Pure-torch fp32 projection: reference and fallback for ``fp32_linear``.

Why: vLLM's CPU fallback for fp32 logits is ``F.linear(x.float(), W.float())``,
which materialises a full fp32 copy of the (vocab x hidden) weight on every
call (2.2 GB for a 152k x 3584 head).  Here the weight is upcast in chunks of
vocabulary rows, each written into a preallocated fp32 output, so the
transient memory is ``chunk_rows * H * 4`` bytes (+ one fp32 copy of ``x``).

Precision: every path computes in fp32 from exactly-upcast operands, so the
result carries only fp32 rounding (for 16-bit x 16-bit operands the products
are exact and only the accumulation rounds).

* CUDA, same-dtype operands: one cuBLAS call, ``torch.mm(..., out_dtype=
  torch.float32)`` for 16-bit operands (fp32 accumulation and output), a plain
  fp32 ``torch.mm`` for fp32 x fp32; no copy of W at all.
* CPU, bf16 x bf16, T >= FAST_PATH_MIN_TOKENS (``bf16_fast_path=True``): the
  fp32 chunks hold bf16 values,
  so letting oneDNN run the fp32 matmul with ``fp32_precision="bf16"`` is exact
  (converting them back to bf16 loses nothing, and oneDNN's bf16 kernels
  accumulate in fp32); tests verify this against fp64.  Never used when either
  operand has bits below bf16 precision.

IEEE pin: every other fp32 matmul here runs inside ``ieee_fp32_matmul``, which
sets the device's matmul backend to ``fp32_precision="ieee"`` for the duration
of the call.  The process may have asked for less --
``VLLM_FLOAT32_MATMUL_PRECISION=high``/``medium`` makes vLLM call
``torch.set_float32_matmul_precision``, i.e. TF32 in cuBLAS and TF32/bf16 in
oneDNN -- and that would silently round the operands of the head's fp32
matmul to 10 or 8 significand bits.  The pin is scoped, not global, so the
rest of the model keeps the precision the user chose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

DEFAULT_CHUNK_ROWS = 4096
# Below this many tokens the matmul is a memory-bound matrix-vector product and
# oneDNN's extra fp32->bf16 reorder of each chunk costs more than it saves
# (measured on a shared 2-core AMX Xeon; noisy, so a coarse threshold).
FAST_PATH_MIN_TOKENS = 16


@contextlib.contextmanager
def _backend_fp32_precision(backend: Any, precision: str) -> Iterator[None]:
    """Temporarily set ``backend.fp32_precision`` (a ``torch.backends`` matmul flag).

    The setting is process-global; keep the scope tight and restore it even on
    error so unrelated fp32 matmuls never run with a precision they did not ask for.
    """
    previous = backend.fp32_precision
    backend.fp32_precision = precision
    try:
        yield
    finally:
        backend.fp32_precision = previous


def mkldnn_fp32_precision(precision: str) -> contextlib.AbstractContextManager[None]:
    """Temporarily set ``torch.backends.mkldnn.matmul.fp32_precision`` (CPU, oneDNN)."""
    return _backend_fp32_precision(torch.backends.mkldnn.matmul, precision)


def ieee_fp32_matmul(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Pin IEEE fp32 matmuls on ``device`` for the scope, whatever the process set.

    ``torch.set_float32_matmul_precision("high"/"medium")`` (vLLM's
    ``VLLM_FLOAT32_MATMUL_PRECISION``) sets ``torch.backends.cuda.matmul`` to
    TF32 and ``torch.backends.mkldnn.matmul`` to TF32/bf16; the per-backend
    ``fp32_precision="ieee"`` overrides it.  Other devices: no such flag, no-op.
    """
    backend = _IEEE_BACKENDS.get(device.type)
    if backend is None:
        return contextlib.nullcontext()
    return _backend_fp32_precision(backend, "ieee")


_IEEE_BACKENDS: dict[str, Any] = {"cpu": torch.backends.mkldnn.matmul,
                                  "cuda": torch.backends.cuda.matmul}


def _use_cuda_direct_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CUDA + identical dtypes: one cuBLAS call gives the fp32 result, no copy of W."""
    return x.is_cuda and x.dtype == weight.dtype


def _use_bf16_fast_path(x: torch.Tensor, weight: torch.Tensor, enabled: bool) -> bool:
    """CPU bf16 x bf16 only: fp32 values holding bf16 numbers round-trip exactly."""
    return (enabled and x.device.type == "cpu" and x.shape[0] >= FAST_PATH_MIN_TOKENS
            and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and torch.backends.mkldnn.is_available())


def _chunked_fp32_mm(x32: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                     chunk_rows: int) -> None:
    """out[:, v0:v1] = x32 @ fp32(weight[v0:v1]).T, chunk by chunk.

    One fp32 chunk buffer (chunk_rows x H) is reused for every chunk, so large
    allocations (and their page faults) happen once per call; the product is
    written straight into the strided output slice (BLAS takes ldc = V).
    """
    V, H = weight.shape
    buf = torch.empty((min(chunk_rows, V), H), dtype=torch.float32, device=weight.device)
    for v0 in range(0, V, chunk_rows):
        v1 = min(v0 + chunk_rows, V)
        chunk = buf[: v1 - v0]
        chunk.copy_(weight[v0:v1])
        torch.mm(x32, chunk.t(), out=out[:, v0:v1])


def fp32_linear_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      bf16_fast_path: bool = True) -> torch.Tensor:
    """fp32 logits ``x @ weight.T + bias`` without a full fp32 copy of ``weight``.

    Arguments must already be validated by ``fp32_linear``; any strides are
    accepted (slicing rows of a strided view never copies more than a chunk).
    ``bf16_fast_path=False`` forces plain IEEE fp32 matmuls on CPU.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    T, V = x.shape[0], weight.shape[0]
    if _use_cuda_direct_mm(x, weight):
        with ieee_fp32_matmul(x.device):  # matters for fp32 x fp32 (TF32 otherwise)
            if x.dtype == torch.float32:
                out = torch.mm(x, weight.t())
            else:
                out = torch.mm(x, weight.t(), out_dtype=torch.float32)
        return out if bias is None else out.add_(bias.to(torch.float32))
    out = torch.empty((T, V), dtype=torch.float32, device=x.device)
    if T == 0 or V == 0:
        return out
    x32 = x.to(torch.float32)
    if _use_bf16_fast_path(x, weight, bf16_fast_path):
        with mkldnn_fp32_precision("bf16"):  # exact by construction, see the module doc
            _chunked_fp32_mm(x32, weight, out, chunk_rows)
    else:
        with ieee_fp32_matmul(x.device):
            _chunked_fp32_mm(x32, weight, out, chunk_rows)
    # Bias is added outside the reduced-precision scope: it may be genuine fp32.
    return out if bias is None else out.add_(bias.to(torch.float32))
