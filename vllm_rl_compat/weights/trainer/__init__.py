"""The trainer process: vLLM's trainer API with our backends, and clients.

``senders`` holds the ``TrainerWeightTransferEngine`` of each backend
(``rl_compat_gloo`` / ``_tensors`` / ``_files``) and their init infos;
``client`` the HTTP and in-process clients of vLLM's trainer API.
``vllm_rl_compat.weights.trainer.<Name>`` keeps resolving every public name
of ``senders`` (the import path the README has always shown).
"""

from typing import Any

_SENDERS = ("RLCompatGlooTrainer", "RLCompatGlooTrainerInitInfo", "RLCompatTensorsTrainer",
            "RLCompatTensorsTrainerInitInfo", "RLCompatFilesTrainer",
            "RLCompatFilesTrainerInitInfo", "source_pairs")


def __getattr__(name: str) -> Any:
    if name in _SENDERS:
        from vllm_rl_compat.weights.trainer import senders

        return getattr(senders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
