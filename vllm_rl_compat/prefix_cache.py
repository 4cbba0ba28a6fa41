"""Versioned prefix caching (option ``rl_compat.prefix_cache="versioned"``).

Why: RL mode turns prefix caching off because a cached block may hold KV
computed under older weights, and vLLM offers only "clear everything" after
an update (which cannot run while requests kept across the update hold
blocks). GRPO-style rollouts sample n completions per prompt, so with
caching off every one of the n recomputes the prompt. Keying every block by
the weight version makes caching safe: a request admitted under version v can
only hit blocks computed by requests admitted under v.

How (engine core process only): vLLM already mixes a request's
``cache_salt`` into the hash of its first block, and every later block hash
chains from it. ``EngineCore.add_request`` is wrapped to salt each request,
``n > 1`` children included (they are separate engine-core requests), with
the current weight version (combined with the user's own salt, which still
separates users), and when an update's version lands (``EngineCore.set_weight_version``,
while generation is paused; ``labels.on_version_change``) it re-salts the requests still
waiting in the scheduler, so a request queued during an update is keyed by
the version it will run under. Running requests kept across an update (keep
mode) keep their own KV and salt; new requests cannot reach their blocks.

Old-version blocks need no eviction code: once an update lands nothing can
hit them, so vLLM's LRU free queue reaches them before any block a current
request touched.
"""

from __future__ import annotations

from typing import Any

SALT_PREFIX = "rl_compat/weights="
_USER_SALT = "_rl_compat_user_salt"  # request.__dict__ key: the salt the user sent


def salt_for(version: str, user_salt: str | None) -> str:
    """The cache salt of a request admitted under ``version``."""
    return f"{SALT_PREFIX}{version};{user_salt}" if user_salt else f"{SALT_PREFIX}{version}"


def salt_request(request: Any, version: str) -> None:
    """Key ``request``'s blocks by ``version``; recompute its block hashes if changed."""
    user = request.__dict__.setdefault(_USER_SALT, request.cache_salt)
    salt = salt_for(version, user)
    if request.cache_salt == salt:
        return
    request.cache_salt = salt
    request.block_hashes = []  # the hasher appends from len(block_hashes)
    request.update_block_hashes()


def _current_salt_version(core: Any) -> str | None:
    """The version new requests are keyed by (``labels.current_label``);
    ``None`` when the option is off (read once per engine core)."""
    on = core.__dict__.get("_rl_compat_versioned_cache")
    if on is None:
        from vllm_rl_compat.config import rl_config_from_additional

        cfg = rl_config_from_additional(core.vllm_config.additional_config)
        on = core.__dict__["_rl_compat_versioned_cache"] = cfg.prefix_cache == "versioned"
    if not on:
        return None
    from vllm_rl_compat.weights.engine_core.labels import current_label

    return current_label(core)


def _wrap_add_request(original: Any) -> Any:
    def add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        version = _current_salt_version(self)
        if version is not None:
            salt_request(request, version)
        return original(self, request, *args, **kwargs)
    return add_request


def resalt_waiting(core: Any) -> None:
    """After a version lands (``labels.on_version_change``): key the requests
    not yet started by the version they will run under."""
    version = _current_salt_version(core)
    if version is None:
        return
    # (Requests holding KV blocks from a connector are left alone.)
    for request in core.scheduler.waiting:
        if request.num_computed_tokens == 0:
            salt_request(request, version)


def install() -> None:
    """Wrap the engine core's admission and version change (idempotent)."""
    from vllm_rl_compat.patching import patch_method, when_imported
    from vllm_rl_compat.weights.engine_core.labels import on_version_change

    def apply(module: Any) -> None:
        patch_method(module.EngineCore, "add_request", _wrap_add_request)

    on_version_change(resalt_waiting)

    when_imported("vllm.v1.engine.core", apply)
