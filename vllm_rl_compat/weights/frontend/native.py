"""vLLM's own RL calls on ``LLM`` and ``AsyncLLM``, routed through the transaction.

Front-end process only. In RL mode (``weight_sync`` on for that engine), the
calls vLLM documents for RL frameworks -- ``init_weight_transfer_engine``,
``start_weight_update``, ``update_weights``, ``finish_weight_update``,
``shutdown_weight_transfer_engine`` -- keep their names, arguments and return
values but run ``weights.transaction`` (pause in keep mode, stage, check,
apply, version, resume). ``vllm serve``'s RL routes call the ``AsyncLLM``
methods, so they get the same guarantees. With ``weight_sync`` off (or RL mode
off) the original methods run unchanged.

Each engine object carries its own ``Transaction`` (``transaction_of``).
"""

from __future__ import annotations

from typing import Any, Callable

from vllm_rl_compat.patching import patch_method, when_imported
from vllm_rl_compat.weights.frontend.drive import AsyncLLMPort, LLMPort, run, run_async, stop_async
from vllm_rl_compat.weights.frontend.transaction import Transaction
from vllm_rl_compat.weights.protocol.versions import weight_sync_on

_ATTR = "_rl_compat_txn"


def transaction_of(engine: Any, vllm_config: Any) -> Transaction | None:
    """The engine's transaction, or ``None`` when weight_sync is off for it."""
    if not weight_sync_on(vllm_config):
        return None
    txn = engine.__dict__.get(_ATTR)
    if txn is None:
        txn = engine.__dict__[_ATTR] = Transaction(vllm_config)
    return txn


def _allow_fast() -> bool:
    """Read per update, so one engine can compare both apply paths."""
    from vllm_rl_compat import envs

    return envs.VLLM_RL_COMPAT_FAST_RELOAD


def staging_options(vllm_config: Any) -> dict[str, Any]:
    """How this update is staged (``Transaction.start``), read per update."""
    from vllm_rl_compat import envs
    from vllm_rl_compat.config import WEIGHT_STAGING_MODES, rl_config_from_additional
    from vllm_rl_compat.weights.protocol.registry import is_ours

    cfg = rl_config_from_additional(vllm_config.additional_config)
    mode = envs.VLLM_RL_COMPAT_WEIGHT_STAGING or cfg.weight_staging
    if mode not in WEIGHT_STAGING_MODES:
        raise ValueError(f"VLLM_RL_COMPAT_WEIGHT_STAGING={mode!r} is not one of "
                         f"{', '.join(WEIGHT_STAGING_MODES)}")
    transfer = getattr(vllm_config, "weight_transfer_config", None)
    if not is_ours(getattr(transfer, "backend", None)):
        if mode == "overlapped":
            raise ValueError("rl_compat.weight_staging='overlapped' needs one of our weight "
                             "backends (rl_compat_gloo / _tensors / _files); vLLM's own "
                             f"backend {transfer.backend!r} loads into the live weights")
        mode = "in_pause"  # vLLM's own backends load straight into the parameters
    max_gib = envs.VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB
    keep = envs.VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP
    return {"staging": mode,
            "max_gib": cfg.weight_staging_max_gib if max_gib is None else max_gib,
            "keep": cfg.weight_staging_keep if keep is None else keep,
            "allow_fast": _allow_fast(), "copy_plan": envs.VLLM_RL_COMPAT_COPY_PLAN}


def _field(request: Any, name: str) -> Any:
    """``request.name`` or ``request["name"]`` (vLLM accepts both shapes)."""
    if isinstance(request, dict):
        return request.get(name, {})
    return getattr(request, name)


# name -> (how the transaction step is built from the call's arguments)
_STEPS: dict[str, Callable[..., Any]] = {
    "init_weight_transfer_engine": lambda t, request: t.init(_field(request, "init_info")),
    "shutdown_weight_transfer_engine": lambda t: t.shutdown(),
    "start_weight_update": lambda t: t.start(staging_options(t.vllm_config)),
    "update_weights": lambda t, request, update_id=None: t.update(
        _field(request, "update_info"), update_id),
    "finish_weight_update": lambda t, weight_version=None, update_id=None: t.finish(
        weight_version, _allow_fast(), update_id),
}


def _sync_wrapper(steps: Callable[..., Any]) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            txn = transaction_of(self, self.llm_engine.vllm_config)
            if txn is None:
                return original(self, *args, **kwargs)
            return run(steps(txn, *args, **kwargs), LLMPort(self), txn)
        return method
    return wrap


def _async_wrapper(steps: Callable[..., Any]) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            txn = transaction_of(self, self.vllm_config)
            if txn is None:
                return await original(self, *args, **kwargs)
            return await run_async(steps(txn, *args, **kwargs), AsyncLLMPort(self), txn)
        return method
    return wrap


# ``AsyncLLM`` calls that must not run while an update is open: a pause or
# resume would cross the transaction's own (a resume mid-update decodes on
# weights being replaced), a label would name weights that are not served.
_GUARDED = ("pause_generation", "resume_generation", "update_weight_version")


def _guard(name: str) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            txn = transaction_of(self, self.vllm_config)
            if txn is not None:
                txn.require_closed(name)  # TransactionStateError: HTTP 409
            return await original(self, *args, **kwargs)
        return method
    return wrap


def _patch_llm(module: Any) -> None:
    for name, steps in _STEPS.items():
        patch_method(module.LLM, name, _sync_wrapper(steps))


def _patch_async_llm(module: Any) -> None:
    for name, steps in _STEPS.items():
        patch_method(module.AsyncLLM, name, _async_wrapper(steps))
    for name in _GUARDED:
        patch_method(module.AsyncLLM, name, _guard(name))


def install() -> None:
    """Patch both front ends now or when they are imported (idempotent)."""
    when_imported("vllm.entrypoints.llm", _patch_llm)
    when_imported("vllm.v1.engine.async_llm", _patch_async_llm)


ABORTED = "aborted by abort_weight_update"


def abort_weight_update(llm: Any, update_id: str | None = None) -> str | None:
    """Drop an open update of an offline ``LLM`` (e.g. its trainer died);
    returns its id, or ``None`` when none was open (``update_id``: drop only
    that update)."""
    txn = transaction_of(llm, llm.llm_engine.vllm_config)
    if txn is None or not txn.is_open:
        return None
    return run(txn.abort(victim=update_id, why=ABORTED), LLMPort(llm), txn)


async def abort_weight_update_async(engine: Any, update_id: str | None = None) -> str | None:
    """Drop an open update of an ``AsyncLLM`` (the HTTP route calls this),
    even one whose step is still waiting (a staging poll, a commit not yet
    applied: they stop, nothing applied); returns its id, or ``None``
    (``update_id``: drop only that update, ``None`` if another is open)."""
    txn = transaction_of(engine, engine.vllm_config)
    if txn is None:
        return None
    return await stop_async(txn, AsyncLLMPort(engine), ABORTED, update_id)
