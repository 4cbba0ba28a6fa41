"""Worker extension for pause-boundary weight loading (installed in RL mode).

vLLM appends this class to its worker's bases (``worker_extension_cls``), so
its methods run inside every worker via ``collective_rpc``. Method names are
prefixed ``rl_compat_`` so they never collide with the Worker's own
(``update_weights``, ``reload_weights``, ...).
"""

from __future__ import annotations


class WeightSyncExtension:
    """Worker-side weight loading; see ``vllm_rl_compat.weight_sync``."""

    def rl_compat_ping(self) -> bool:
        """Lets the front end check that the extension is installed."""
        return True
