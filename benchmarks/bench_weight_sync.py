"""Benchmark: full weight update of SmolLM2-135M (bf16) on CPU, per source.

For each source (in-process tensors, safetensors folder, trainer broadcast
over gloo) it runs R full updates on one offline ``LLM`` and reports the
median pause-to-resume wall time (``WeightSync.last_pause_seconds``: pause,
stage, apply through vLLM's layerwise reload, version bump, resume) and its
ratio to copying the same number of bytes in memory on this machine
(``torch.Tensor.copy_`` of one flat buffer, median of 10). For the tensors
source the time to write the shared-memory file (before the pause) is
reported separately.

Run: ``VLLM_RL_COMPAT=1 python benchmarks/bench_weight_sync.py [--repeats 5]``
(prints a markdown table; not a test).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_RL_COMPAT", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

HERE = Path(__file__).resolve().parent
TRAINER = HERE.parent / "tests" / "weight_sync_trainer.py"


def memcpy_seconds(nbytes: int, repeats: int = 10) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-mb", type=int, default=64)
    args = ap.parse_args()

    import torch
    from safetensors.torch import load_file
    from vllm import LLM

    from vllm_rl_compat.models import default_model_dir
    from vllm_rl_compat.weight_sync import WeightSync, _remove_shm, _write_shm, safetensors_files

    model = str(default_model_dir())
    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True)
    sync = WeightSync(llm)
    state = {}
    for f in safetensors_files(model):
        state.update(load_file(str(f)))
    nbytes = sync.spec.total_bytes
    copy_s = memcpy_seconds(nbytes)
    rows = []

    def run(name: str, fn, extra: str = "") -> None:
        times = []
        for _ in range(args.repeats):
            fn()
            times.append(sync.last_pause_seconds)
        med = statistics.median(times)
        rows.append((name, med, min(times), med / copy_s, extra))

    pairs = list(state.items())
    write_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        _remove_shm(_write_shm(pairs))
        write_times.append(time.perf_counter() - t0)
    run("in-process tensors", lambda: sync.update_from_tensors(state),
        f"+ {statistics.median(write_times) * 1e3:.0f} ms shm write before the pause")
    run("safetensors folder", lambda: sync.update_from_files(model))

    port = free_port()
    trainers = []

    def bcast() -> None:
        trainers.append(subprocess.Popen(
            [sys.executable, str(TRAINER), "127.0.0.1", str(port), str(sync.num_workers),
             model, "ok", "60", str(args.chunk_mb << 20)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # Each trainer run joins a fresh group; its start-up (imports, reading
        # the state dict) happens before the pause: connect, then update.
        sync.connect_trainer("127.0.0.1", port, timeout=120)
        sync.update_from_trainer()
        trainers[-1].wait(60)
        sync.disconnect_trainer()

    run("trainer broadcast (gloo)", bcast, f"chunks of {args.chunk_mb} MiB; staging "
        f"{nbytes / 2**20:.0f} MiB per worker")
    print(f"\nSmolLM2-135M bf16: {nbytes / 2**20:.1f} MiB, {len(state)} tensors; "
          f"memcpy of the same bytes: {copy_s * 1e3:.1f} ms (median of 10); "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, repeats {args.repeats}\n")
    print("| source | pause-to-resume median (ms) | min (ms) | ratio to memcpy | notes |")
    print("|---|---|---|---|---|")
    for name, med, mn, ratio, extra in rows:
        print(f"| {name} | {med * 1e3:.0f} | {mn * 1e3:.0f} | {ratio:.1f}x | {extra} |")
    llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
