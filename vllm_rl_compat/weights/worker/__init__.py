"""The worker processes: receive, validate, stage and apply an update.

``extension`` (``WeightSyncExtension``) admits only steps the front end
signed; ``backends`` are our vLLM weight-transfer engines (receive side);
``staging`` (+ ``copy_plan``) builds the next weights beside the live ones;
``apply_cpu`` writes an update into vLLM's CPU layouts (``cpu_layout``);
``step_clock`` and ``gc_heap`` keep the engine's steps timed and short.

``vllm_rl_compat.weights.worker.WeightSyncExtension`` is the path users put
in ``worker_extension_cls``; it resolves lazily so that importing a sibling
(``cpu_layout`` from the CLI) does not import the extension.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "WeightSyncExtension":
        from vllm_rl_compat.weights.worker.extension import WeightSyncExtension

        return WeightSyncExtension
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
