"""Which weight version computed each request's prompt KV (engine core process).

Why: the per-token spans say which weights sampled each output token, but a
token also depends on the KV it attends to. In keep mode a request kept
across an update reads the prompt KV of the old weights (under chunked
prefill, half old and half new), and with a prefix cache a prompt may be
read from blocks another request computed: with plain caching, blocks of
older weights. A trainer that drops or re-weights such samples must see it.

How (scheduler, engine core; only when ``weight_sync`` is on):
- ``Scheduler.schedule`` is wrapped: every chunk it schedules is computed in
  this step, under the label the transaction set while paused, so each
  request keeps spans ``[start, end)`` of positions and the version that
  computed their KV (a new or resumed request starts from its cache hits);
- ``BlockPool.cache_full_blocks`` is wrapped: a block entering the prefix
  cache keeps the spans of its positions, keyed by block id (bounded by the
  pool), so a request that hits it reads which version computed it;
- ``Scheduler._free_request`` is wrapped: a finished request's prompt spans
  ride to the front end in the ``kv_transfer_params`` it returns (the one
  per-request dict vLLM carries from the scheduler to the ``RequestOutput``),
  under ``protocol.names.PROMPT_KV_KEY``; ``kv_versions_output`` (front end) moves them onto the
  ``CompletionOutput`` and removes the key, so users never see it there.
The version label follows ``labels.on_version_change``.
"""

from __future__ import annotations

from typing import Any

from vllm_rl_compat.weights.protocol.names import PROMPT_KV_KEY

_SPANS = "_rl_compat_kv_spans"  # request.__dict__: [[label, start, end], ...]
_STATE = "_rl_compat_kv_versions"  # scheduler and block pool __dict__: the _State

Span = list  # [label: str | None, start: int, end: int]


class _State:
    """One engine core's label and the spans of its cached blocks."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.blocks: dict[int, tuple[tuple[str | None, int, int], ...]] = {}


def _state(scheduler: Any) -> _State | None:
    """The scheduler's state, created on first use; ``None`` when weight_sync is off."""
    if _STATE not in scheduler.__dict__:
        from vllm_rl_compat.weights.engine_core.labels import start_label

        label = start_label(scheduler.vllm_config)
        state = None if label is None else _State(label)
        scheduler.__dict__[_STATE] = state
        pool = getattr(scheduler.kv_cache_manager, "block_pool", None)
        if pool is not None:
            pool.__dict__[_STATE] = state
    return scheduler.__dict__[_STATE]


def note_version(core: Any) -> None:
    """``labels.on_version_change`` hook: later steps run under the new label."""
    from vllm_rl_compat.weights.engine_core.labels import current_label

    state = _state(core.scheduler)
    if state is not None:
        state.label = current_label(core)


def _append(spans: list[Span], label: str | None, start: int, end: int) -> None:
    if end <= start:
        return
    if spans and spans[-1][0] == label and spans[-1][2] == start:
        spans[-1][2] = end
    else:
        spans.append([label, start, end])


def _clip(spans: list[Span], start: int, end: int) -> list[Span]:
    out: list[Span] = []
    for label, s, e in spans:
        _append(out, label, max(s, start), min(e, end))
    return out


def _hit_spans(scheduler: Any, state: _State, request_id: str, hits: int) -> list[Span]:
    """Spans of the first ``hits`` positions, read from cache blocks (``None``:
    no label, e.g. KV a connector loaded)."""
    spans: list[Span] = []
    if hits <= 0:
        return spans
    for block_id in scheduler.kv_cache_manager.get_block_ids(request_id)[0]:
        covered = spans[-1][2] if spans else 0
        block = state.blocks.get(block_id)
        if covered >= hits or not block or block[0][1] != covered:
            break  # done, or a block nobody labelled: the rest is unknown
        for label, s, e in block:
            _append(spans, label, s, min(e, hits))
    _append(spans, None, spans[-1][2] if spans else 0, hits)
    return spans


def _track(scheduler: Any, state: _State, out: Any) -> None:
    """Record the positions each scheduled request computes in this step."""
    restarted = {r.req_id for r in out.scheduled_new_reqs}
    restarted.update(out.scheduled_cached_reqs.resumed_req_ids)
    requests = scheduler.requests
    for request_id, n in out.num_scheduled_tokens.items():
        request = requests.get(request_id)
        if request is None:
            continue
        end = request.num_computed_tokens  # already advanced by this step
        if request_id in restarted or _SPANS not in request.__dict__:
            request.__dict__[_SPANS] = _hit_spans(scheduler, state, request_id, end - n)
        _append(request.__dict__[_SPANS], state.label, end - n, end)


def _block_spans(request: Any, state: _State, start: int, end: int
                 ) -> tuple[tuple[str | None, int, int], ...]:
    """Spans of positions ``[start, end)`` of ``request`` while it is being scheduled:
    what it computed before this step from its record, the rest in this step."""
    done = request.num_computed_tokens
    spans = _clip(request.__dict__.get(_SPANS, []), start, min(end, done))
    _append(spans, state.label, max(start, done), end)
    return tuple((label, s, e) for label, s, e in spans)


def _wrap_schedule(original: Any) -> Any:
    def schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
        state = _state(self)  # before the call: cache_full_blocks reads it
        out = original(self, *args, **kwargs)
        if state is not None:
            _track(self, state, out)
        return out
    return schedule


def _wrap_cache_full_blocks(original: Any) -> Any:
    def cache_full_blocks(self: Any, request: Any, blocks: Any, num_cached_blocks: int,
                          num_full_blocks: int, block_size: int, *args: Any,
                          **kwargs: Any) -> Any:
        state = self.__dict__.get(_STATE)
        fresh = [] if state is None else [
            (j, blk) for j, blk in enumerate(blocks[num_cached_blocks:num_full_blocks],
                                            num_cached_blocks)
            if blk.block_hash is None and not blk.is_null]
        result = original(self, request, blocks, num_cached_blocks, num_full_blocks,
                          block_size, *args, **kwargs)
        for j, blk in fresh:
            if blk.block_hash is not None:  # cached now: remember who computed it
                state.blocks[blk.block_id] = _block_spans(
                    request, state, j * block_size, (j + 1) * block_size)
        return result
    return cache_full_blocks


def _wrap_free_request(original: Any) -> Any:
    def _free_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        kv_params, ec_params = original(self, request, *args, **kwargs)
        spans = request.__dict__.get(_SPANS)
        if spans is not None:
            kv_params = dict(kv_params or {})
            kv_params[PROMPT_KV_KEY] = _clip(spans, 0, request.num_prompt_tokens)
        return kv_params, ec_params
    return _free_request


def install() -> None:
    """Wrap the scheduler and block pool when the engine core imports them."""
    from vllm_rl_compat.patching import patch_method, when_imported
    from vllm_rl_compat.weights.engine_core.labels import on_version_change

    def apply_scheduler(module: Any) -> None:
        patch_method(module.Scheduler, "schedule", _wrap_schedule)
        patch_method(module.Scheduler, "_free_request", _wrap_free_request)

    def apply_pool(module: Any) -> None:
        patch_method(module.BlockPool, "cache_full_blocks", _wrap_cache_full_blocks)

    when_imported("vllm.v1.core.sched.scheduler", apply_scheduler)
    when_imported("vllm.v1.core.block_pool", apply_pool)
    on_version_change(note_version)
