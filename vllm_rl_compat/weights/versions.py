"""Weight versions: the engine core's step labels and how a client reads them.

The engine core labels every step's outputs with its weight version (vLLM's
``set_weight_version``); the transaction sets the label while generation is
paused, so each finished ``CompletionOutput.weight_versions`` lists exact
per-token spans ``[start, end)``.
"""

from __future__ import annotations

from typing import Any, Callable

# Engine-core hooks run after every ``set_weight_version`` (while paused), in
# registration order: one wrapper of vLLM's method for every capability that
# follows the label (``patching.patch_method`` wraps a method once).
_ON_VERSION: list[Callable[[Any], None]] = []

PROMPT_FIELD = "prompt_weight_versions"  # the CompletionOutput attribute (kv_versions)


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


def prompt_versions(completion: Any) -> list[tuple[int | str | None, int, int]]:
    """``[(version, start, end), ...]`` over a finished completion's prompt positions:
    the weights that computed the KV its tokens attended to.

    Position ``i`` for ``start <= i < end`` of the prompt has KV computed by
    weights ``version``; ``None`` where the engine cannot know (KV loaded by a
    KV connector). Usually one span equal to the first token's version; it
    differs when the request was kept running across an update during its
    prefill (chunked prefill) or read blocks from the prefix cache (with plain
    caching, possibly blocks of older weights). After a preemption the prompt
    is recomputed; the spans describe the KV the request finished with.
    """
    spans = getattr(completion, PROMPT_FIELD, None)
    if spans is None:
        raise ValueError("no prompt weight versions on this output: it is not finished, "
                         "or the engine does not run in RL mode with weight_sync on")
    return [(None if s.version is None else parse_version(s.version), s.start, s.end)
            for s in spans]


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
