"""Benchmark fp32 LM-head projections: time, transient memory and accuracy.

Providers (activations in the model dtype, bf16 unless ``--act-dtype``):

* ``torch_bf16``     F.linear in the model dtype (bf16 logits; the speed floor, not exact)
* ``torch_upcast``   F.linear(x.float(), W.float()) -- vLLM's CPU fallback (full fp32 copy of W)
* ``ours_brgemm``    fp32_linear(impl="brgemm"): CPU, bf16 x bf16, oneDNN brgemm with fp32
                     accumulation (skipped on CUDA, for other dtypes, odd H, or
                     where oneDNN has no bf16 brgemm: it needs AMX)
* ``ours_blocked``   fp32_linear(impl="blocked"): CPU, bf16 x bf16, any CPU: fused
                     matrix-vector loop up to 8 rows, cache-blocked sgemm above
                     (skipped on CUDA, for other dtypes, or without a compiler)
* ``ours_torch``     fp32_linear(impl="torch"): chunked upcast (+ exact oneDNN bf16 path on CPU);
                     on CUDA the same cuBLAS call as ``torch_mm_fp32`` for same-dtype operands
* ``torch_mm_fp32``  cuBLAS: torch.mm(x, W.t(), out_dtype=float32) for bf16/fp16 (vLLM's CUDA
                     path for head_dtype=float32), an IEEE-pinned fp32 torch.mm for fp32 x fp32:
                     what ``fp32_linear(impl="auto")`` runs on CUDA for same-dtype operands.
                     Not applicable ("n/a") off CUDA or for mixed dtypes (cuBLAS has no
                     exact mixed-dtype GEMM; there ``auto`` uses the kernel)
* ``ours_triton``    fp32_linear(impl="triton"); on a machine without CUDA only a tiny
                     interpreter smoke run (T <= 16, first 128 vocab rows), not a timing

The two last columns sit side by side so that one GPU run decides whether the
Triton kernel should also be ``auto``'s choice for bf16 x bf16: the CUDA
results file has a "Triton kernel vs cuBLAS" table (time ratio per shape/T).

On CUDA, times come from ``triton.testing.do_bench`` and memory from the
``torch.cuda.max_memory_allocated`` delta minus the fp32 output.  On CPU, times
are medians of ``time.perf_counter`` repeats and memory is *analytic* (bytes of
the temporaries each provider allocates, output excluded).  Accuracy: max over
the first ``--err-rows`` vocab rows of |out - fp64 ref| / (|x| @ |w|.T) (the
quantity the fp32 bound is stated in; 2**-24 = 6e-8).

Usage: python benchmarks/bench_fp32_linear.py [--quick] [--shapes 576x49152,...]
       [--tokens 1,8,64] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py: the results-file header)

from vllm_rl_compat.ops import fp32_linear, fp32_linear_cpu  # noqa: E402
from vllm_rl_compat.ops.fp32_linear_torch import (  # noqa: E402
    DEFAULT_CHUNK_ROWS,
    ieee_fp32_matmul,
)

PROVIDERS = ("torch_bf16", "torch_upcast", "ours_brgemm", "ours_blocked", "ours_torch",
             "torch_mm_fp32", "ours_triton")
CPU_ROUTES = {"ours_brgemm": "brgemm", "ours_blocked": "blocked"}
DEFAULT_SHAPES = ((576, 49152), (3584, 152064), (4096, 128256))
DEFAULT_TOKENS = (1, 8, 64, 512, 4096)
CPU_MAX_TOKENS_BIG = 512  # CPU default: skip T=4096 on the ~0.5B-parameter heads
SMOKE_T, SMOKE_ROWS = 16, 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    """One (shape, T, provider) measurement, as written to CSV."""

    H: int
    V: int
    T: int
    provider: str
    status: str  # ok | skipped | n/a (provider does not exist here) | interpreter-smoke
    time_ms: float = float("nan")
    extra_mib: float = float("nan")
    mem_method: str = ""
    max_rel_err: float = float("nan")
    note: str = field(default="")


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", type=_parse_shapes, default=None, help="HxV list, e.g. 576x49152")
    p.add_argument("--tokens", type=lambda s: [int(t) for t in s.split(",")], default=None)
    p.add_argument("--quick", action="store_true", help="first shape, T in {1, 64}, 1 repeat")
    p.add_argument("--all-tokens", action="store_true", help="on CPU also run T=4096 on big heads")
    p.add_argument("--weight-dtype", choices=DTYPES, default="bf16")
    p.add_argument("--act-dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeats", type=int, default=5, help="max timed repeats on CPU")
    p.add_argument("--err-rows", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--name", default=None, help="output file stem (default fp32_linear_<device>)")
    return p.parse_args(argv)


def _time_cpu(fn: Callable[[], object], repeats: int, budget_s: float = 3.0) -> float:
    """Median wall time in ms of up to ``repeats`` runs after one warm-up."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max(1, repeats) and (len(times) < 1 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cuda(fn: Callable[[], object]) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def _cuda_extra_mib(fn: Callable[[], torch.Tensor]) -> float:
    """Peak allocation during ``fn`` beyond what was live before, minus its output."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return (peak - out.numel() * out.element_size()) / 2**20


def _analytic_extra_mib(provider: str, T: int, H: int, V: int, xd: torch.dtype,
                        wd: torch.dtype) -> float:
    """Temporaries each provider allocates on CPU (output excluded)."""
    x32 = 0 if xd == torch.float32 else T * H * 4
    if provider == "torch_upcast":
        return (x32 + (0 if wd == torch.float32 else V * H * 4)) / 2**20
    if provider == "ours_torch":
        chunk = min(DEFAULT_CHUNK_ROWS, V)
        return (x32 + chunk * H * 4) / 2**20
    if provider == "ours_brgemm":  # packed tokens (2 copies) + one fp32 tile per thread
        tokens = min(T, 64)
        return (2 * tokens * H * 2 + torch.get_num_threads() * 256 * tokens * 4) / 2**20
    if provider == "ours_blocked":  # fp32 tokens + one 128 KiB weight block per thread
        return (x32 + torch.get_num_threads() * 128 * 1024) / 2**20
    return 0.0


def _max_rel_err(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rows: int) -> float:
    """max |out - ref| / (|x| @ |w|.T) over the first ``rows`` vocab rows, in fp64."""
    w_s = w[:rows].double()
    ref = x.double() @ w_s.T
    mag = (x.double().abs() @ w_s.abs().T).clamp_min(1e-300)
    return ((out[:, :rows].double() - ref).abs() / mag).max().item()


def _cublas_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The exact cuBLAS call for same-dtype operands (what ``auto`` runs on CUDA)."""
    if x.dtype == torch.float32:
        with ieee_fp32_matmul(x.device):
            return torch.mm(x, w.t())
    return torch.mm(x, w.t(), out_dtype=torch.float32)


def _provider_fn(name: str, x: torch.Tensor, w: torch.Tensor) -> Callable[[], torch.Tensor]:
    fns: dict[str, Callable[[], torch.Tensor]] = {
        "torch_bf16": lambda: F.linear(x, w.to(x.dtype)),
        "torch_upcast": lambda: F.linear(x.float(), w.float()),
        "torch_mm_fp32": lambda: _cublas_fp32(x, w),
        "ours_brgemm": lambda: fp32_linear(x, w, impl="brgemm"),
        "ours_blocked": lambda: fp32_linear(x, w, impl="blocked"),
        "ours_torch": lambda: fp32_linear(x, w, impl="torch"),
        "ours_triton": lambda: fp32_linear(x, w, impl="triton"),
    }
    return fns[name]


def _run_provider(name: str, x: torch.Tensor, w: torch.Tensor, args: argparse.Namespace) -> Row:
    T, H, V = x.shape[0], x.shape[1], w.shape[0]
    on_cuda = x.is_cuda
    if name == "torch_mm_fp32" and (not on_cuda or x.dtype != w.dtype):
        why = "CUDA only" if not on_cuda else "no exact mixed-dtype cuBLAS GEMM"
        return Row(H, V, T, name, "n/a", note=f"cuBLAS torch.mm(out_dtype=fp32): {why} "
                   f"({x.device.type}, {x.dtype}x{w.dtype})")
    route = CPU_ROUTES.get(name)
    if route and not (fp32_linear_cpu.eligible(x, w, route) and fp32_linear_cpu.available(route)):
        return Row(H, V, T, name, "skipped", note=f"{route} needs bf16 x bf16 on CPU"
                   f"{', an even H' if route == 'brgemm' else ''} and the kernel "
                   f"({x.device.type}, {x.dtype}x{w.dtype}, H={H}; kernel: "
                   f"{fp32_linear_cpu.unavailable_reason(route) or 'ready'})")
    if name == "ours_triton" and not on_cuda:
        return _triton_smoke(x, w, args)
    fn = _provider_fn(name, x, w)
    out = fn()
    err = _max_rel_err(out, x, w, args.err_rows)
    del out
    if on_cuda:
        return Row(H, V, T, name, "ok", _time_cuda(fn), _cuda_extra_mib(fn), "cuda-peak", err)
    ms = _time_cpu(fn, args.repeats)
    return Row(H, V, T, name, "ok", ms, _analytic_extra_mib(name, T, H, V, x.dtype, w.dtype),
               "analytic", err)


def _triton_smoke(x: torch.Tensor, w: torch.Tensor, args: argparse.Namespace) -> Row:
    """No CUDA: one interpreter launch on a tiny slice, to show the path runs and is exact."""
    xs, ws = x[:SMOKE_T], w[:SMOKE_ROWS]
    t0 = time.perf_counter()
    out = fp32_linear(xs, ws, impl="triton")
    ms = (time.perf_counter() - t0) * 1e3
    err = _max_rel_err(out, xs, ws, args.err_rows)
    return Row(x.shape[1], w.shape[0], x.shape[0], "ours_triton", "interpreter-smoke", ms, 0.0,
               "none (kernel allocates nothing)", err,
               note=f"TRITON_INTERPRET on [{xs.shape[0]}x{xs.shape[1]}] x [{ws.shape[0]} rows]")


def _plan(args: argparse.Namespace, on_cuda: bool) -> list[tuple[int, int, list[int]]]:
    shapes = args.shapes or list(DEFAULT_SHAPES)
    tokens = args.tokens or list(DEFAULT_TOKENS)
    if args.quick:
        shapes, tokens = shapes[:1], (args.tokens or [1, 64])
        args.repeats = 1
    plan = []
    for H, V in shapes:
        ts = tokens
        if not on_cuda and not args.all_tokens and args.tokens is None and H * V > 1e8:
            ts = [t for t in tokens if t <= CPU_MAX_TOKENS_BIG]
        plan.append((H, V, ts))
    return plan


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} CPUs visible, torch threads={torch.get_num_threads()})"


def _fmt(v: float, digits: int = 2) -> str:
    return "n/a" if v != v else f"{v:.{digits}f}"


def _pivot(rows: list[Row], key: Callable[[Row], str]) -> list[str]:
    lines = ["| H x V | T | " + " | ".join(PROVIDERS) + " |",
             "|---|---:|" + "---:|" * len(PROVIDERS)]
    cells: dict[tuple[int, int, int], dict[str, str]] = {}
    for r in rows:
        cells.setdefault((r.H, r.V, r.T), {})[r.provider] = key(r)
    for (H, V, T), c in cells.items():
        lines.append(f"| {H} x {V} | {T} | " + " | ".join(c.get(p, "") for p in PROVIDERS) + " |")
    return lines


def _triton_vs_cublas(rows: list[Row]) -> list[str]:
    """Time of the Triton kernel over cuBLAS per shape/T, where both were timed (CUDA).

    ``auto`` takes cuBLAS for same-dtype operands; ratios below 1 across the
    token counts that matter are the case for making the kernel the default.
    """
    times = {(r.H, r.V, r.T, r.provider): r.time_ms for r in rows if r.status == "ok"}
    lines = [f"| {H} x {V} | {T} | {times[(H, V, T, 'ours_triton')] / ms:.2f} |"
             for (H, V, T, p), ms in times.items()
             if p == "torch_mm_fp32" and (H, V, T, "ours_triton") in times]
    if not lines:
        return []
    return ["", "## Triton kernel vs cuBLAS (time ours_triton / torch_mm_fp32; < 1: kernel faster)",
            "", "| H x V | T | ratio |", "|---|---:|---:|"] + lines


def _markdown(rows: list[Row], header: dict[str, str]) -> str:
    def time_cell(r: Row) -> str:
        return {"ok": _fmt(r.time_ms), "skipped": "skipped", "n/a": "n/a"}.get(r.status,
                                                                              "interp\u2020")

    def mem_cell(r: Row) -> str:
        if r.status in ("skipped", "n/a"):
            return ""
        return _fmt(r.extra_mib, 1) if r.status == "ok" else "0 (kernel)"

    def err_cell(r: Row) -> str:
        return f"{r.max_rel_err:.1e}" if r.status not in ("skipped", "n/a") else ""

    out = ["# fp32_linear benchmark", ""]
    out += [f"- {k}: {v}" for k, v in header.items()]
    out += ["", "## Median time per call (ms)", ""] + _pivot(rows, time_cell)
    out += ["", "## Extra memory per call (MiB, output excluded; method: "
            + ("CUDA peak-allocation delta" if header["device type"] == "cuda"
               else "analytic size of temporaries") + ")", ""] + _pivot(rows, mem_cell)
    out += ["", "## Max error / (|x| @ |w|.T), first rows of the vocabulary (fp32 eps = 6.0e-08)",
            ""] + _pivot(rows, err_cell)
    out += _triton_vs_cublas(rows)
    notes = sorted({f"- {r.provider}: {r.note}" for r in rows
                    if r.note and r.status in ("skipped", "n/a")})
    smoke = [r for r in rows if r.status == "interpreter-smoke"]
    if smoke:
        notes.append(f"- \u2020 ours_triton: no CUDA device, so only an interpreter smoke run "
                     f"({smoke[0].note}); it checks the kernel runs and is exact, its time "
                     f"({min(r.time_ms for r in smoke):.0f}-{max(r.time_ms for r in smoke):.0f} ms "
                     "for the slice) says nothing about GPU speed. GPU figures come from running "
                     "this script on a GPU.")
    return "\n".join(out + ["", "## Notes", ""] + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``<stem>.json`` and ``<stem>.md`` into ``--out``."""
    args = _parse_args(argv)
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    if not on_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read at the kernel's first launch
    import triton
    xd, wd = DTYPES[args.act_dtype], DTYPES[args.weight_dtype]
    rows: list[Row] = []
    t_start, load_before = time.perf_counter(), machine.load()
    for H, V, tokens in _plan(args, on_cuda):
        g = torch.Generator(device="cpu").manual_seed(H + V)
        w = (torch.randn(V, H, generator=g) * H**-0.5).to(device=device, dtype=wd)
        for T in tokens:
            x = torch.randn(T, H, generator=g).to(device=device, dtype=xd)
            for name in PROVIDERS:
                rows.append(_run_provider(name, x, w, args))
                r = rows[-1]
                print(f"{H}x{V} T={T:<5} {name:<14} {r.status:<17} {_fmt(r.time_ms):>10} ms  "
                      f"extra {_fmt(r.extra_mib, 1):>8} MiB  err {r.max_rel_err:.1e}", flush=True)
        del w
    header = {
        **machine.header_fields(load_before),
        "device": _device_name(device), "device type": device.type,
        "torch": torch.__version__, "triton": triton.__version__,
        "dtypes": f"activations {args.act_dtype}, weight {args.weight_dtype}",
        "wall time": f"{time.perf_counter() - t_start:.0f} s",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"fp32_linear_{device.type if on_cuda else machine.cpu_kind()}"
    # The raw rows carry the same header as the table (commit, CPU kind, load).
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"header": header, "results": [asdict(r) for r in rows]}, indent=1))
    (args.out / f"{stem}.md").write_text(_markdown(rows, header))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
