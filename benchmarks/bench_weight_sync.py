"""Benchmark: full weight updates of SmolLM2-135M (bf16) on CPU under load.

One ``AsyncLLM`` keeps ``--streams`` streaming requests decoding the whole
time (a finished request is replaced at once). For each source (in-process
tensors, a safetensors folder, a trainer broadcast over gloo) and each
staging mode (``overlapped``: staged beside the live weights while decoding,
swapped between two engine steps by the engine core, no pause,
``weights.engine_core.commit``; ``overlapped, copy plan``: the same, replaying the
copy plan recorded from a first, unmeasured update instead of running vLLM's
``load_weights``; ``overlapped, kept copy``: loading into the stage the
previous (unmeasured) update swapped out and kept, ``weight_staging_keep``
(also with the copy plan); ``in_pause``: everything inside the pause) it runs
``--updates`` full updates, alternating the order of modes, each after a
quiet window of ``--quiet`` seconds, and reports medians of:

* stall: the largest excess of a gap between two consecutive engine steps
  during the update (the worker's step clock, ``weights.step_clock``) over
  the median gap of steps of the same kind around this update (its quiet
  window before, ``--quiet`` seconds after: a baseline of its own, so the
  machine's drift over minutes does not count): what the update cost the
  engine; beside it the same measure of the quiet window alone (noise). Two kinds, because the load
  replaces each finished request at once and a step that prefills one runs
  about a quarter longer by itself, update or not. Split into the wait
  before the step and the step's run, and the run into the engine thread's
  time on the CPU (work beside it competing for the core, caches or memory;
  on a VM also time the host took the vCPU away) and off it (blocked: a
  staging thread holding the GIL), with how often it blocked;
* pause-to-resume (the front end's pause, ``last_pause_seconds``; 0: never
  paused);
* end-to-end: the update call to its return, new version live (tensors:
  includes writing the shared-memory file; broadcast: from the receive call,
  the trainer already connected), also in median decode steps: a version goes
  live at a step boundary, so under load the floor is the rest of the running
  step;
* decode tok/s received by the clients during the update vs the quiet window;
* the staging thread's time loading the shadow (reading or receiving the
  bytes included; replay vs ``load_weights``: the loader's own Python);
* peak extra memory: anonymous RSS of the engine's processes during the
  update minus just before it (sampled every 10 ms), the largest over the
  updates (the allocator keeps freed pages, so later updates re-use the
  first one's and show less; a kept copy is held before the update starts);

each time also as a ratio to a memcpy of the same bytes in the same run.
Two control rows (source ``control``) measure the same with no update:
another process, pinned where the staging thread runs, copies the weights'
bytes, or spins in Python (no memory traffic), for ``--control-ms``; what
work beside the step costs it when no GIL is shared (on a VM, also the
host's answer to a second busy vCPU).
The mode is chosen per update with ``VLLM_RL_COMPAT_WEIGHT_STAGING`` and
``VLLM_RL_COMPAT_COPY_PLAN`` (read by the front end at each update), so all
modes share one engine and its load.

By default (``--pin``) the front end, the engine core and the trainer are kept
off the CPUs the worker's compute threads are bound to, as a deployment keeps
them off its inference cores: unpinned on a 2-core machine, the kernel puts
them on the compute core whenever the other one is busy (the engine core's
busy loop fills it), and every step they share it with runs longer, update or
not.

Run: ``python benchmarks/bench_weight_sync.py [--updates 3]``; writes
``benchmarks/results/weight_sync_<cpu kind>.md`` with a header naming the
machine (``benchmarks/machine.py``). Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

os.environ.setdefault("VLLM_RL_COMPAT", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

HERE = Path(__file__).resolve().parent
TRAINER = HERE.parent / "tests" / "weight_sync_trainer.py"
sys.path.insert(0, str(HERE))
import machine  # noqa: E402  (benchmarks/machine.py: the results-file header)

# label -> (VLLM_RL_COMPAT_WEIGHT_STAGING, VLLM_RL_COMPAT_COPY_PLAN,
#           VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP, how the shadow loads)
MODES = {"overlapped": ("overlapped", "0", "0", "load_weights"),
         "overlapped, copy plan": ("overlapped", "1", "0", "plan"),
         "overlapped, kept copy": ("overlapped", "0", "1", "load_weights"),
         "overlapped, kept copy + copy plan": ("overlapped", "1", "1", "plan"),
         "in_pause": ("in_pause", "0", "0", None)}
MODE_ENV = ("VLLM_RL_COMPAT_WEIGHT_STAGING", "VLLM_RL_COMPAT_COPY_PLAN",
            "VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP")
# The control rows (``--sources ...,control``): no update; another process,
# pinned where the staging thread runs, works for ``--control-ms``: copying
# the weights' bytes (memory traffic), or spinning in Python (none). What
# work beside the step costs it when no GIL is shared.
CONTROL_MODES = {"no update, another process copying on the spare CPU": "b.copy_(a)",
                 "no update, another process spinning on the spare CPU": "sum(range(1000))"}
CONTROL = """import sys, time, torch
torch.set_num_threads(1)
a = torch.ones(int(sys.argv[1]), dtype=torch.uint8)
b = torch.empty_like(a).fill_(0)
print("ready", flush=True)
sys.stdin.readline()
end = time.perf_counter() + float(sys.argv[2])
while time.perf_counter() < end:
    {work}
"""


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

    from vllm_rl_compat.weights.protocol.spec import safetensors_files

    state = {}
    for f in safetensors_files(model):
        state.update(load_file(str(f)))
    return state


class RssSampler:
    """Peak anonymous RSS of this process's children (the engine core and its
    workers): memory they allocated, not file pages they mapped (safetensors
    files are memory-mapped; their page cache is not what staging holds)."""

    def __init__(self, period: float = 0.01) -> None:
        import psutil

        self.pids = [p.pid for p in psutil.Process().children(recursive=True)]
        self.period, self.peak, self._stop = period, 0, threading.Event()
        self._thread: threading.Thread | None = None

    def now(self) -> int:
        total = 0
        for pid in self.pids:
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(line.split()[1]) * 1024 for line in f
                                  if line.startswith("RssAnon:"))
            except (OSError, StopIteration):  # a helper process ended
                pass
        return total

    def __enter__(self) -> "RssSampler":
        self.peak = self.now()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


@dataclass
class Load:
    """Streams that keep the engine decoding; tokens logged with arrival times."""

    engine: object
    streams: int
    max_tokens: int
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    running: bool = True

    async def stream(self, i: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        n = 0
        while self.running:
            n += 1
            # staggered lengths: requests finish and start at different steps,
            # so the batch (and the step time) stays about constant
            length = 64 + (37 * i + 101 * n) % (self.max_tokens - 63)
            params = SamplingParams(max_tokens=length, ignore_eos=True, temperature=1.0,
                                    output_kind=RequestOutputKind.DELTA)
            async for out in self.engine.generate(f"Story {i}.{n}: once upon a time",
                                                  params, f"load-{i}-{n}"):
                self.arrivals.append((time.monotonic(), len(out.outputs[0].token_ids)))
                if not self.running:
                    break

    def tok_per_s(self, t0: float, t1: float) -> float:
        return sum(n for t, n in self.arrivals if t0 <= t < t1) / max(t1 - t0, 1e-9)


@dataclass
class Stall:
    """What an update cost the engine, from its step clock (``(start, end,
    new requests)`` of every step): the largest excess of a gap between two
    step ends touching the update over the median gap of steps of its kind
    (decode only, or prefilling new requests) around it, split into the
    two parts of that gap -- the wait before the step (engine core, front
    end, the pause) and the step's own run (the worker's model, slowed by
    work beside it), the run split again into the engine thread's time on
    the CPU and off it (blocked: the GIL) -- each minus its own median; the
    off-CPU time and blocking beyond their medians summed over every step of
    the update (what staging's GIL cost, whichever step was the worst); and
    the stall measure over the quiet window before the update alone (the
    noise floor)."""

    stall: float
    wait: float
    run: float
    on_cpu: float
    off_cpu: float
    off_total: float  # off-CPU excess summed over every step of the update
    blocked: float  # times blocked beyond the median, summed likewise
    step: float
    noise: float
    gaps: list[float]
    runs: list[float]
    new: list[int]  # new requests each of those steps scheduled


# previous step's end, start, end, new requests, engine thread CPU s, times blocked
Row = tuple[float, float, float, int, float, int]


def _gap(r: Row) -> float:
    return r[2] - r[0]


def _wait(r: Row) -> float:
    return r[1] - r[0]


def _run(r: Row) -> float:
    return r[2] - r[1]


def _on_cpu(r: Row) -> float:
    return r[4]


def _off_cpu(r: Row) -> float:
    return _run(r) - r[4]


def _blocked(r: Row) -> float:
    return r[5]


def stall(spans: list[list[float]], quiet: tuple[float, float], window: tuple[float, float],
          after: float, history: list[list[Row]]) -> Stall:
    """``spans``: the step clock since the start of ``quiet``; ``window``: the
    update call; ``after``: seconds of steps after it. The steps of the quiet
    window and of the ``after`` seconds are this update's own baseline (added
    to ``history``, one list per update): each step is compared with the
    median of the steps of its own kind around it, so a drift of the machine's
    speed over minutes (this VM's steps drift by 15 %) is not read as a stall.
    Kinds: a step that prefills new requests (the load replaces finished
    ones) is slower by itself; when none ran around this update, steps of
    that kind around earlier updates are used."""
    rows: list[Row] = [(a[1], b[0], b[1], b[2], b[3], b[4]) for a, b in zip(spans, spans[1:])]
    quiet_rows = [r for r in rows if quiet[0] <= r[0] and r[2] <= quiet[1]]
    local = quiet_rows + [r for r in rows if window[1] <= r[0] and r[2] <= window[1] + after]
    history.append(local)
    so_far = [r for rs in history for r in rs]  # every update's, this one's included

    def excess(r: Row, part: Callable[[Row], float]) -> float:
        for pool in (local, so_far):
            same = [part(h) for h in pool if (h[3] > 0) == (r[3] > 0)]
            if same:
                return part(r) - statistics.median(same)
        return 0.0

    during = [r for r in rows if r[2] >= window[0] and r[0] <= window[1]]
    worst = max(during, key=lambda r: excess(r, _gap), default=None)
    decode = statistics.median([_gap(h) for h in local if not h[3]] or [0.0])
    parts = {name: excess(worst, part) if worst else 0.0 for name, part in (
        ("stall", _gap), ("wait", _wait), ("run", _run), ("on_cpu", _on_cpu),
        ("off_cpu", _off_cpu))}
    return Stall(**parts, step=decode, off_total=sum(excess(r, _off_cpu) for r in during),
                 blocked=sum(excess(r, _blocked) for r in during),
                 noise=max((excess(r, _gap) for r in quiet_rows), default=0.0),
                 gaps=[_gap(r) for r in during], runs=[_run(r) for r in during],
                 new=[r[3] for r in during])


def quiet_spread(history: list[list[Row]], after: float) -> str:
    """How much decode steps outside updates vary around their own update's
    median: the floor under any stall."""
    excess, off = [], []
    for local in history:
        decode = [r for r in local if not r[3]]
        if len(decode) >= 2:
            gap0 = statistics.median(map(_gap, decode))
            off0 = statistics.median(map(_off_cpu, decode))
            excess += [_gap(r) - gap0 for r in decode]
            off += [_off_cpu(r) - off0 for r in decode]
    if len(excess) < 2:
        return "Too few decode steps outside updates to tell their spread."
    excess.sort()
    off.sort()
    p90 = lambda xs: xs[min(len(xs) - 1, int(0.9 * len(xs)))]  # noqa: E731
    return (f"Decode steps outside updates ({len(excess)}: the quiet windows and the "
            f"{after:.0f} s after each update), excess over the median gap around their "
            f"own update: 90th percentile {p90(excess) * 1e3:.0f} ms, largest "
            f"{excess[-1] * 1e3:.0f} ms; of their run off the CPU: 90th percentile "
            f"{p90(off) * 1e3:.0f} ms, largest {off[-1] * 1e3:.0f} ms. A stall below these "
            f"cannot be told from a quiet step.")


async def one_update(sync, engine, load: Load, source: str, mode: str, model: str,
                     state: dict, args, history: list[list[Row]]) -> dict:
    if source != "control":
        os.environ.update(zip(MODE_ENV, MODES[mode]))
        if os.environ["VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP"] == "1":
            await sync.update_from_tensors(state)  # not measured: leaves the stage to re-use
    trainer = neighbour = None
    if source == "broadcast":
        trainer = await start_trainer(sync, model, args)
    elif source == "control":
        neighbour = await start_neighbour(sync.spec.total_bytes, CONTROL_MODES[mode], args)
    quiet0 = time.monotonic()
    await asyncio.sleep(args.quiet)
    t0 = time.monotonic()
    with RssSampler() as rss:
        base = rss.peak
        if source == "tensors":
            await sync.update_from_tensors(state)
        elif source == "files":
            await sync.update_from_files(model)
        elif neighbour is not None:
            neighbour.stdin.write(b"go\n")
            await neighbour.wait()
        else:
            await sync.update_from_trainer()
        t1 = time.monotonic()
    if trainer is not None:
        trainer.wait(60)
        await sync.disconnect_trainer()
    await asyncio.sleep(args.quiet)  # steps after the resume: the other half of the baseline
    spans = (await engine.collective_rpc("rl_compat_step_times", args=(quiet0,)))[0]
    cost = stall(spans, (quiet0, t0), (t0, t1), args.quiet, history)
    print("  gaps ms:", [round(g * 1e3) for g in cost.gaps], "of which runs:",
          [round(r * 1e3) for r in cost.runs], "new requests:", cost.new, flush=True)
    return {"stall": cost.stall, "wait": cost.wait, "run": cost.run, "on_cpu": cost.on_cpu,
            "off_cpu": cost.off_cpu, "off_total": cost.off_total, "blocked": cost.blocked,
            "step": cost.step,
            "noise": cost.noise, "pause": 0.0 if neighbour else sync.last_pause_seconds,
            "e2e": t1 - t0, "tps_update": load.tok_per_s(t0, t1),
            "tps_quiet": load.tok_per_s(t0 - (t1 - t0), t0) if t1 - t0 < args.quiet
            else load.tok_per_s(quiet0, t0),
            "mem": rss.peak - base,
            "overlapped": all(r.get("overlapped") for r in sync.last_apply),
            "via": {r.get("via") for r in sync.last_apply},
            "kept": all(r.get("kept") for r in sync.last_apply),
            "load": max((r.get("load_seconds", 0.0) for r in sync.last_apply), default=0.0)}


def check_path(source: str, mode: str, r: dict) -> None:
    """The update went the way its row says (else the table would lie)."""
    staging, _, keep, via = MODES[mode]
    if (r["overlapped"] != (staging == "overlapped") or (via and r["via"] != {via})
            or r["kept"] != (keep == "1")):
        raise RuntimeError(f"{source}/{mode}: the update was staged "
                           f"{'overlapped' if r['overlapped'] else 'in the pause'} "
                           f"via {r['via']}, stage kept: {r['kept']}")


def pin_off_compute(pids: list[int], spare: set[int]) -> None:
    """Every thread of ``pids`` onto ``spare`` (threads they start later inherit it)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), spare)
            except OSError:  # the thread ended
                pass


def keep_off_compute(args) -> set[int] | None:
    """With ``--pin``: this process (front end) and the engine core onto the
    CPUs the workers' compute threads are not bound to, as a deployment keeps
    the serving framework off the inference cores; returns those CPUs."""
    import psutil

    if not args.pin:
        return None
    children = psutil.Process().children(recursive=True)
    workers = [p for p in children if "Worker" in p.name()]
    compute = set().union(*(os.sched_getaffinity(p.pid) for p in workers))
    spare = set(range(os.cpu_count() or 1)) - compute
    if not workers or not spare:
        raise RuntimeError(f"--pin: no CPU left beside the workers' {sorted(compute)}")
    pin_off_compute([os.getpid()] + [p.pid for p in children if p not in workers], spare)
    return spare


async def start_neighbour(nbytes: int, work: str, args) -> asyncio.subprocess.Process:
    """The control's process, started and ready (pinned like the staging
    thread: off the worker's compute CPUs)."""
    neighbour = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONTROL.format(work=work), str(nbytes),
        str(args.control_ms / 1e3),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    if args.spare:
        pin_off_compute([neighbour.pid], args.spare)
    await neighbour.stdout.readline()
    return neighbour


async def start_trainer(sync, model: str, args) -> subprocess.Popen:
    """A trainer process, connected (its start-up is not part of the update)."""
    from vllm_rl_compat.weights.protocol.broadcast import new_secret

    port, secret = free_port(), new_secret()
    trainer = subprocess.Popen(
        [sys.executable, str(TRAINER), "127.0.0.1", str(port), str(sync.num_workers),
         model, "ok", "60", str(args.chunk_mb << 20)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "TEST_TRAINER_SECRET": secret})
    if args.spare:
        pin_off_compute([trainer.pid], args.spare)
    line = await asyncio.to_thread(trainer.stdout.readline)
    if line.strip() != "TRAINER-READY":
        raise RuntimeError(f"trainer did not start: {line!r}")
    await sync.connect_trainer("127.0.0.1", port, secret=secret, timeout=120)
    return trainer


async def run(args, model: str, state: dict
              ) -> tuple[list[tuple], int, list[list[Row]]]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_rl_compat.weight_sync import AsyncWeightSync

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model, dtype="bfloat16", max_model_len=args.max_tokens + 64, seed=0,
        max_num_seqs=max(args.streams, 1), enforce_eager=args.eager))
    try:
        sync = await AsyncWeightSync.create(engine)
        args.spare = keep_off_compute(args)
        load = Load(engine, args.streams, args.max_tokens)
        tasks = [asyncio.create_task(load.stream(i)) for i in range(args.streams)]
        while load.tok_per_s(time.monotonic() - 1, time.monotonic()) == 0:
            await asyncio.sleep(0.1)
        await asyncio.sleep(args.quiet)  # all streams decoding
        # Not measured: the first update with the copy plan records it.
        history: list[list[Row]] = []  # steps outside each update: its baseline
        await one_update(sync, engine, load, "tensors", "overlapped, copy plan", model,
                         state, args, history)
        results: dict[tuple[str, str], list[dict]] = {}
        for source in args.sources.split(","):
            for k in range(args.updates):
                modes = list(MODES if source != "control" else CONTROL_MODES)
                for mode in (modes if k % 2 == 0 else modes[::-1]):
                    r = await one_update(sync, engine, load, source, mode, model, state, args,
                                         history)
                    if source != "control":
                        check_path(source, mode, r)
                    results.setdefault((source, mode), []).append(r)
                    print(source, mode, r, flush=True)
        load.running = False
        for task in tasks:
            task.cancel()
        return [(s, m, rs) for (s, m), rs in results.items()], sync.spec.total_bytes, history
    finally:
        engine.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--updates", type=int, default=3, help="updates per source and mode")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=448)
    ap.add_argument("--quiet", type=float, default=2.0,
                    help="seconds without an update before each one")
    ap.add_argument("--sources", default="tensors,files,broadcast,control")
    ap.add_argument("--control-ms", type=float, default=250.0,
                    help="how long the control rows' other process works")
    ap.add_argument("--chunk-mb", type=int, default=64)
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the front end, engine core and trainer off the "
                         "workers' compute CPUs (default)")
    ap.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True,
                    help="enforce_eager (default): every op of a step returns into "
                         "Python; --no-eager: vLLM's default torch.compile")
    args = ap.parse_args()

    import torch

    from vllm_rl_compat.models import default_model_dir

    model = str(default_model_dir())
    state = load_state(model)
    load_before = machine.load()
    args.spare, cpus = None, os.sched_getaffinity(0)
    rows, nbytes, history = asyncio.run(run(args, model, state))
    pin_off_compute([os.getpid()], cpus)  # the memcpy on every CPU, as before --pin
    copy_s = memcpy_seconds(nbytes)
    med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
    table, steps = [], []
    for source, mode, rs in rows:
        stall_s, pause, e2e = med(rs, "stall"), med(rs, "pause"), med(rs, "e2e")
        steps.append(med(rs, "step"))
        table.append(
            f"| {source} | {mode} | {stall_s * 1e3:.0f} ({stall_s / copy_s:.1f}x) | "
            f"{med(rs, 'wait') * 1e3:.0f} / {med(rs, 'run') * 1e3:.0f} | "
            f"{med(rs, 'on_cpu') * 1e3:.0f} / {med(rs, 'off_cpu') * 1e3:.0f} | "
            f"{med(rs, 'off_total') * 1e3:.0f} ({med(rs, 'blocked'):.0f}) | "
            f"{med(rs, 'noise') * 1e3:.0f} | {pause * 1e3:.0f} ({pause / copy_s:.1f}x) | "
            f"{e2e * 1e3:.0f} ({e2e / copy_s:.1f}x, {e2e / med(rs, 'step'):.1f} steps) | "
            f"{med(rs, 'tps_update'):.0f} / {med(rs, 'tps_quiet'):.0f} | "
            f"{max(r['mem'] for r in rs) / 2**20:.0f} | "
            + (f"{med(rs, 'load') * 1e3:.0f} |" if mode.startswith("overlapped") else "- |"))
    lines = [machine.header("Weight updates of SmolLM2-135M on CPU under load: overlapped "
                            "staging vs in the pause", load_before),
             f"SmolLM2-135M bf16 ({'eager' if args.eager else 'torch.compile'}): "
             f"{nbytes / 2**20:.1f} MiB; memcpy of the same bytes: "
             f"{copy_s * 1e3:.1f} ms (median of 10, this run); torch {torch.__version__}; "
             f"{args.streams} streaming requests decoding throughout; {args.updates} updates "
             f"per source and mode, modes alternated, {args.quiet:.0f} s quiet before each; "
             f"medians. Stall = largest excess of a gap between two engine steps during the "
             f"update over the median gap of its kind (decode only: a median "
             f"{statistics.median(steps) * 1e3:.0f} ms here; or prefilling new requests) "
             f"in the {args.quiet:.0f} s quiet windows before and after that update; "
             f"wait / run = the parts "
             f"of that longest gap: the wait before the step (engine core, front end, "
             f"pause) and the step's own run in the worker, each minus its median; "
             f"run on / off CPU = that run's engine-thread time on the CPU and off it, "
             f"each minus its median; off CPU in the update (times blocked) = the "
             f"engine thread's off-CPU time and its blocking (waiting for the GIL, "
             f"mostly), each beyond the median, summed over every step of the update "
             f"(unlike the worst step, not drawn to this machine's on-CPU noise); "
             f"noise = the stall measure over the quiet window before (no update); "
             f"pause-to-resume 0 = never paused (overlapped: the engine core commits "
             f"between two steps); "
             f"x = ratio to the memcpy; staging thread loading = its time reading or "
             f"receiving the bytes and loading them into the shadow (vLLM's load_weights, "
             f"or replaying the copy plan); kept copy: the stage of the previous, "
             f"unmeasured update, held between updates (not in the peak extra memory); "
             f"broadcast in chunks of {args.chunk_mb} MiB; control: no update, another "
             f"process on the spare CPU(s) copies the weights' bytes (or spins in Python, "
             f"no memory traffic) for {args.control_ms:.0f} ms (end-to-end: its run), what "
             f"work beside the step costs it with no GIL shared; "
             + (f"front end, engine core and trainer pinned to CPU(s) {sorted(args.spare)}, "
                f"off the worker's compute CPU(s) (`--pin`)." if args.spare else
                "front end, engine core and trainer not pinned (`--no-pin`)."), "",
             quiet_spread(history, args.quiet), "",
             *machine.table(["source", "staging", "stall ms (x)", "wait / run ms",
                             "run on / off CPU ms", "off CPU in the update ms (times blocked)",
                             "noise ms",
                             "pause-to-resume ms (x)", "end-to-end ms (x, decode steps)",
                             "decode tok/s during / quiet", "peak extra MiB (max)",
                             "staging thread loading ms"], table)]
    machine.write_results("weight_sync" if args.eager else "weight_sync_compiled", lines)


if __name__ == "__main__":
    main()
