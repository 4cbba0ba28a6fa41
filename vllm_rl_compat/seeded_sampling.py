"""Seeded sampling with chunked prefill on CPU: rewind by state, not by offset.

Why: when a request's prefill is split over several steps, vLLM still samples
a token for it at every partial step and throws that token away
(``discard_request_mask``). So that the throw-away draw does not advance the
request's seeded generator, ``GPUModelRunner._bookkeeping_sync`` (inherited by
the CPU model runner) rewinds it with ``gen.set_offset(gen.get_offset() - 4)``.
That is a Philox (CUDA) operation: a CPU generator (mt19937) has no offset and
raises ``RuntimeError: CPU Generator does not use offset``, which kills the
engine as soon as a seeded request is prefilled in chunks (long prompts, large
batches, ``n > 1``).

What it changes (only where vLLM's CPU model runner is loaded, i.e. in worker
processes, installed by ``plugin._register_once``): two methods of
``CPUModelRunner`` are wrapped (``GPUModelRunner`` itself is not touched).

* ``_sample``: before the sampler runs, the state (``get_state()``) of every
  CPU generator of a request whose sample will be discarded is saved.
* ``_bookkeeping_sync``: those generators get their saved state back
  (``set_state()``), and vLLM's offset rewind does not see them (for the
  duration of the call, ``input_batch.generators`` is a copy without them).

The discarded draw therefore leaves the request's generator exactly as it was:
a seeded request samples the same tokens whether or not its prefill was
chunked (and whatever it was batched with, the logits being equal).

What it does not modify: the sampler, its inputs and its outputs (discarded
rows are still sampled with their own generator, then rewound); requests
without a seed; requests whose sample is kept; generators on other devices
(CUDA keeps vLLM's own offset rewind); processes that never load the CPU
model runner (front end, engine core); engines without ``VLLM_RL_COMPAT=1``.

Fallback: none. If vLLM's runner no longer has ``_sample`` or
``_bookkeeping_sync``, ``contract.VLLMContractError`` names the symbol
when the CPU model runner is loaded, so the worker fails start-up.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"
RUNNER_CLASS = "CPUModelRunner"
_SAVED_ATTR = "_rl_compat_discarded_generator_states"


def _discarded_cpu_generators(runner: Any) -> dict[int, tuple[Any, Any]]:
    """``{row: (generator, state)}`` for the seeded CPU rows sampled and discarded."""
    generators = runner.input_batch.generators
    if not generators:
        return {}
    num_reqs = runner.input_batch.num_reqs
    saved = {}
    for row in np.flatnonzero(runner.discard_request_mask.np[:num_reqs]):
        gen = generators.get(int(row))
        if gen is not None and gen.device.type == "cpu":
            saved[int(row)] = (gen, gen.get_state())
    return saved


def _wrap_sample(original: Any) -> Any:
    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        # Overwritten every step: a snapshot never outlives its own step.
        self.__dict__[_SAVED_ATTR] = _discarded_cpu_generators(self)
        return original(self, *args, **kwargs)
    return _sample


def _wrap_bookkeeping(original: Any) -> Any:
    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = self.__dict__.pop(_SAVED_ATTR, None)
        if not saved:
            return original(self, *args, **kwargs)
        for gen, state in saved.values():
            gen.set_state(state)
        batch = self.input_batch
        generators = batch.generators
        batch.generators = {i: g for i, g in generators.items() if i not in saved}
        try:
            return original(self, *args, **kwargs)
        finally:
            batch.generators = generators
    return _bookkeeping_sync


def patch_runner(cls: type) -> None:
    """Wrap ``cls._sample`` and ``cls._bookkeeping_sync`` (idempotent)."""
    from vllm_rl_compat.patching import patch_method

    patch_method(cls, "_sample", _wrap_sample)
    patch_method(cls, "_bookkeeping_sync", _wrap_bookkeeping)


def _patch_module(module: Any) -> None:
    from vllm_rl_compat.contract import require

    require("CPUModelRunner._sample", "CPUModelRunner._bookkeeping_sync")
    patch_runner(getattr(module, RUNNER_CLASS))


def install() -> None:
    """Patch the CPU model runner now if it is loaded, else when it is (idempotent)."""
    from vllm_rl_compat.patching import when_imported

    when_imported(RUNNER_MODULE, _patch_module)
