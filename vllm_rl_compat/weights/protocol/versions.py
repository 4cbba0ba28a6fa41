"""Weight versions as every process reads them: labels, config, output spans.

The engine core labels every step's outputs with its weight version
(``engine_core/labels.py``); the transaction sets the label while generation
is paused, so each finished ``CompletionOutput.weight_versions`` lists exact
per-token spans ``[start, end)``, read here.
"""

from __future__ import annotations

from typing import Any

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
