"""Benchmark: full weight update of SmolLM2-135M (bf16) on CPU, per source.

For each source (in-process tensors, safetensors folder, trainer broadcast
over gloo) it runs R full updates on one offline ``LLM`` and reports the
median pause-to-resume wall time (``WeightSync.last_pause_seconds``: one
transaction of vLLM's RL calls: pause, receive and validate into staging,
apply, version bump, resume) and its
ratio to copying the same number of bytes in memory on this machine
(``torch.Tensor.copy_`` of one flat buffer, median of 10). For the tensors
source the time to write the shared-memory file (before the pause) is
reported separately.

The apply path is ``vllm_rl_compat.weights.apply_cpu`` when the model
qualifies; unless ``--no-layerwise`` is given, a second engine started with
``VLLM_RL_COMPAT_FAST_RELOAD=0`` measures the tensors and files sources again
through vLLM's layerwise reload, in the same run, so the two are compared
under the same machine load.

Run: ``python benchmarks/bench_weight_sync.py [--repeats 5]``; writes
``benchmarks/results/weight_sync_<cpu kind>.md`` with a header naming the
machine (``benchmarks/machine.py``). Not a test.
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
sys.path.insert(0, str(HERE))
import machine  # noqa: E402  (benchmarks/machine.py: the results-file header)


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


def load_state(model: str) -> dict:
    from safetensors.torch import load_file

    from vllm_rl_compat.weights.spec import safetensors_files

    state = {}
    for f in safetensors_files(model):
        state.update(load_file(str(f)))
    return state


def make_engine(model: str):
    from vllm import LLM

    from vllm_rl_compat.weight_sync import WeightSync

    llm = LLM(model=model, dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True)
    return llm, WeightSync(llm)


def timed_updates(sync, fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        fn()
        times.append(sync.last_pause_seconds)
    return times


def apply_path(sync) -> str:
    return "fast_reload" if all(r["fast"] for r in sync.last_apply) else "layerwise reload"


def bench_sources(model: str, state: dict, args, label: str, broadcast: bool
                  ) -> tuple[list[tuple], object]:
    """Rows ``(source, times, notes)`` of one engine; returns them and its sync."""
    from vllm_rl_compat.weights.shm import remove_shm, write_shm

    llm, sync = make_engine(model)
    rows = []
    pairs = list(state.items())
    write_times = []
    for _ in range(3):
        t0 = time.perf_counter()
        remove_shm(write_shm(pairs))
        write_times.append(time.perf_counter() - t0)
    times = timed_updates(sync, lambda: sync.update_from_tensors(state), args.repeats)
    rows.append((f"in-process tensors{label}", times, f"{apply_path(sync)}; + "
                 f"{statistics.median(write_times) * 1e3:.0f} ms shm write before the pause"))
    times = timed_updates(sync, lambda: sync.update_from_files(model), args.repeats)
    rows.append((f"safetensors folder{label}", times, apply_path(sync)))
    if broadcast:
        times = timed_updates(sync, lambda: broadcast_once(sync, model, args), args.repeats)
        rows.append((f"trainer broadcast (gloo){label}", times,
                     f"{apply_path(sync)}; chunks of {args.chunk_mb} MiB; staging "
                     f"{sync.spec.total_bytes / 2**20:.0f} MiB per worker"))
    llm.llm_engine.engine_core.shutdown()
    return rows, sync


def broadcast_once(sync, model: str, args) -> None:
    from vllm_rl_compat.weights.broadcast import new_secret

    port, secret = free_port(), new_secret()
    trainer = subprocess.Popen(
        [sys.executable, str(TRAINER), "127.0.0.1", str(port), str(sync.num_workers),
         model, "ok", "60", str(args.chunk_mb << 20)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TEST_TRAINER_SECRET": secret})
    # Each trainer run joins a fresh group; its start-up (imports, reading
    # the state dict) happens before the pause: connect, then update.
    sync.connect_trainer("127.0.0.1", port, secret=secret, timeout=120)
    sync.update_from_trainer()
    trainer.wait(60)
    sync.disconnect_trainer()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--no-layerwise", action="store_true",
                    help="skip the second engine that measures vLLM's layerwise reload")
    args = ap.parse_args()

    import torch

    from vllm_rl_compat.models import default_model_dir

    model = str(default_model_dir())
    state = load_state(model)
    load_before = machine.load()
    rows, sync = bench_sources(model, state, args, "", broadcast=True)
    if not args.no_layerwise:
        os.environ["VLLM_RL_COMPAT_FAST_RELOAD"] = "0"  # read by the front end at each update
        more, _ = bench_sources(model, state, args, " (layerwise fallback)", broadcast=False)
        rows += more
    nbytes = sync.spec.total_bytes
    copy_s = memcpy_seconds(nbytes)
    lines = [machine.header("Full weight update of SmolLM2-135M on CPU, per source",
                            load_before),
             f"SmolLM2-135M bf16: {nbytes / 2**20:.1f} MiB, {len(state)} tensors; memcpy of "
             f"the same bytes: {copy_s * 1e3:.1f} ms (median of 10); torch "
             f"{torch.__version__}; repeats {args.repeats}; pause-to-resume of one "
             f"transaction (pause, receive and validate into staging, apply, version, "
             f"resume).", "",
             "| source | pause-to-resume median (ms) | min (ms) | ratio to memcpy | notes |",
             "|---|---|---|---|---|"]
    for name, times, extra in rows:
        med = statistics.median(times)
        lines.append(f"| {name} | {med * 1e3:.0f} | {min(times) * 1e3:.0f} | "
                     f"{med / copy_s:.1f}x | {extra} |")
    machine.write_results("weight_sync", lines)

if __name__ == "__main__":
    main()
