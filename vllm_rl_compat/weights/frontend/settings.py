"""RL mode's weight-transfer backend choice (front end, at engine-argument time).

Why: vLLM's built-in backends are CUDA/NIXL only, and on a CPU engine its
``nccl`` route does not fail: the broadcast returns without moving data, so
the workers keep the old weights while the call reports success. In RL mode
(``weight_sync`` on) a backend that cannot run on this platform fails
start-up with one error naming it and the backends that work here; with no
``weight_transfer_config`` RL mode sets ``DEFAULT_BACKEND``, which carries a
trainer broadcast, same-host tensors and files on every platform.
``weight_staging='overlapped'`` is refused here too where it cannot run
(off the CPU platform), instead of at the first update.
"""

from __future__ import annotations

from typing import Any

from vllm_rl_compat.config import CONFIG_KEY, RLCompatConfig
from vllm_rl_compat.weights.protocol.registry import BACKENDS, DEFAULT_BACKEND


def weight_transfer_hook(args: Any, cfg: RLCompatConfig) -> str | None:
    """Check (and default) ``args.weight_transfer_config``; a summary item."""
    if not cfg.weight_sync:
        return None
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.platforms import current_platform

    current = args.weight_transfer_config
    if isinstance(current, dict):
        current = WeightTransferConfig(**current)
    backend = current.backend if current is not None else DEFAULT_BACKEND
    if backend not in BACKENDS and not current_platform.is_cuda():
        raise ValueError(
            f"weight_transfer_config.backend={backend!r} cannot run on the "
            f"{current_platform.device_name or current_platform.device_type} platform "
            f"(vLLM's built-in backends need CUDA; on this engine it would leave the "
            f"old weights in place). Backends that work here: {', '.join(BACKENDS)}; "
            f"or set {CONFIG_KEY}.weight_sync=false.")
    if cfg.weight_staging == "overlapped" and not current_platform.is_cpu():
        raise ValueError(
            f"{CONFIG_KEY}.weight_staging='overlapped' cannot run on the "
            f"{current_platform.device_name or current_platform.device_type} platform: "
            f"overlapped staging is built for CPU engines (the CUDA side-stream variant "
            f"is not); use 'auto' (stages in the pause here) or 'in_pause'.")
    args.weight_transfer_config = current or WeightTransferConfig(backend=DEFAULT_BACKEND)
    return f"weight_transfer_config.backend={backend!r}"
