"""When the engine ran each step (worker process): stalls seen by the engine.

Why: a weight update's cost to rollouts is the gap it puts between two engine
steps, not the front end's pause-to-resume (a pause waits for the running
step; RPCs queue behind steps). ``Worker.execute_model`` is wrapped to record
the monotonic times at the start and the end of every step that ran tokens,
and how many new requests it scheduled, in a bounded ring;
``WeightSyncExtension.rl_compat_step_times`` reads it (read-only, so dev
mode's ``/collective_rpc`` may too). Start and end tell a slower step (work in
the worker competing with the model) from a longer wait between steps (the
engine core, the front end, a pause); the new-request count tells a step made
longer by prefilling arrivals (about +25 % under the benchmark's load).
The engine thread's own CPU time and voluntary context switches during the
step split a slower run in two: on the CPU (work beside it competing for
caches, memory or the core) and off it (the thread blocked: mostly waiting
for the GIL that a staging thread holds, ``weights.staging``).
``time.monotonic`` is one clock for every process on the host, so a
benchmark can line steps up with its own calls. Cost: one ``deque.append``
and two ``getrusage`` calls per step.
"""

from __future__ import annotations

import collections
import resource
import time
from typing import Any, Callable

from vllm_rl_compat.patching import patch_method, when_imported

_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux

Span = tuple[float, float, int, float, int]  # start, end, new, CPU seconds, blocked
STEPS: collections.deque[Span] = collections.deque(maxlen=65536)


def step_spans(since: float = 0.0) -> list[Span]:
    """``(start, end, new, cpu, blocked)`` of the steps that ended after
    ``since``; ``new``: requests the step scheduled for the first time (their
    prefill makes it longer for reasons of its own); ``cpu``: the engine
    thread's CPU seconds in the step; ``blocked``: how often it gave up the
    CPU on its own (waiting for the GIL, a lock, I/O)."""
    return [span for span in STEPS if span[1] > since]


def _switches() -> int:
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw if _RUSAGE_THREAD is not None else 0


def _wrap_execute_model(original: Callable[..., Any]) -> Callable[..., Any]:
    def execute_model(self: Any, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        start, cpu, switches = time.monotonic(), time.thread_time(), _switches()
        result = original(self, scheduler_output, *args, **kwargs)
        if getattr(scheduler_output, "total_num_scheduled_tokens", 0) > 0:
            new = len(getattr(scheduler_output, "scheduled_new_reqs", None) or ())
            STEPS.append((start, time.monotonic(), new, time.thread_time() - cpu,
                          _switches() - switches))
        return result
    return execute_model


def install() -> None:
    when_imported("vllm.v1.worker.gpu_worker",
                  lambda module: patch_method(module.Worker, "execute_model",
                                              _wrap_execute_model))
