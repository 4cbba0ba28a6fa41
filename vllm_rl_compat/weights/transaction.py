"""The one weight-update transaction, behind every front end (front-end process).

vLLM's RL calls (``init_weight_transfer_engine``, ``start_weight_update``,
``update_weights``, ``finish_weight_update``, ``shutdown_weight_transfer_engine``
on ``LLM`` and ``AsyncLLM``, hence the HTTP routes of ``vllm serve`` too) are
routed here in RL mode, whichever backend carries the bytes:

* start: open the backend's update on every worker. In the pause (vLLM's
  own backends, ``weight_staging='in_pause'``, or a model / machine that
  cannot stage beside its weights): first pause at an engine step boundary
  keeping running requests and their KV cache (``AsyncLLM``:
  ``pause_generation(mode="keep", clear_cache=False)``; offline ``LLM``:
  ``sleep(level=0, mode="keep")``), unless the caller already paused.
  Overlapped (our backends, ``auto`` / ``overlapped``): no pause yet, and
  the start goes out with the version and pause-state reads in one round
  trip (``("all", ...)``): while the engine steps, every engine-core call
  waits for the running step.
* update (any number of chunks): every worker receives and validates into
  staging (our backends) or loads (vLLM's own, which stream straight into
  the parameters). Overlapped, a staging thread per worker does it and
  loads a shadow of the model while the engine keeps stepping; the call
  polls (``poll:K``) until every worker has the chunk.
* finish: every worker checks its staging is complete (overlapped: and
  builds the packed state, polled; done already, without this step, when the
  last chunk completed the update on every worker); only then does any
  worker apply (our fast CPU apply, else vLLM's layerwise reload;
  overlapped: pause now and swap pointers), the fp32 head, close the
  backend's update. Then the version label is bumped and generation
  resumes. Overlapped on an ``AsyncLLM``: no pause; one engine-core call
  (``weights.boundary_commit``) does the check, the swap and the label
  between two engine steps.
* Any failure before the apply: every worker drops its staging, the model
  is unchanged, generation resumes (overlapped: it never stopped) and the
  caller gets ``WeightUpdateError`` naming the problem. A failure during
  the apply: ``WeightSyncCorruptedError``.

The steps are written once, as generators of engine operations; the sync and
async drivers (``run`` / ``run_async``) execute the same steps on an ``LLM``
or an ``AsyncLLM``. Each worker-side step carries a proof (``weights.proof``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generator

from vllm_rl_compat.weights import proof
from vllm_rl_compat.weights.spec import WeightSyncCorruptedError, WeightUpdateError
from vllm_rl_compat.weights.versions import parse_version, version_start

logger = logging.getLogger("vllm.rl_compat")

WORKER_METHOD = "rl_compat_txn"
Op = tuple  # ("rpc", step, info) | ("pause",) | ("all", [op, ...]) | ("settled", [op, ...]) | ...
Steps = Generator[Op, Any, Any]


DELIVERY_SECONDS = 0.02  # what vLLM's pause_generation waits for in-flight outputs


class TransactionStateError(RuntimeError):
    """A call out of order (a second start, an update without a start)."""


@dataclass
class Transaction:
    """Per-engine state of the weight-update transaction."""

    vllm_config: Any
    open_id: str | None = None
    paused_by_us: bool = False
    chunks: int = 0
    polls: int = 0
    may_pause: bool = True  # the caller had not paused generation itself
    version: int = 0
    started_at: float = 0.0
    paused_at: float | None = None
    overlapped: bool = False  # this update is staged beside the live weights
    at_boundary: bool = False  # the engine core can commit it between two steps
    prepared: bool = False  # overlapped: every worker validated and prepared it
    steps: list[str] = field(default_factory=list)  # worker steps of the last update
    last_pause_seconds: float | None = None  # pause to resume (0.0: never paused)
    last_update_seconds: float | None = None  # start to the new version live
    # per worker, the last successful apply: {"rank", "head_refreshed", "fast", "overlapped"}
    last_apply: list[dict[str, Any]] | None = None
    step_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.version = version_start(self.vllm_config)

    @property
    def is_open(self) -> bool:
        return self.open_id is not None

    # ------------------------------------------------------------- steps
    def init(self, init_info: dict[str, Any]) -> Steps:
        """Connect the backend (e.g. join the trainer's broadcast group)."""
        self._require_closed("init_weight_transfer_engine")
        txn = proof.new_txn_id()
        yield self._rpc(txn, "init", init_info)

    def shutdown(self) -> Steps:
        self._require_closed("shutdown_weight_transfer_engine")
        txn = proof.new_txn_id()
        yield self._rpc(txn, "shutdown")

    def start(self, staging: dict[str, Any] | None = None) -> Steps:
        """``staging``: ``{"staging": auto|overlapped|in_pause, "max_gib", "keep",
        "allow_fast", "copy_plan"}`` (``native.staging_options``); ``None``: in
        the pause."""
        staging = staging or {"staging": "in_pause"}
        self._open("start_weight_update")
        try:
            # One engine-core round trip where the order does not matter: each
            # call made while the engine steps waits for the running step.
            start = self._rpc(self.open_id, "start", staging)
            early = staging["staging"] != "in_pause"  # no pause before the start
            version, paused, self.at_boundary, *started = yield (
                "all", [("get_version",), ("is_paused",), ("can_commit",),
                        *([start] if early else [])])
            self._adopt(parse_version(version))
            may_pause = not paused
            if not early:
                if may_pause:
                    yield from self._pause()
                started = [(yield start)]
            results = started[0]
            self.overlapped = bool(results) and all(
                isinstance(r, dict) and r.get("overlapped") for r in results)
            if not self.overlapped and may_pause and not self.paused_by_us:
                yield from self._pause()
        except BaseException as exc:
            yield from self._close(abort=True)
            raise _rejected(exc) from exc
        self.may_pause = may_pause

    def update_once(self, staging: dict[str, Any], update_info: Any,
                    weight_version: str | None, allow_fast: bool) -> Steps:
        """A whole one-chunk update in one engine-core round trip, for an engine
        that commits at a step boundary (``AsyncWeightSync``; ``staging`` not
        ``in_pause``): start, the chunk and the commit are sent together and the
        commit waits in the engine core for the staging thread, so the new
        weights go live at the first step boundary after staging. If a worker
        stages in the pause after all (``auto``: the copy does not fit), the
        chunk is read between two steps and the commit applies it there: the
        pause's cost, without a pause. A failed step refuses the ones queued
        behind it (``worker._admit``), so nothing is applied."""
        self._open("start_weight_update")
        self.at_boundary, self.chunks = True, 1
        label = None if weight_version is None else str(weight_version)
        ops = [("get_version",), ("is_paused",), self._rpc(self.open_id, "start", staging),
               self._rpc(self.open_id, "update:1", update_info),
               self._commit_op(label, allow_fast)]
        version, _paused, started, updated, outcome = yield ("settled", ops)
        if not isinstance(version, BaseException):
            self._adopt(parse_version(version))
        if not isinstance(started, BaseException):
            self.overlapped = all(isinstance(r, dict) and r.get("overlapped") for r in started)
        failed = next((r for r in (started, updated, outcome)
                       if isinstance(r, BaseException)), None)
        if failed is not None and not isinstance(outcome, dict):  # nothing applied
            outcome = failed
        return (yield from self._commit(outcome))

    def update(self, update_info: Any) -> Steps:
        self._require_open("update_weights")
        self.chunks += 1
        try:
            yield self._rpc(self.open_id, f"update:{self.chunks}", update_info)
            yield from self._wait()
        except BaseException as exc:
            yield from self._close(abort=True)
            raise _rejected(exc) from exc

    def finish(self, weight_version: str | None, allow_fast: bool) -> Steps:
        """Check every worker, then apply; returns the new version."""
        self._require_open("finish_weight_update")
        label = str(self.version + 1) if weight_version is None else str(weight_version)
        if self.overlapped and self.at_boundary:
            return (yield from self._commit(self._commit_op(label, allow_fast)))
        try:
            if not self.prepared:  # else every worker checked after the last chunk
                yield self._rpc(self.open_id, "check")
                yield from self._wait()
            if self.overlapped and self.may_pause:
                yield from self._pause()
        except BaseException as exc:
            yield from self._close(abort=True)
            raise _rejected(exc) from exc
        try:
            self.last_apply = yield self._rpc(self.open_id, "finish", allow_fast)
        except BaseException as exc:
            yield from self._close(abort=False)
            raise WeightSyncCorruptedError(f"applying a validated update failed: {exc}") from exc
        self._adopt(parse_version(label), default=self.version + 1)
        try:
            yield ("set_version", label)
        finally:
            yield from self._close(abort=False)
        return self.version

    def _commit_op(self, label: str | None, allow_fast: bool) -> Op:
        self.steps.append("commit")
        txn = self.open_id
        return ("commit", txn, proof.sign(txn, "commit"), label, str(self.version + 1),
                allow_fast)

    def _commit(self, op: Op | dict[str, Any] | BaseException) -> Steps:
        """Overlapped, on an ``AsyncLLM``: one engine-core call applies the
        update and relabels between two steps, no pause
        (``weights.boundary_commit``); it first waits for staging if needed.
        ``op``: the call, or its outcome when it was sent already."""
        try:
            if isinstance(op, BaseException):
                raise op
            outcome = op if isinstance(op, dict) else (yield op)
        except BaseException as exc:
            yield from self._close(abort=True)
            raise _rejected(exc) from exc
        self.steps.extend(outcome["steps"])
        if outcome.get("failed") == "staging":
            yield from self._close(abort=True)
            raise _rejected(RuntimeError(outcome["error"]))
        yield from self._close(abort=False)
        if outcome.get("failed") == "apply":
            raise WeightSyncCorruptedError(
                f"applying a validated update failed: {outcome['error']}")
        self.last_apply = outcome["applied"]
        self._adopt(parse_version(outcome["label"]), default=self.version + 1)
        # The reply can overtake outputs of the steps before the commit inside
        # the front end; give them time to reach their streams first, as
        # ``AsyncLLM.pause_generation`` does (the engine keeps stepping).
        yield ("sleep", DELIVERY_SECONDS)
        return self.version

    def abort(self) -> Steps:
        """Drop an open update (e.g. the trainer died between start and finish)."""
        self._require_open("abort_weight_update")
        yield from self._close(abort=True)

    # ----------------------------------------------------------- helpers
    def _open(self, call: str) -> None:
        self._require_closed(call)
        self.open_id, self.chunks, self.polls = proof.new_txn_id(), 0, 0
        self.prepared, self.steps = False, []
        self.started_at, self.paused_at, self.overlapped = time.perf_counter(), None, False

    def _pause(self) -> Steps:
        yield ("pause",)
        self.paused_by_us, self.paused_at = True, time.perf_counter()

    def _wait(self) -> Steps:
        """Overlapped: poll until every worker's staging thread is done with
        what it was given (each poll is one short RPC between engine steps);
        note whether every worker also finished the update (``prepared``)."""
        delay = 0.002
        while self.overlapped:
            self.polls += 1
            states = yield self._rpc(self.open_id, f"poll:{self.polls}")
            if all(s["done"] for s in states):
                self.prepared = all(s["prepared"] for s in states)
                return
            yield ("sleep", delay)
            delay = min(delay * 2, 0.02)

    def _rpc(self, txn: str, step: str, info: Any = None) -> Op:
        if txn == self.open_id or step == "abort":
            self.steps.append(step)
        return ("rpc", {"txn": txn, "step": step, "proof": proof.sign(txn, step), "info": info})

    def _adopt(self, parsed: int | str, default: int | None = None) -> None:
        if isinstance(parsed, int):
            self.version = parsed
        elif default is not None:
            self.version = default

    def _close(self, abort: bool) -> Steps:
        txn, self.open_id = self.open_id, None
        try:
            if abort and txn is not None:
                try:
                    yield self._rpc(txn, "abort")
                except Exception:  # noqa: BLE001 - the original error is what matters
                    logger.exception("dropping a staged weight update failed")
        finally:
            if self.paused_by_us:
                self.paused_by_us = False
                yield ("resume",)
            now = time.perf_counter()
            self.last_pause_seconds = now - self.paused_at if self.paused_at else 0.0
            self.last_update_seconds = now - self.started_at

    def _require_open(self, call: str) -> None:
        if self.open_id is None:
            raise TransactionStateError(f"{call}: no weight update is in progress "
                                        f"(call start_weight_update first)")

    def _require_closed(self, call: str) -> None:
        if self.open_id is not None:
            raise TransactionStateError(f"{call}: a weight update is in progress; "
                                        f"finish_weight_update (or abort) it first")


def _rejected(exc: BaseException) -> BaseException:
    """What the caller sees when a step before the apply failed."""
    if isinstance(exc, (WeightUpdateError, TransactionStateError)):
        return exc
    text = str(exc)
    # vLLM wraps worker errors; keep the worker's own message readable.
    return WeightUpdateError(text if "model unchanged" in text else
                             f"weight update failed before anything was applied, model "
                             f"unchanged: {text}")


# -------------------------------------------------------------- drivers
def run(steps: Steps, port: Any) -> Any:
    """Execute ``steps`` on a synchronous port (``LLMPort``; no ``("settled", ...)``:
    only ``update_once`` sends it, on an ``AsyncLLM``)."""
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


async def run_async(steps: Steps, port: Any) -> Any:
    """Execute ``steps`` on an asynchronous port (``AsyncLLMPort``).

    A call is atomic with respect to task cancellation: an operation already
    sent to the engine (e.g. the apply) is awaited to its end and its real
    outcome fed to the steps, and ``CancelledError`` is raised once the steps
    are done, so a cancel never leaves staging, a half-closed transaction or
    applied weights with an old version label behind.
    """
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
        await self.engine.pause_generation(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await self.engine.resume_generation()

    async def is_paused(self) -> bool:
        return await self.engine.is_paused()

    async def can_commit(self) -> bool:
        """One engine core (no data parallelism), reached by utility calls."""
        parallel = self.engine.vllm_config.parallel_config
        return parallel.data_parallel_size == 1 and hasattr(
            getattr(self.engine, "engine_core", None), "call_utility_async")

    async def commit(self, txn: str, signed: str, label: str | None, default: str,
                     allow_fast: bool) -> Any:
        from vllm_rl_compat.weights.boundary_commit import METHOD

        return await self.engine.engine_core.call_utility_async(
            METHOD, txn, signed, label, default, allow_fast)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def get_version(self) -> str:
        return await self.engine.get_weight_version()

    async def set_version(self, label: str) -> None:
        await self.engine.update_weight_version(label)
