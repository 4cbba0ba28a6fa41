"""Weight versions: the engine core's step labels and how a client reads them.

The engine core labels every step's outputs with its weight version (vLLM's
``set_weight_version``); the transaction sets the label while generation is
paused, so each finished ``CompletionOutput.weight_versions`` lists exact
per-token spans ``[start, end)``.
"""

from __future__ import annotations

from typing import Any


def token_versions(completion: Any) -> list[tuple[int | str, int, int]]:
    """``[(version, start, end), ...]`` over a finished completion's output tokens.

    Token ``i`` for ``start <= i < end`` was sampled by weights ``version``
    (the KV of earlier positions may come from older versions: in keep mode
    running requests keep their cache, as vLLM V0 did). Versions are ints,
    unless a caller labelled an update with a non-integer ``weight_version``.
    """
    spans = getattr(completion, "weight_versions", None)
    if spans is None:
        raise ValueError("no weight versions on this output: it is not finished, or "
                         "the engine does not run in RL mode with weight_sync on")
    return [(parse_version(s.version), s.start, s.end) for s in spans]


def parse_version(label: Any) -> int | str:
    """An integer label as int, any other label unchanged."""
    try:
        return int(label)
    except (TypeError, ValueError):
        return label


def version_start(vllm_config: Any) -> int:
    from vllm_rl_compat.config import rl_config_from_additional

    return rl_config_from_additional(vllm_config.additional_config).weight_version_start


def weight_sync_on(vllm_config: Any) -> bool:
    from vllm_rl_compat.config import rl_config_from_additional

    return rl_config_from_additional(vllm_config.additional_config).weight_sync


def install_version_label() -> None:
    """Engine core: label steps ``weight_version_start`` until the first update.

    Why: vLLM's engine core starts with the opaque label ``"default"``, so
    requests finishing before the first update would carry no integer
    version. What it changes: ``EngineCore._attach_weight_version`` replaces
    ``"default"`` once, on the first step, when ``weight_sync`` is on; every
    later label comes from ``set_weight_version``. Other processes never
    call the patched method.
    """
    from vllm.v1.engine.core import EngineCore

    from vllm_rl_compat.patching import patch_method

    def wrap(original: Any) -> Any:
        def _attach_weight_version(self: Any, outputs: Any) -> None:
            self._weight_version = current_label(self)
            original(self, outputs)
        return _attach_weight_version

    patch_method(EngineCore, "_attach_weight_version", wrap)


def _start_label(core: Any) -> str | None:
    """The first label of this engine core (``None``: weight_sync off), read once."""
    if "_rl_compat_start_label" not in core.__dict__:
        config = core.vllm_config
        core.__dict__["_rl_compat_start_label"] = (
            str(version_start(config)) if weight_sync_on(config) else None)
    return core.__dict__["_rl_compat_start_label"]


def current_label(core: Any) -> str:
    """The engine core's weight version label as steps report it: vLLM's
    ``"default"`` before the first update is ``weight_version_start`` when
    weight_sync is on."""
    label = core._weight_version
    if label == "default":
        return _start_label(core) or label
    return str(label)
