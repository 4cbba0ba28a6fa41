"""The engine core's weight-version label (engine-core process).

vLLM's engine core labels every step's outputs with ``_weight_version``;
this module is the one place that reads it (``current_label``) and the one
hook point for what follows a version change (``on_version_change``).
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_rl_compat.weights.protocol.versions import version_start, weight_sync_on

# Engine-core hooks run after every ``set_weight_version`` (while paused), in
# registration order: one wrapper of vLLM's method for every capability that
# follows the label (``patching.patch_method`` wraps a method once).
_ON_VERSION: list[Callable[[Any], None]] = []


def on_version_change(hook: Callable[[Any], None]) -> None:
    """Run ``hook(engine_core)`` after each ``set_weight_version`` (idempotent)."""
    if hook not in _ON_VERSION:
        _ON_VERSION.append(hook)


def install_version_label() -> None:
    """Engine core: label steps ``weight_version_start`` until the first update;
    run the ``on_version_change`` hooks when a version lands.

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

    def wrap_set(original: Any) -> Any:
        def set_weight_version(self: Any, weight_version: str, *args: Any,
                               **kwargs: Any) -> Any:
            result = original(self, weight_version, *args, **kwargs)
            for hook in _ON_VERSION:
                hook(self)
            return result
        return set_weight_version

    patch_method(EngineCore, "_attach_weight_version", wrap)
    patch_method(EngineCore, "set_weight_version", wrap_set)


def start_label(vllm_config: Any) -> str | None:
    """The label steps carry before the first update (``None``: weight_sync off)."""
    return str(version_start(vllm_config)) if weight_sync_on(vllm_config) else None


def _start_label(core: Any) -> str | None:
    """``start_label`` of this engine core, read once."""
    if "_rl_compat_start_label" not in core.__dict__:
        core.__dict__["_rl_compat_start_label"] = start_label(core.vllm_config)
    return core.__dict__["_rl_compat_start_label"]


def current_label(core: Any) -> str:
    """The engine core's weight version label as steps report it: vLLM's
    ``"default"`` before the first update is ``weight_version_start`` when
    weight_sync is on."""
    label = core._weight_version
    if label == "default":
        return _start_label(core) or label
    return str(label)
