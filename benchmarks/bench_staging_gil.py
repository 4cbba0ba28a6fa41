"""Benchmark: what a staging thread costs the engine thread in one worker process.

Why: overlapped weight staging (``weights/staging.py``) runs in a thread of
the worker process, on a spare core where there is one, while the engine
thread runs the model. Steps overlapping staging run slower
(``bench_weight_sync.py``: the stall is in the step's run, not in the wait
before it). Two threads of one process share the GIL: every op the engine
thread calls returns into Python and must take the GIL back. This script
separates the causes without vLLM: an engine-thread loop shaped like a
SmolLM2-135M decode step (30 layers of bf16 linears and elementwise ops,
32 tokens, one torch thread, on the first CPU) runs alone and beside a
staging thread placed exactly like the product's
(``staging._staging_thread_setup``: the other cores) doing:

* ``copies``: 1 MiB ``copy_`` calls (the GIL is released inside each);
* ``copies + Python``: the same with ``--python-ms`` of pure Python before
  each copy (vLLM's ``load_weights`` spends about 0.6 ms of Python per
  tensor on SmolLM2 around its copies);
* ``Python only``: pure Python, the upper bound;
* ``copies from DRAM``: 1 MiB ``copy_`` calls walking through a 256 MiB source
  into a 256 MiB destination (a real update's bytes do not fit in a cache: this
  one competes with the step for memory bandwidth, not only for the GIL);
* ``copies into fresh pages``: the same, into a destination allocated anew
  for every pass and freed after it, as a staging shadow is (first-touch page
  faults, then the unmapping of 256 MiB, in the kernel, beside the step);

each also at 0.5, 0.1 and 0.02 ms switch intervals (``sys.setswitchinterval``; default
5 ms). Reported: the engine loop's median step, its ratio to alone, and how
many MiB/s the staging thread moved. Rounds interleave the configurations
and medians are taken: this VM's step time drifts by 10-20 %.

Run: ``python benchmarks/bench_staging_gil.py``; writes
``benchmarks/results/staging_gil_<cpu kind>.md``. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import machine  # noqa: E402  (benchmarks/machine.py: the results-file header)

HIDDEN, INTER, LAYERS, TOKENS = 576, 1536, 30, 32  # SmolLM2-135M, a decode batch
CHUNK = 1 << 19  # bf16 elements: 1 MiB
DRAM_BYTES = 256 << 20  # the size of SmolLM2-135M's weights in bf16


class DecodeLoop:
    """The engine thread's work: one decode-shaped step per ``step()``."""

    def __init__(self) -> None:
        shapes = [(3 * HIDDEN, HIDDEN), (HIDDEN, HIDDEN), (2 * INTER, HIDDEN), (HIDDEN, INTER)]
        self.layers = [[torch.randn(s, dtype=torch.bfloat16) for s in shapes]
                       for _ in range(LAYERS)]
        self.x = torch.randn(TOKENS, HIDDEN, dtype=torch.bfloat16)

    def step(self) -> torch.Tensor:
        linear, x = torch.nn.functional.linear, self.x
        for qkv, o, gate_up, down in self.layers:
            x = x + linear(linear(x, qkv)[:, :HIDDEN], o)
            g = linear(x, gate_up)
            x = x + linear(torch.nn.functional.silu(g[:, :INTER]) * g[:, INTER:], down)
            x = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype)
        return x

    def median_ms(self, steps: int) -> float:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3


def _python(ms: float) -> None:
    end = time.thread_time() + ms / 1e3
    while time.thread_time() < end:
        sum(range(200))


class Staging:
    """A background thread placed like the product's staging thread."""

    def __init__(self, kind: str, python_ms: float, switch_s: float, compute: set[int]) -> None:
        self.kind, self.python_ms, self.switch_s = kind, python_ms, switch_s
        self.compute, self.moved, self.stop = compute, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from vllm_rl_compat.weights.worker.staging import _staging_thread_setup

        _staging_thread_setup(self.compute)
        big = self.kind in ("copies from DRAM", "copies into fresh pages")
        slices = DRAM_BYTES // (2 * CHUNK) if big else 1
        src = torch.randn(slices * CHUNK, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        i = 0
        while not self.stop.is_set():
            if self.kind == "copies into fresh pages" and i % slices == 0:
                dst = None  # the previous pass's pages are unmapped here
                dst = torch.empty_like(src)
            if self.kind == "Python only":
                _python(1.0)
                continue
            if self.kind == "copies + Python":
                _python(self.python_ms)
            at = (i % slices) * CHUNK
            dst[at:at + CHUNK].copy_(src[at:at + CHUNK])
            self.moved, i = self.moved + 1, i + 1

    def __enter__(self) -> "Staging":
        self.previous = sys.getswitchinterval()
        sys.setswitchinterval(self.switch_s)
        self.t0 = time.perf_counter()
        self.thread.start()
        time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.mib_s = self.moved / (time.perf_counter() - self.t0)
        sys.setswitchinterval(self.previous)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="engine-loop steps per measure")
    ap.add_argument("--rounds", type=int, default=3, help="measures per configuration")
    ap.add_argument("--python-ms", type=float, default=0.6,
                    help="pure Python per 1 MiB copy in the 'copies + Python' load")
    args = ap.parse_args()

    load_before = machine.load()
    first = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {first})  # the engine thread: one core, one torch thread
    torch.set_num_threads(1)
    loop = DecodeLoop()
    loop.median_ms(2)  # warm-up
    configs = [(kind, switch_s) for kind in ("copies", "copies + Python", "Python only")
               for switch_s in (0.005, 0.0005, 0.0001, 0.00002)] + [
                   ("copies from DRAM", 0.0001), ("copies into fresh pages", 0.0001)]
    measured: dict[tuple[str, float], list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):  # rounds interleave the configurations: drift hits all
        for kind, switch_s in configs:
            alone = loop.median_ms(args.steps)
            with Staging(kind, args.python_ms, switch_s, {first}) as staging:
                beside = loop.median_ms(args.steps)
            measured.setdefault((kind, switch_s), []).append((alone, beside, staging.mib_s))
            print(kind, switch_s, round(alone), round(beside), flush=True)
    rows = []
    for (kind, switch_s), runs in measured.items():
        med = [statistics.median(r[i] for r in runs) for i in range(3)]
        ratio = statistics.median(b / a for a, b, _ in runs)
        rows.append(f"| {kind} | {switch_s * 1e3:g} | {med[0]:.0f} | {med[1]:.0f} | "
                    f"{ratio:.2f}x | {med[2]:.0f} |")
    spare = sorted(set(range(os.cpu_count() or 1)) - {first})
    lines = [machine.header("A staging thread beside the engine thread: the GIL, not the "
                            "cores", load_before),
             f"Engine thread: a SmolLM2-135M-shaped decode step ({LAYERS} layers of bf16 "
             f"linears and elementwise ops, {TOKENS} tokens, 1 torch thread) on CPU {first}; "
             f"staging thread on CPUs {spare} (the product's placement); "
             f"median step of {args.steps} alone (just before) and of {args.steps} beside "
             f"the staging load, {args.rounds} rounds over all configurations, medians "
             f"(ratio: median of the per-round ratios); 'copies + Python' = "
             f"{args.python_ms} ms of pure Python per 1 MiB copy; torch {torch.__version__}.",
             "", *machine.table(["staging load", "switch interval ms", "step alone ms",
                                 "step beside ms", "ratio", "staging MiB/s"], rows)]
    machine.write_results("staging_gil", lines)


if __name__ == "__main__":
    main()
