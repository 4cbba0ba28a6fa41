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
  (``weights.engine_core.commit``) does the check, the swap and the label
  between two engine steps.
* Any failure before the apply: every worker drops its staging, the model
  is unchanged, generation resumes (overlapped: it never stopped) and the
  caller gets ``WeightUpdateError`` naming the problem. A failure during
  the apply: ``WeightSyncCorruptedError``.

The steps are written once, as generators of engine operations; the sync and
async drivers (``weights.drive``: ``run`` / ``run_async``) execute the same
steps on an ``LLM`` or an ``AsyncLLM``, one at a time per engine (its lock).
Each worker-side step carries the update's id and a proof (``weights.proof``).
An abort or an expired lease marks the open update ``cancelled``: a step
waiting on staging stops at its next safe point, before anything is applied.
The state table is ``vllm_rl_compat.weights``' docstring.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generator

from vllm_rl_compat.weights.protocol import proof
from vllm_rl_compat.weights.protocol.spec import WeightSyncCorruptedError, WeightUpdateError
from vllm_rl_compat.weights.protocol.versions import parse_version, version_start

logger = logging.getLogger("vllm.rl_compat")

Op = tuple  # ("rpc", step, info) | ("pause",) | ("all", [op, ...]) | ("settled", [op, ...]) | ...
Steps = Generator[Op, Any, Any]


LEASE_BASE_SECONDS = 120.0  # a lease of 0 (auto): this, plus ...
LEASE_SECONDS_PER_GIB = 60.0  # ... this per GiB of the model's weights


class TransactionStateError(RuntimeError):
    """A call out of order (a second start, an update without a start, a pause
    or a version label change while an update is open)."""


def lease_seconds(vllm_config: Any, weight_bytes: int) -> float:
    """How long an open update may go without progress before it is aborted
    (``rl_compat.weight_update_lease_s``; ``0``: sized for the model)."""
    from vllm_rl_compat import envs
    from vllm_rl_compat.config import rl_config_from_additional

    lease = envs.VLLM_RL_COMPAT_WEIGHT_UPDATE_LEASE_S
    if lease is None:
        lease = rl_config_from_additional(vllm_config.additional_config).weight_update_lease_s
    if lease > 0:
        return float(lease)
    return LEASE_BASE_SECONDS + LEASE_SECONDS_PER_GIB * weight_bytes / 2**30


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
    threaded: bool = False  # some worker's staging thread works on this update
    # per worker, the last successful apply: {"rank", "head_refreshed", "fast", "overlapped"}
    last_apply: list[dict[str, Any]] | None = None
    step_lock: threading.Lock = field(default_factory=threading.Lock)  # LLM: one step at a time
    lease: float = LEASE_BASE_SECONDS  # of the open update (set by its start)
    last_progress: float = 0.0  # monotonic: when a step of the open update last began or ended
    # (id, why): the open update must stop at its next safe point (abort, lease)
    cancelled: tuple[str, str] | None = None
    ended: tuple[str, str] | None = None  # (id, why) of the last update ended by abort / lease
    commit_waiting: bool = False  # an engine-core commit of the open update is in flight
    watched: str | None = None  # the update whose lease is being watched
    on_close: list[Any] = field(default_factory=list)  # callbacks when the open update closes
    _async_lock: asyncio.Lock | None = None

    def __post_init__(self) -> None:
        self.version = version_start(self.vllm_config)

    @property
    def is_open(self) -> bool:
        return self.open_id is not None

    @property
    def async_lock(self) -> asyncio.Lock:
        """``AsyncLLM``: one step at a time (made in the engine's event loop)."""
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        return self._async_lock

    def progress(self) -> None:
        self.last_progress = time.monotonic()

    def idle_seconds(self) -> float:
        return time.monotonic() - self.last_progress

    def request_cancel(self, why: str, victim: str | None = None) -> str | None:
        """Mark the open update to stop at its next safe point (before anything
        is applied); returns its id, or ``None`` when none is open (``victim``:
        or when the open one is not that one)."""
        if self.open_id is None or (victim is not None and victim != self.open_id):
            return None
        self.cancelled = (self.open_id, why)
        return self.open_id

    # ------------------------------------------------------------- steps
    def init(self, init_info: dict[str, Any]) -> Steps:
        """Connect the backend (e.g. join the trainer's broadcast group)."""
        self.require_closed("init_weight_transfer_engine")
        txn = proof.new_txn_id()
        yield self._rpc(txn, "init", init_info)

    def shutdown(self) -> Steps:
        self.require_closed("shutdown_weight_transfer_engine")
        txn = proof.new_txn_id()
        yield self._rpc(txn, "shutdown")

    def start(self, staging: dict[str, Any] | None = None) -> Steps:
        """``staging``: ``{"staging": auto|overlapped|in_pause, "max_gib", "keep",
        "allow_fast", "copy_plan"}`` (``native.staging_options``); ``None``: in
        the pause. Returns the update's id: a caller that passes it to the
        later steps (``update_id``) cannot reach another update with them."""
        staging = staging or {"staging": "in_pause"}
        txn = self._open("start_weight_update")
        try:
            # One engine-core round trip where the order does not matter: each
            # call made while the engine steps waits for the running step.
            start = self._rpc(txn, "start", staging)
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
            self._started(results)
            if self.threaded and not self.overlapped:  # the ranks disagree: none stages
                yield self._rpc(txn, "in_pause")   # beside the weights (worker._in_pause)
                self.threaded = False
            if not self.overlapped and may_pause and not self.paused_by_us:
                yield from self._pause()
        except BaseException as exc:
            yield from self._close(txn, abort=True)
            raise self._rejected(exc) from exc
        self.may_pause = may_pause
        return txn

    def _started(self, results: Any) -> None:
        """Read every worker's staging decision and size the update's lease."""
        results = [r for r in (results or []) if isinstance(r, dict)]
        self.overlapped = bool(results) and all(r.get("overlapped") for r in results)
        self.threaded = any(r.get("overlapped") for r in results)
        weight_bytes = max((int(r.get("weight_bytes", 0)) for r in results), default=0)
        self.lease = lease_seconds(self.vllm_config, weight_bytes)

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
        txn = self._open("start_weight_update")
        self.at_boundary, self.chunks = True, 1
        label = None if weight_version is None else str(weight_version)
        ops = [("get_version",), ("is_paused",), self._rpc(txn, "start", staging),
               self._rpc(txn, "update:1", update_info), self._commit_op(txn, label, allow_fast)]
        self.commit_waiting = True
        try:
            version, _paused, started, updated, outcome = yield ("settled", ops)
        finally:
            self.commit_waiting = False
        if not isinstance(version, BaseException):
            self._adopt(parse_version(version))
        if not isinstance(started, BaseException):
            self._started(started)
        failed = next((r for r in (started, updated, outcome)
                       if isinstance(r, BaseException)), None)
        if failed is not None and not isinstance(outcome, dict):  # nothing applied
            outcome = failed
        return (yield from self._commit(txn, outcome))

    def update(self, update_info: Any, update_id: str | None = None) -> Steps:
        txn = self._require_open("update_weights", update_id)
        self.chunks += 1
        try:
            self._check_cancel(txn)
            yield self._rpc(txn, f"update:{self.chunks}", update_info)
            yield from self._wait(txn)
        except BaseException as exc:
            yield from self._close(txn, abort=True)
            raise self._rejected(exc) from exc

    def finish(self, weight_version: str | None, allow_fast: bool,
               update_id: str | None = None) -> Steps:
        """Check every worker, then apply; returns the new version."""
        txn = self._require_open("finish_weight_update", update_id)
        label = str(self.version + 1) if weight_version is None else str(weight_version)
        if self.overlapped and self.at_boundary:
            try:
                self._check_cancel(txn)
            except BaseException as exc:
                yield from self._close(txn, abort=True)
                raise self._rejected(exc) from exc
            self.commit_waiting = True
            try:
                outcome = yield self._commit_op(txn, label, allow_fast)
            except BaseException as exc:  # noqa: BLE001 - handled by _commit
                outcome = exc
            finally:
                self.commit_waiting = False
            return (yield from self._commit(txn, outcome))
        try:
            if not self.prepared:  # else every worker checked after the last chunk
                yield self._rpc(txn, "check")
                yield from self._wait(txn)
            self._check_cancel(txn)  # the last point where nothing is applied yet
            if self.overlapped and self.may_pause:
                yield from self._pause()
        except BaseException as exc:
            yield from self._close(txn, abort=True)
            raise self._rejected(exc) from exc
        try:
            self.last_apply = yield self._rpc(txn, "finish", allow_fast)
        except BaseException as exc:
            yield from self._close(txn, abort=False)
            raise WeightSyncCorruptedError(f"applying a validated update failed: {exc}") from exc
        self._adopt(parse_version(label), default=self.version + 1)
        try:
            yield ("set_version", label)
        finally:
            yield from self._close(txn, abort=False)
        return self.version

    def _commit_op(self, txn: str, label: str | None, allow_fast: bool) -> Op:
        self.steps.append("commit")
        return ("commit", txn, proof.sign(txn, "commit"), label, str(self.version + 1),
                allow_fast)

    def _commit(self, txn: str, outcome: dict[str, Any] | BaseException) -> Steps:
        """Overlapped, on an ``AsyncLLM``: one engine-core call applied the
        update and relabelled between two steps, no pause
        (``weights.engine_core.commit``), or said why it did not."""
        if isinstance(outcome, BaseException):
            yield from self._close(txn, abort=True)
            raise self._rejected(outcome) from outcome
        self.steps.extend(outcome["steps"])
        if outcome.get("failed") == "staging":
            yield from self._close(txn, abort=True)
            raise self._rejected(RuntimeError(outcome["error"]))
        yield from self._close(txn, abort=False)
        if outcome.get("failed") == "apply":
            raise WeightSyncCorruptedError(
                f"applying a validated update failed: {outcome['error']}")
        self.last_apply = outcome["applied"]
        self._adopt(parse_version(outcome["label"]), default=self.version + 1)
        # The reply can overtake outputs of the steps before the commit inside
        # the front end: return once the front end has delivered every output
        # the engine core sent before it (``weights.delivery``).
        yield ("delivered",)
        return self.version

    def abort(self, victim: str | None = None, why: str = "aborted by its caller") -> Steps:
        """Drop the open update (``victim``: only if it is still that one), e.g.
        the trainer died between start and finish; returns the id dropped, or
        ``None`` when there was nothing to drop."""
        txn = self.open_id
        if txn is None or (victim is not None and txn != victim):
            return None
        self.cancelled = (txn, why)
        yield from self._close(txn, abort=True)
        return txn

    # ----------------------------------------------------------- helpers
    def _open(self, call: str) -> str:
        self.require_closed(call)
        self.open_id, self.chunks, self.polls = proof.new_txn_id(), 0, 0
        self.prepared, self.steps, self.cancelled = False, [], None
        self.started_at, self.paused_at, self.overlapped = time.perf_counter(), None, False
        self.threaded = False
        self.progress()
        return self.open_id

    def _check_cancel(self, txn: str) -> None:
        if self.cancelled is not None and self.cancelled[0] == txn:
            raise WeightUpdateError(f"weight update {txn[:8]} stopped: {self.cancelled[1]}; "
                                    f"model unchanged")

    def _pause(self) -> Steps:
        yield ("pause",)
        self.paused_by_us, self.paused_at = True, time.perf_counter()

    def _wait(self, txn: str) -> Steps:
        """Overlapped: poll until every worker's staging thread is done with
        what it was given (each poll is one short RPC between engine steps);
        note whether every worker also finished the update (``prepared``).
        An abort or an expired lease stops the wait (``cancelled``)."""
        delay = 0.002
        while self.overlapped:
            self._check_cancel(txn)
            self.polls += 1
            states = yield self._rpc(txn, f"poll:{self.polls}")
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

    def _close(self, txn: str, abort: bool) -> Steps:
        """End update ``txn`` (if it is still the open one): drop its staging on
        every worker if ``abort``, release our pause; only then is it closed
        (nothing sees the update closed while generation is still paused)."""
        if self.open_id != txn:
            return
        try:
            if abort:
                try:
                    yield self._rpc(txn, "abort")
                except Exception:  # noqa: BLE001 - the original error is what matters
                    logger.exception("dropping a staged weight update failed")
        finally:
            try:
                if self.paused_by_us:
                    self.paused_by_us = False
                    yield ("resume",)
            finally:
                self._closed(txn)

    def _closed(self, txn: str) -> None:
        self.open_id = None
        if self.cancelled is not None and self.cancelled[0] == txn:
            self.ended, self.cancelled = self.cancelled, None
        now = time.perf_counter()
        self.last_pause_seconds = now - self.paused_at if self.paused_at else 0.0
        self.last_update_seconds = now - self.started_at
        while self.on_close:
            self.on_close.pop()()

    def _require_open(self, call: str, update_id: str | None = None) -> str:
        """The open update's id; refused when none is open, or (``update_id``
        given) when the open one is another: a step sent for an update that
        was aborted or expired (a client that timed out, then started again)
        must not land in the next one."""
        if self.open_id is None:
            last = "" if self.ended is None else (
                f"; the last one, {self.ended[0][:8]}, was stopped: {self.ended[1]}")
            raise TransactionStateError(f"{call}: no weight update is in progress "
                                        f"(call start_weight_update first){last}")
        if update_id is not None and update_id != self.open_id:
            raise TransactionStateError(
                f"{call}: weight update {str(update_id)[:8]} is not the open one "
                f"({self.open_id[:8]} is); it was aborted or expired, nothing done")
        return self.open_id

    def require_closed(self, call: str) -> None:
        """Refuse ``call`` while an update is open, naming it (a second start,
        init / shutdown, a pause, resume or version label: ``native._guard``)."""
        if self.open_id is not None:
            raise TransactionStateError(f"{call}: weight update {self.open_id[:8]} is in "
                                        f"progress; finish_weight_update (or abort) it first")

    def _rejected(self, exc: BaseException) -> BaseException:
        """What the caller sees when a step before the apply failed: what state
        the model is in, for this engine's backend."""
        if isinstance(exc, (WeightUpdateError, TransactionStateError)):
            return exc
        text = str(exc)
        if not self.staged_backend:  # vLLM's nccl / ipc write the live parameters
            return WeightUpdateError(
                f"weight update failed; weight backend {self.backend!r} streams into the "
                f"live weights, so the model may now hold part of this update, and "
                f"generation has resumed on it (weight version unchanged): send a complete "
                f"update next. Error: {text}")
        # vLLM wraps worker errors; keep the worker's own message readable.
        return WeightUpdateError(text if "model unchanged" in text else
                                 f"weight update failed before anything was applied, model "
                                 f"unchanged: {text}")

    @property
    def backend(self) -> str | None:
        transfer = getattr(self.vllm_config, "weight_transfer_config", None)
        return getattr(transfer, "backend", None)

    @property
    def staged_backend(self) -> bool:
        """Our backends stage every byte before anything is applied."""
        from vllm_rl_compat.weights.protocol.registry import is_ours

        return is_ours(self.backend)
