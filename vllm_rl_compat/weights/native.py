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
from vllm_rl_compat.weights.transaction import (
    AsyncLLMPort,
    LLMPort,
    Transaction,
    run,
    run_async,
)
from vllm_rl_compat.weights.versions import weight_sync_on

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


def _field(request: Any, name: str) -> Any:
    """``request.name`` or ``request["name"]`` (vLLM accepts both shapes)."""
    if isinstance(request, dict):
        return request.get(name, {})
    return getattr(request, name)


# name -> (how the transaction step is built from the call's arguments)
_STEPS: dict[str, Callable[..., Any]] = {
    "init_weight_transfer_engine": lambda t, request: t.init(_field(request, "init_info")),
    "shutdown_weight_transfer_engine": lambda t: t.shutdown(),
    "start_weight_update": lambda t: t.start(),
    "update_weights": lambda t, request: t.update(_field(request, "update_info")),
    "finish_weight_update": lambda t, weight_version=None: t.finish(weight_version,
                                                                   _allow_fast()),
}


def _sync_wrapper(steps: Callable[..., Any]) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            txn = transaction_of(self, self.llm_engine.vllm_config)
            if txn is None:
                return original(self, *args, **kwargs)
            with txn.step_lock:
                return run(steps(txn, *args, **kwargs), LLMPort(self))
        return method
    return wrap


def _async_wrapper(steps: Callable[..., Any]) -> Callable[[Any], Any]:
    def wrap(original: Any) -> Any:
        async def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            txn = transaction_of(self, self.vllm_config)
            if txn is None:
                return await original(self, *args, **kwargs)
            return await run_async(steps(txn, *args, **kwargs), AsyncLLMPort(self))
        return method
    return wrap


def _patch_llm(module: Any) -> None:
    for name, steps in _STEPS.items():
        patch_method(module.LLM, name, _sync_wrapper(steps))


def _patch_async_llm(module: Any) -> None:
    for name, steps in _STEPS.items():
        patch_method(module.AsyncLLM, name, _async_wrapper(steps))


def install() -> None:
    """Patch both front ends now or when they are imported (idempotent)."""
    when_imported("vllm.entrypoints.llm", _patch_llm)
    when_imported("vllm.v1.engine.async_llm", _patch_async_llm)


def abort_weight_update(llm: Any) -> None:
    """Drop an open update of an offline ``LLM`` (e.g. its trainer died)."""
    txn = transaction_of(llm, llm.llm_engine.vllm_config)
    if txn is not None and txn.is_open:
        with txn.step_lock:
            run(txn.abort(), LLMPort(llm))


async def abort_weight_update_async(engine: Any) -> None:
    """Drop an open update of an ``AsyncLLM`` (the HTTP route calls this)."""
    txn = transaction_of(engine, engine.vllm_config)
    if txn is not None and txn.is_open:
        await run_async(txn.abort(), AsyncLLMPort(engine))
