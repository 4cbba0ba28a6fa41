"""Running the transaction's steps on an engine (front-end process).

``weights.transaction`` writes each step of an update once, as a generator of
engine operations; this module executes them on an offline ``LLM`` (``run``,
``LLMPort``) or an ``AsyncLLM`` (``run_async``, ``AsyncLLMPort``), one step at
a time per engine (its lock), and stops an open update from outside its steps
(``stop_async``: ``abort_weight_update``, an expired lease).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from vllm_rl_compat.weights.frontend.transaction import Op, Steps, Transaction
from vllm_rl_compat.weights.protocol import proof
from vllm_rl_compat.weights.protocol.names import COMMIT_CANCEL, COMMIT_METHOD, WORKER_METHOD

logger = logging.getLogger("vllm.rl_compat")



def run(steps: Steps, port: Any, txn: Transaction) -> Any:
    """Execute ``steps`` on a synchronous port (``LLMPort``; no ``("settled", ...)``:
    only ``update_once`` sends it, on an ``AsyncLLM``), holding the engine's
    step lock. An open update idle past its lease is aborted first (an offline
    ``LLM`` has no other thread to do it: its next call does)."""
    with txn.step_lock:
        if txn.is_open and txn.idle_seconds() > txn.lease:
            _drive(txn.abort(why=_lease_why(txn)), port)
        txn.progress()
        try:
            return _drive(steps, port)
        finally:
            txn.progress()


def _drive(steps: Steps, port: Any) -> Any:
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration as stop:
            return stop.value
        try:
            ops = op[1] if op[0] == "all" else [op]
            results = [getattr(port, o[0])(*o[1:]) for o in ops]
            result, error = results if op[0] == "all" else results[0], None
        except BaseException as exc:  # noqa: BLE001 - thrown back into the steps
            result, error = None, exc


def _lease_why(txn: Transaction) -> str:
    return f"its lease expired ({txn.lease:.3g} s without a call or progress)"


async def run_async(steps: Steps, port: Any, txn: Transaction) -> Any:
    """Execute ``steps`` on an asynchronous port (``AsyncLLMPort``) holding the
    engine's step lock; an update left open gets a lease watch.

    A call is atomic with respect to task cancellation: an operation already
    sent to the engine (e.g. the apply) is awaited to its end and its real
    outcome fed to the steps, and ``CancelledError`` is raised once the steps
    are done, so a cancel never leaves staging, a half-closed transaction or
    applied weights with an old version label behind.
    """
    async with txn.async_lock:
        txn.progress()
        try:
            return await _drive_async(steps, port)
        finally:
            txn.progress()
            if txn.is_open:
                _watch_lease(txn, port)


async def stop_async(txn: Transaction, port: Any, why: str,
                     victim: str | None = None) -> str | None:
    """Abort the open update from outside its steps (``abort_weight_update``, an
    expired lease): mark it cancelled, so a step that waits (staging polls, an
    engine-core commit not yet applied) stops at its next safe point, then
    take the lock and drop whatever is still open (``victim``: only that
    update). Returns the id dropped."""
    victim = txn.request_cancel(why, victim)
    if victim is None:
        return None
    if txn.commit_waiting:
        await port.cancel_commit(victim, why)
    async with txn.async_lock:
        dropped = await _drive_async(txn.abort(victim, why), port)
    return dropped or (victim if txn.ended and txn.ended[0] == victim else None)


def _watch_lease(txn: Transaction, port: Any) -> None:
    """One watch per open update: abort it once it has gone ``lease`` seconds
    without a call (a trainer that died after start); it ends when the
    update closes."""
    watched = txn.open_id
    if watched is None or txn.watched == watched:
        return
    txn.watched = watched
    closed = asyncio.Event()
    txn.on_close.append(closed.set)

    async def watch() -> None:
        while txn.open_id == watched:
            left = txn.lease - txn.idle_seconds()
            if left > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closed.wait(), left)
                continue
            logger.warning("weight update %s aborted: %s", watched[:8], _lease_why(txn))
            await stop_async(txn, port, _lease_why(txn), watched)
            return

    asyncio.ensure_future(watch())


async def _drive_async(steps: Steps, port: Any) -> Any:
    result: Any = None
    error: BaseException | None = None
    cancelled = False
    while True:
        try:
            op = steps.throw(error) if error is not None else steps.send(result)
        except StopIteration as stop:
            if cancelled:
                raise asyncio.CancelledError()
            return stop.value
        future = asyncio.ensure_future(_all(port, op[1], op[0] == "settled")
                                       if op[0] in ("all", "settled")
                                       else getattr(port, op[0])(*op[1:]))
        while True:
            try:
                result, error = await asyncio.shield(future), None
                break
            except asyncio.CancelledError:
                if future.cancelled():
                    raise
                cancelled = True  # finish this operation first
            except BaseException as exc:  # noqa: BLE001 - thrown back into the steps
                result, error = None, exc
                break


async def _all(port: Any, ops: list[Op], settled: bool = False) -> list[Any]:
    """``ops`` at once, sent in order (``("all", ops)``); every one ends before
    the first error, if any, is raised (nothing is left running behind the
    steps). ``settled``: errors are returned in place of results instead."""
    results = await asyncio.gather(*(getattr(port, o[0])(*o[1:]) for o in ops),
                                   return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not settled:
            raise result
    return results


class LLMPort:
    """Engine operations of an offline ``LLM`` (blocking)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def rpc(self, kwargs: dict[str, Any]) -> list[Any]:
        return self.llm.collective_rpc(WORKER_METHOD, kwargs=kwargs)

    def pause(self) -> None:
        self.llm.sleep(level=0, mode="keep")

    def resume(self) -> None:
        self.llm.wake_up(tags=["scheduling"])

    def is_paused(self) -> bool:
        return False  # the offline LLM has no user-level pause

    def can_commit(self) -> bool:
        return False  # it steps only inside generate calls: the pause costs nothing

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def delivered(self) -> None:
        """``generate`` reads the engine's outputs itself: nothing in flight."""

    def get_version(self) -> str:
        return self.llm.llm_engine.get_weight_version()

    def set_version(self, label: str) -> None:
        self.llm.llm_engine.set_weight_version(label)


class AsyncLLMPort:
    """Engine operations of an ``AsyncLLM`` (awaitable)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    async def rpc(self, kwargs: dict[str, Any]) -> list[Any]:
        return await self.engine.collective_rpc(WORKER_METHOD, kwargs=kwargs)

    async def pause(self) -> None:
        await _unguarded(self.engine, "pause_generation")(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await _unguarded(self.engine, "resume_generation")()

    async def is_paused(self) -> bool:
        return await self.engine.is_paused()

    async def can_commit(self) -> bool:
        """One engine core (no data parallelism), reached by utility calls."""
        parallel = self.engine.vllm_config.parallel_config
        return parallel.data_parallel_size == 1 and hasattr(
            getattr(self.engine, "engine_core", None), "call_utility_async")

    async def commit(self, txn: str, signed: str, label: str | None, default: str,
                     allow_fast: bool) -> Any:

        return await self.engine.engine_core.call_utility_async(
            COMMIT_METHOD, txn, signed, label, default, allow_fast)

    async def cancel_commit(self, txn: str, why: str) -> None:
        """Stop a commit still waiting in the engine core for staging."""

        await self.engine.engine_core.call_utility_async(COMMIT_CANCEL, txn,
                                                         proof.sign(txn, "cancel"), why)

    async def delivered(self) -> None:
        from vllm_rl_compat.weights.frontend.delivery import delivered

        await delivered(self.engine)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def get_version(self) -> str:
        return await self.engine.get_weight_version()

    async def set_version(self, label: str) -> None:
        await _unguarded(self.engine, "update_weight_version")(label)


def _unguarded(engine: Any, name: str) -> Any:
    """vLLM's own method, past the guard that refuses it while an update is
    open (``weights.native``): the transaction itself calls it."""
    from vllm_rl_compat.patching import original_of

    return original_of(type(engine), name).__get__(engine)
