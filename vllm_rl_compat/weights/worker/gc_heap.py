"""Freeze the CPU worker's garbage-collector heap after warm-up (worker process).

Why: vLLM's GPU worker calls ``freeze_gc_heap()`` once warm-up is done, so a
full collection never scans the static start-up objects (the model, torch's
own); its CPU worker does not. A full collection of that heap (SmolLM2-135M:
about 690 000 tracked objects) took 380-400 ms on a 2-core AVX2 EPYC, holding
the GIL, so whichever step it lands in stalls that long -- ten times the swap
of an overlapped weight update. Updates bring it closer: each one allocates
thousands of objects (the staging shadow of the model), and after enough of
them a full collection runs. Frozen, the heap is skipped; what is allocated
later is collected as before.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from vllm_rl_compat.patching import patch_method, when_imported

logger = logging.getLogger("vllm.rl_compat")


def _wrap_warm_up(original: Callable[..., Any]) -> Callable[..., Any]:
    def compile_or_warm_up_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        from vllm.utils.gc_utils import freeze_gc_heap

        result = original(self, *args, **kwargs)
        freeze_gc_heap()  # vLLM's own, as its GPU worker calls it
        return result
    return compile_or_warm_up_model


def install() -> None:
    when_imported("vllm.v1.worker.cpu_worker",
                  lambda module: patch_method(module.CPUWorker, "compile_or_warm_up_model",
                                              _wrap_warm_up))
