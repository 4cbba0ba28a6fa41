"""CPU fp32 projection through oneDNN's bf16 brgemm: host wrapper and build.

Why: on CPU the exact fp32 head otherwise upcasts the bf16 weight chunk by
chunk on every step (``fp32_linear_torch``); PyTorch exports oneDNN's
batch-reduce GEMM micro-kernel (``at::native::cpublas::brgemm``) with bf16
operands and an fp32 accumulator, but not to Python.  ``csrc/fp32_linear_cpu.cpp``
is a ~70-line driver around it (the weight read in place as the A operand, the
tokens VNNI-packed as B); this module compiles it once per torch version and
source hash with ``torch.utils.cpp_extension.load`` into
``$VLLM_RL_COMPAT_CACHE/torch_extensions`` (about 10 s, needs a C++ compiler),
and loads it from there afterwards.

Precision: bf16 x bf16 products are exact in fp32 and the micro-kernel
accumulates in fp32, so the result is the exact dot product rounded only by
fp32 accumulation (the same bound as ``fp32_linear_torch``).

Memory: no copy of the weight; per call one packed copy of the token rows
(64 x H bf16) and a 128-256 x 64 fp32 tile per thread.

Fallback: ``available()`` is False (``unavailable_reason()`` says why, logged
once) when the CPU lacks bf16 brgemm (no AVX512-BF16 / AMX; checked before any
compile), there is no compiler or the build fails; callers then use
``fp32_linear_torch``.  Only bf16 x bf16 with unit stride along H and an
even, non-zero H is handled here (``eligible``; VNNI packs pairs along H, and
an odd H faults inside the AMX kernel).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

import torch

logger = logging.getLogger("vllm.rl_compat")

SOURCE = Path(__file__).with_name("csrc") / "fp32_linear_cpu.cpp"
# -fopenmp: at::parallel_for is an inline OpenMP region, serial without it. The
# extension then needs libgomp.so.1, which resolves to the copy torch already
# loaded (same soname), so there is one OpenMP runtime and one thread pool.
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def build_dir() -> Path:
    from vllm_rl_compat import envs

    flags = " ".join(CFLAGS + LDFLAGS).encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + flags).hexdigest()[:12]
    tag = torch.__version__.replace("+", "_")
    return envs.VLLM_RL_COMPAT_CACHE / "torch_extensions" / f"fp32_linear_cpu-{tag}-{digest}"


@functools.lru_cache(maxsize=1)
def build() -> None:
    """Compile (first time) and load the extension; registers ``torch.ops.rl_compat``."""
    from torch.utils.cpp_extension import load

    target = build_dir()
    target.mkdir(parents=True, exist_ok=True)
    load(name="rl_compat_fp32_linear_cpu", sources=[str(SOURCE)], build_directory=str(target),
         extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, is_python_module=False, verbose=False)


def cpu_has_bf16_dot() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.lru_cache(maxsize=1)
def unavailable_reason() -> str | None:
    """Why the brgemm path cannot run here, or ``None`` when it can.

    The CPU is checked first, so machines without bf16 dot-product
    instructions never pay for the compile."""
    if not cpu_has_bf16_dot():
        return "this CPU has no bf16 dot-product instructions (AVX512-BF16 or AMX)"
    try:
        build()
    except Exception as exc:  # no compiler, build error, unsupported toolchain
        return f"the build failed ({type(exc).__name__}: {exc})"
    if not torch.ops.rl_compat.bf16_brgemm_supported():
        return "oneDNN reports no bf16 brgemm on this CPU"
    return None


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the brgemm path can run here; the reason is logged once if not."""
    reason = unavailable_reason()
    if reason is not None:  # a missing CPU feature is normal, a broken build is not
        log = logger.warning if cpu_has_bf16_dot() else logger.info
        log("vllm-rl-compat: CPU fp32 head kernel unavailable: %s; "
            "using the chunked torch path", reason)
    return reason is None


def eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """bf16 x bf16 on CPU, unit stride and even size along H: what the kernel takes."""
    H = x.shape[1]
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and weight.stride(1) == 1
            and H > 0 and H % 2 == 0)


def fp32_linear_cpu(x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``x @ weight.T (+ bias)``; arguments validated by ``fp32_linear``."""
    build()
    out = torch.ops.rl_compat.bf16_linear_f32(x.contiguous(), weight)
    return out if bias is None else out.add_(bias.to(torch.float32))

