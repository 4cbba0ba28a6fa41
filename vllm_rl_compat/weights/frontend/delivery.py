"""A commit returns only after the outputs before it are delivered (front-end process).

Why: the engine core sends request outputs and utility replies on one socket,
in order, but the front end handles them on two paths: a reply resolves its
future at once, outputs wait in the client's queue for ``AsyncLLM``'s output
handler, which pushes them to the request streams. So the reply of a
boundary commit (``weights.engine_core.commit``) can overtake the outputs of the
steps before it, and a caller told "version N+1 is live" could still receive
tokens of version N afterwards. vLLM's own ``pause_generation`` bridges this
with a fixed 20 ms sleep; here it is a protocol.

How: the output handler calls ``get_output_async`` once per batch of outputs,
after it has delivered the previous batch. Counting those calls
(``_Counter``), ``delivered`` waits until the handler has asked for the batch
after the last one queued when the reply arrived (every batch sent before the
reply is queued by then: one socket, read in order).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable

from vllm_rl_compat.patching import patch_method, when_imported

_ATTR = "_rl_compat_delivery"


@dataclass
class _Counter:
    calls: int = 0  # get_output_async calls made by the output handler
    waiting: bool = False  # the handler waits inside one (all before it delivered)
    waiters: list[tuple[int, asyncio.Future]] = field(default_factory=list)

    def called(self) -> None:
        self.calls += 1
        for target, future in [w for w in self.waiters if w[0] <= self.calls]:
            self.waiters.remove((target, future))
            if not future.done():
                future.set_result(None)


def _counter(client: Any) -> _Counter:
    counter = client.__dict__.get(_ATTR)
    if counter is None:
        counter = client.__dict__[_ATTR] = _Counter()
    return counter


def _wrap_get(original: Callable[..., Any]) -> Callable[..., Any]:
    async def get_output_async(self: Any) -> Any:
        counter = _counter(self)
        counter.called()
        counter.waiting = True
        try:
            return await original(self)
        finally:
            counter.waiting = False
    return get_output_async


async def delivered(engine: Any) -> None:
    """Return once every output batch queued now has reached its request
    streams (at once when the output handler is not running)."""
    handler = getattr(engine, "output_handler", None)
    client = engine.engine_core
    if handler is None or handler.done():
        return
    counter = _counter(client)
    queued = client.outputs_queue.qsize()
    target = counter.calls + queued + (0 if counter.waiting else 1)
    if counter.calls >= target:
        return
    future = asyncio.get_running_loop().create_future()
    counter.waiters.append((target, future))
    # The handler dying (engine failure) must not leave the caller waiting.
    await asyncio.wait([future, handler], return_when=asyncio.FIRST_COMPLETED)


def install() -> None:
    when_imported("vllm.v1.engine.core_client",
                  lambda module: patch_method(module.AsyncMPClient, "get_output_async",
                                              _wrap_get))
