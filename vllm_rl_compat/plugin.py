"""The vLLM general plugin: one switch, ``VLLM_RL_COMPAT=1``, turns RL mode on.

vLLM calls ``register()`` once in every process it starts (front end, engine
core, each worker). The environment gate is the first statement, so with the
switch off nothing is imported or patched and vLLM runs exactly as without
the package. With it on, each capability installs itself, in the order
below; ``_register_once`` is cached so that repeated calls in one process are
no-ops by construction (and ``patching`` refuses to wrap anything twice).
"""

from __future__ import annotations

import functools

from vllm_rl_compat import envs


def register() -> None:
    """Entry point of ``vllm.general_plugins`` (``rl_compat``)."""
    if not envs.VLLM_RL_COMPAT:
        return
    _register_once()


@functools.lru_cache(maxsize=None)
def _register_once() -> None:
    from vllm_rl_compat import engine_settings, fp32_head, prefix_cache, seeded_sampling
    from vllm_rl_compat.weights.engine_core import commit, kv_versions, labels
    from vllm_rl_compat.weights.frontend import (
        delivery,
        http,
        kv_versions_output,
        native,
        openai_versions,
        settings,
    )
    from vllm_rl_compat.weights.protocol import proof, registry
    from vllm_rl_compat.weights.worker import extension, gc_heap, step_clock

    proof.ensure_secret()  # before this process spawns the engine core / workers
    engine_settings.install([fp32_head.head_dtype_hook, settings.weight_transfer_hook])
    fp32_head.install()
    seeded_sampling.install()
    registry.register()
    labels.install_version_label()
    prefix_cache.install()
    kv_versions.install()
    kv_versions_output.install()
    native.install()
    step_clock.install()
    commit.install()
    delivery.install()
    extension.install()
    gc_heap.install()
    http.install()
    openai_versions.install()
