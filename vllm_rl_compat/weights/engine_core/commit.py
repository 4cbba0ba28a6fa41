"""Commit an overlapped weight update between two engine steps (engine-core process).

Why: the front end's finish of an overlapped update was four engine calls --
pause (``AsyncLLM.pause_generation`` waits for the running step, then sleeps
20 ms in the front end), apply, set the version label, resume -- and every
millisecond of them is a gap between two steps, a stall seen by every running
request. The engine core runs client calls and steps on one thread, so between
two steps nothing reads the weights: an apply and a label change made there
are as atomic as in a pause. ``EngineCoreProc.rl_compat_commit`` (a utility
call of ``AsyncLLM``'s client, carrying the transaction's proof) does both in
the same gap, with no pause: vLLM defers the reply of a utility that returns
a ``Future`` until it is done. If a worker's staging thread is still busy,
the commit waits for the next step boundary (``_process_engine_step`` is
wrapped to try again after each step). While a commit waits the engine core
counts as having work (``has_work``), so its loop keeps turning even with no
request to step (idle, or paused by the caller: then it tries every 2 ms)
and still takes new requests and calls meanwhile.

An abort or an expired lease stops a commit that still waits
(``rl_compat_commit_cancel``, signed like the commit): between two steps, so
it has either applied already or never will.

Outcome (the call's result): ``{"applied": [per worker], "label": ..., "steps": [...]}``;
``{"failed": "staging", ...}`` when staging failed (the front end aborts:
live weights untouched, label unchanged); ``{"failed": "apply", ...}`` when
applying failed (``WeightSyncCorruptedError`` in the front end).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from vllm_rl_compat.patching import add_method, patch_method, when_imported
from vllm_rl_compat.weights.protocol import proof
from vllm_rl_compat.weights.protocol.names import COMMIT_CANCEL, COMMIT_METHOD, WORKER_METHOD

_ATTR = "_rl_compat_commit"
_CANCELLED = "_rl_compat_commit_cancelled"  # (txn, why) cancelled before its commit came
IDLE_POLL_SECONDS = 0.002


@dataclass
class _Commit:
    txn: str
    label: str
    allow_fast: bool
    future: Future = field(default_factory=Future)
    steps: list[str] = field(default_factory=list)
    polls: int = 0
    checked: bool = False


def rl_compat_commit(self: Any, txn: str, signed: str, label: str | None, default: str,
                     allow_fast: bool) -> Any:
    """Utility call: apply transaction ``txn`` at a step boundary and label the
    steps after it ``label`` (``None``: the current integer label + 1, else
    ``default``: the front end may not have read the label yet)."""
    proof.verify(txn, "commit", signed)
    if self.__dict__.get(_ATTR) is not None:
        raise RuntimeError("a weight-update commit is already waiting in this engine")
    commit = _Commit(txn, _next_label(self, default) if label is None else str(label),
                     bool(allow_fast))
    self.__dict__[_ATTR] = commit
    cancelled = self.__dict__.pop(_CANCELLED, None)
    if cancelled is not None and cancelled[0] == txn:
        _end(self, commit, {"failed": "staging", "error": cancelled[1]})
    else:
        _advance(self)
    return commit.future  # vLLM replies when it is done


def rl_compat_commit_cancel(self: Any, txn: str, signed: str, why: str) -> bool:
    """Utility call (abort, expired lease): end commit ``txn`` if it is still
    waiting for staging, as a failed staging (nothing applied; the front end
    then drops the staging). Between two steps, like the commit itself: it
    either has applied already (``False``) or never will (``True``)."""
    proof.verify(txn, "cancel", signed)
    commit = self.__dict__.get(_ATTR)
    if commit is None or commit.txn != txn:
        self.__dict__[_CANCELLED] = (txn, why)  # a commit sent before it may still come
        return False
    _end(self, commit, {"failed": "staging", "error": why})
    return True


def _next_label(core: Any, default: str) -> str:
    from vllm_rl_compat.weights.engine_core.labels import current_label
    from vllm_rl_compat.weights.protocol.versions import parse_version

    now = parse_version(current_label(core))
    return str(now + 1) if isinstance(now, int) else default


def _wrap_step(original: Callable[..., Any]) -> Callable[..., Any]:
    def _process_engine_step(self: Any) -> Any:
        model_executed = original(self)
        if self.__dict__.get(_ATTR) is not None:
            if not model_executed:  # nothing to step: do not poll the workers hot
                time.sleep(IDLE_POLL_SECONDS)
            _advance(self)
        return model_executed
    return _process_engine_step


def _wrap_has_work(original: Callable[..., Any]) -> Callable[..., Any]:
    def has_work(self: Any) -> bool:
        return original(self) or self.__dict__.get(_ATTR) is not None
    return has_work


def _advance(core: Any) -> None:
    """One try: when every worker has staged and prepared, apply and relabel."""
    commit = core.__dict__[_ATTR]
    try:
        commit.polls += 1
        states = _step(core, commit, f"poll:c{commit.polls}")
        if not all(s["done"] for s in states):
            return
        if not commit.checked and not all(s["prepared"] for s in states):
            commit.checked = True  # done (and error-free) at a later poll: checked
            _step(core, commit, "check")  # overlapped: prepares in the staging thread
            return
    except Exception as exc:  # noqa: BLE001 - reported to the front end, which aborts
        _end(core, commit, {"failed": "staging", "error": str(exc)})
        return
    try:
        applied = _step(core, commit, "finish", commit.allow_fast)
        core.set_weight_version(commit.label)  # same gap: no step saw them unlabelled
    except Exception as exc:  # noqa: BLE001 - never out of the engine core's loop
        _end(core, commit, {"failed": "apply", "error": str(exc)})
        return
    _end(core, commit, {"applied": applied, "label": commit.label})


def _step(core: Any, commit: _Commit, step: str, info: Any = None) -> list[Any]:
    commit.steps.append(step)
    kwargs = {"txn": commit.txn, "step": step, "proof": proof.sign(commit.txn, step),
              "info": info}
    return core.collective_rpc(WORKER_METHOD, kwargs=kwargs)


def _end(core: Any, commit: _Commit, outcome: dict[str, Any]) -> None:
    core.__dict__[_ATTR] = None
    commit.future.set_result({**outcome, "steps": list(commit.steps)})


def install() -> None:
    """Engine core: the commit utility and the retry after each step."""
    def apply(module: Any) -> None:
        from vllm_rl_compat.contract import require

        require("EngineCoreProc._invoke_utility_method")  # defers a Future's reply
        add_method(module.EngineCoreProc, COMMIT_METHOD, rl_compat_commit)
        add_method(module.EngineCoreProc, COMMIT_CANCEL, rl_compat_commit_cancel)
        patch_method(module.EngineCoreProc, "_process_engine_step", _wrap_step)
        patch_method(module.EngineCoreProc, "has_work", _wrap_has_work)
    when_imported("vllm.v1.engine.core", apply)
