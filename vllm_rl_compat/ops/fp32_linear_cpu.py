"""CPU fp32 projections from bf16 operands: host wrapper and build of the two kernels.

Why: PyTorch's CPU matmul has no bf16 x bf16 -> fp32 output, so an exact fp32
head otherwise upcasts the weight chunk by chunk on every step
(``fp32_linear_torch``).  Two C++ routes avoid that, one per kind of CPU:

* ``brgemm`` (``csrc/fp32_linear_cpu.cpp``): PyTorch's exported oneDNN
  batch-reduce GEMM micro-kernel (``at::native::cpublas::brgemm``), bf16
  operands and an fp32 accumulator; the weight is read in place as the A
  operand, the tokens VNNI-packed as B.  oneDNN offers it only where it can
  pack bf16 (AMX): ``could_pack(kBFloat16)`` is asked at run time.
* ``blocked`` (``csrc/fp32_linear_blocked.cpp``): any CPU.  Up to 8 token rows
  a fused matrix-vector loop widens each weight row to fp32 in registers
  (AVX2 FMA where present); above that each thread widens a cache-sized block
  of weight rows and calls the BLAS sgemm PyTorch links.

Both are compiled together, once per torch version and source hash, with
``torch.utils.cpp_extension.load`` into ``$VLLM_RL_COMPAT_CACHE/torch_extensions``
(about 20 s, needs a C++ compiler), and loaded from there afterwards.

Precision: bf16 x bf16 products are exact in fp32 and both routes accumulate
in fp32, so the result is the exact dot product rounded only by fp32
accumulation (the same bound as ``fp32_linear_torch``).

Memory: no copy of the weight.  ``brgemm``: per call one packed copy of the
token rows (64 x H bf16) and a 128-256 x 64 fp32 tile per thread.
``blocked``: an fp32 copy of the token rows and one 128 KiB fp32 weight block
per thread.

Fallback: ``available(route)`` is False (``unavailable_reason(route)`` says
why, logged once) where there is no compiler, the build fails, or (brgemm)
oneDNN cannot pack bf16 on this CPU; callers then take the next route
(brgemm -> blocked -> ``fp32_linear_torch``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger("vllm.rl_compat")

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "fp32_linear_cpu.cpp", CSRC / "fp32_linear_blocked.cpp")
# The routes in the order ``auto`` tries them, with what each needs.
ROUTES = {"brgemm": "oneDNN bf16 brgemm, AMX", "blocked": "any CPU"}
# -fopenmp: at::parallel_for is an inline OpenMP region, serial without it. The
# extension then needs libgomp.so.1, which resolves to the copy torch already
# loaded (same soname), so there is one OpenMP runtime and one thread pool.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    from vllm_rl_compat import envs

    content = b"".join(src.read_bytes() for src in SOURCES) + " ".join(CFLAGS + LDFLAGS).encode()
    digest = hashlib.sha256(content).hexdigest()[:12]
    tag = torch.__version__.replace("+", "_")
    return envs.VLLM_RL_COMPAT_CACHE / "torch_extensions" / f"fp32_linear_cpu-{tag}-{digest}"


@functools.lru_cache(maxsize=1)
def build() -> None:
    """Compile (first time) and load the extension; registers ``torch.ops.rl_compat``."""
    from torch.utils.cpp_extension import load

    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    load(name="rl_compat_fp32_linear_cpu", sources=[str(s) for s in SOURCES],
         build_directory=str(target), extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
         is_python_module=False, verbose=False)


@functools.lru_cache(maxsize=None)
def unavailable_reason(route: str = "brgemm") -> str | None:
    """Why ``route`` cannot run here, or ``None`` when it can."""
    if route not in ROUTES:
        raise ValueError(f"unknown CPU route {route!r}; expected one of {tuple(ROUTES)}")
    try:
        build()
    except Exception as exc:  # no compiler, build error, unsupported toolchain
        return f"the build failed ({type(exc).__name__}: {exc})"
    if route == "brgemm" and not torch.ops.rl_compat.bf16_brgemm_supported():
        return "oneDNN cannot pack bf16 for its brgemm micro-kernel on this CPU (it needs AMX)"
    return None


@functools.lru_cache(maxsize=None)
def available(route: str = "brgemm") -> bool:
    """Whether ``route`` can run here; the reason is logged once if not."""
    reason = unavailable_reason(route)
    if reason is not None:  # a CPU without AMX is normal, a broken build is not
        log = logger.warning if reason.startswith("the build failed") else logger.info
        log("vllm-rl-compat: CPU fp32 head route %r unavailable: %s", route, reason)
    return reason is None


def eligible(x: torch.Tensor, weight: torch.Tensor, route: str = "brgemm") -> bool:
    """bf16 x bf16 on CPU with unit stride along H (brgemm: an even, non-zero H too)."""
    ok = (x.device.type == "cpu" and x.dtype == torch.bfloat16
          and weight.dtype == torch.bfloat16 and weight.stride(1) == 1)
    if route == "brgemm":  # VNNI packs pairs along H; an odd H faults inside the AMX kernel
        H = x.shape[1]
        return ok and H > 0 and H % 2 == 0
    return ok


def fp32_linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    *, route: str = "brgemm") -> torch.Tensor:
    """fp32 ``x @ weight.T (+ bias)``; arguments validated by ``fp32_linear``."""
    build()
    if route == "brgemm":
        out = torch.ops.rl_compat.bf16_linear_f32(x.contiguous(), weight)
    else:
        out = torch.ops.rl_compat.bf16_linear_f32_blocked(x, weight)
    return out if bias is None else out.add_(bias.to(torch.float32))
