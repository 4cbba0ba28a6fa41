"""Our backend names in vLLM's weight-transfer registries (every process).

Registered lazily (module path and class name, vLLM's own convention), so a
process that never builds an engine never imports it. Every name starts with
``rl_compat_`` and cannot collide with vLLM's. ``DEFAULT_BACKEND`` is what RL
mode configures when the user sets no ``weight_transfer_config``: it is the
one that carries all three sources (``WeightSync``'s tensors and files, and a
trainer's broadcast) on every platform.
"""

from __future__ import annotations

# backend name -> the source its update_info defaults to
BACKENDS = {"rl_compat_gloo": "gloo", "rl_compat_tensors": "files",
            "rl_compat_files": "files"}
DEFAULT_BACKEND = "rl_compat_gloo"
_TRAINERS = {"rl_compat_gloo": "RLCompatGlooTrainer",
             "rl_compat_tensors": "RLCompatTensorsTrainer",
             "rl_compat_files": "RLCompatFilesTrainer"}


def register() -> None:
    """Add our worker- and trainer-side engines (idempotent)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    for name in BACKENDS:
        if name not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(
                name, "vllm_rl_compat.weights.worker.backends", "RLCompatWeightTransferEngine")
        if name not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine(
                name, "vllm_rl_compat.weights.trainer.senders", _TRAINERS[name])


def is_ours(backend: str | None) -> bool:
    return bool(backend) and backend in BACKENDS
