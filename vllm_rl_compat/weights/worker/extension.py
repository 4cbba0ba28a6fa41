"""Worker extension: the worker side of the weight-update transaction.

vLLM appends this class to its worker's bases (``worker_extension_cls``).
Only these methods are public, so dev mode's ``/collective_rpc`` (which
calls worker methods by name) reaches nothing else of ours:

* ``rl_compat_ping``, ``rl_compat_weight_spec``, ``rl_compat_step_times``,
  ``rl_compat_gc_frozen``, ``rl_compat_layouts`` and ``rl_compat_staging`` read;
* ``rl_compat_txn(txn, step, proof, info)`` runs one step of the front end's
  transaction (``weights.transaction``) after checking its proof
  (``weights.proof``) and its order: ``start`` needs a fresh transaction id,
  every other step the open one; each step runs at most once; after a step
  of the open update failed, only ``abort`` runs (the engine core's commit,
  ``weights.engine_core.commit``, signs its own ``poll:cK`` / ``check`` /
  ``finish`` steps, and may be queued behind a step that fails).

vLLM's own worker methods that change weights, ``reload_weights`` and
``reset_weights``, are refused in RL mode outside these steps (``install``).

Steps: ``init`` / ``shutdown`` (vLLM's ``init_weight_transfer_engine`` /
``shutdown_weight_transfer_engine``), ``start`` (says whether this update is
staged overlapped, ``weights.staging``), ``update:N`` (vLLM's
``start_weight_update`` / ``update_weights``: our backends validate into
staging, ``weights.backends``; overlapped, a staging thread does it and the
RPC returns at once), ``poll:K`` (has the staging thread finished? its error
if it failed; and has it completed and prepared the update, which it does
after the chunk that brings the last name), ``check`` (is the staging
complete? overlapped: also prepare the packed state), ``finish`` (apply -- overlapped: swap pointers --, the fp32
head, vLLM's ``finish_weight_update``) and ``abort`` (drop the staging).

Apply path for our backends: on the CPU platform, for unquantized models made
of packed linears, embeddings and plain layers, ``weights.apply_cpu`` (each
tensor through its parameter's own weight loader, re-pack of exactly the
changed layers, no re-allocation); any other model, or a failed import of
the vLLM internals it needs, uses vLLM's layerwise reload. The choice is made
once per worker and returned by ``finish`` (``"fast": True/False``). vLLM's own
backends (``nccl``, ``ipc`` on GPU) load while receiving; ``finish`` then runs
their own finish (layerwise finalize) and refreshes the head.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    from vllm_rl_compat.weights.worker.step_clock import Span

logger = logging.getLogger("vllm.rl_compat")


class WeightSyncExtension:
    """Worker-side weight updates; see ``vllm_rl_compat.weights.frontend.transaction``."""

    def rl_compat_ping(self) -> bool:
        """Lets the front end check that the extension is installed."""
        return True

    def rl_compat_weight_spec(self) -> dict[str, Any]:
        """``{checkpoint name: (shape, dtype)}`` an update must provide exactly."""
        return _spec(self).as_dict()

    def rl_compat_step_times(self, since: float = 0.0) -> list[Span]:
        """``(start, end, new requests, CPU seconds, blocked)`` of recent engine
        steps (``weights.step_clock``)."""
        from vllm_rl_compat.weights.worker.step_clock import step_spans

        return step_spans(since)

    def rl_compat_gc_frozen(self) -> int:
        """Objects the worker's GC heap froze at start-up (``weights.gc_heap``)."""
        import gc

        return gc.get_freeze_count()

    def rl_compat_layouts(self) -> dict[str, str]:
        """``{linear kind: layout}`` of this worker's model (``weights.cpu_layout``)."""
        from vllm_rl_compat.weights.worker.cpu_layout import model_layouts

        return model_layouts(self.model_runner.get_model())

    def rl_compat_staging(self) -> dict[str, bool]:
        """Does this worker hold staged weights or run staging work? (memory)"""
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is None or not _is_ours(engine):
            return {"held": False, "busy": False, "kept": False}
        return engine.staging_state()

    def rl_compat_txn(self, txn: str, step: str, proof: str, info: Any = None) -> Any:
        """Run one transaction step (refused without the front end's proof)."""
        from vllm_rl_compat.weights.protocol.proof import verify

        verify(txn, step, proof)
        state = _admit(self, txn, step)
        name = step.partition(":")[0]
        engine = getattr(self, "weight_transfer_engine", None)
        if engine is None:
            raise RuntimeError("this engine has no weight_transfer_config (RL mode sets one "
                               "unless weight_sync is off)")
        try:
            with _authorized(engine), in_step(self):
                return _STEPS[name](self, engine, info)
        except Exception as exc:
            if state["open"] == txn:  # later steps of this update are refused
                state["failed"] = f"{step}: {exc}"
            raise


# ------------------------------------------------------------ step order
def _admit(worker: Any, txn: str, step: str) -> dict[str, Any]:
    """Each step once, in order: a replayed or forged sequence is refused; after
    a failed step only ``abort`` is (steps may be queued behind one another,
    e.g. ``start``, ``update:1`` and the engine core's commit in one round trip)."""
    state = worker.__dict__.setdefault("_rl_compat_txns",
                                       {"open": None, "done": set(), "failed": None})
    key = (txn, step)
    if key in state["done"] or step.partition(":")[0] not in _STEPS:
        raise PermissionError(f"weight step {step!r} refused: replayed or unknown")
    if step == "start":
        state["open"], state["failed"] = txn, None
    elif step not in ("init", "shutdown") and state["open"] != txn:
        raise PermissionError(f"weight step {step!r} refused: its transaction is not open")
    elif state["failed"] and step not in ("init", "shutdown", "abort"):
        raise RuntimeError(f"weight step {step!r} refused: an earlier step of this update "
                           f"failed ({state['failed']}); model unchanged")
    if step in ("finish", "abort"):
        state["open"] = None
    state["done"].add(key)
    return state


_IN_STEP = "_rl_compat_in_step"


@contextlib.contextmanager
def in_step(worker: Any) -> Iterator[None]:
    """Mark the worker as running one of our steps: vLLM's own weight-changing
    methods (``reload_weights``) and the live model's ``load_weights`` run
    only inside one (``_guard``, ``_guard_model``). ``worker``: vLLM's worker,
    or the ``WorkerWrapperBase`` a callable sent by ``collective_rpc`` gets."""
    worker = getattr(worker, "worker", None) or worker
    worker.__dict__[_IN_STEP] = True
    try:
        yield
    finally:
        worker.__dict__[_IN_STEP] = False


def _outside_step(worker: Any) -> bool:
    return not worker.__dict__.get(_IN_STEP)


@contextlib.contextmanager
def _authorized(engine: Any) -> Iterator[None]:
    ours = hasattr(engine, "authorized")
    if ours:
        engine.authorized = True
    try:
        yield
    finally:
        if ours:
            engine.authorized = False


def _is_ours(engine: Any) -> bool:
    from vllm_rl_compat.weights.worker.backends import RLCompatWeightTransferEngine

    return isinstance(engine, RLCompatWeightTransferEngine)


def _spec(worker: Any) -> Any:
    engine = getattr(worker, "weight_transfer_engine", None)
    if engine is not None and _is_ours(engine):
        return engine.spec
    spec = worker.__dict__.get("_rl_compat_spec")
    if spec is None:
        from vllm_rl_compat.weights.protocol.spec import model_weight_spec

        spec = model_weight_spec(worker.vllm_config, worker.model_runner.get_model())
        worker.__dict__["_rl_compat_spec"] = spec
    return spec


# ------------------------------------------------------------------ steps
def _init(worker: Any, engine: Any, info: Any) -> None:
    worker.init_weight_transfer_engine(info or {})


def _shutdown(worker: Any, engine: Any, info: Any) -> None:
    worker.shutdown_weight_transfer_engine()


def _start(worker: Any, engine: Any, info: Any) -> dict[str, Any]:
    """Open the update; with our backends and ``info["staging"]`` not
    ``in_pause``, stage it beside the live weights (``weights.staging``)."""
    worker.start_weight_update()
    mode = (info or {}).get("staging", "in_pause")
    size = {"weight_bytes": _spec(worker).total_bytes}  # sizes the update's lease
    if not _is_ours(engine) or mode == "in_pause":
        return {"overlapped": False, "why": "in_pause", **size}
    plan = _fast_reloader(worker) if (info or {}).get("allow_fast", True) else None
    return {**engine.begin_overlapped(worker.model_runner.get_model(), plan,
                                      explicit=mode == "overlapped",
                                      max_gib=float((info or {}).get("max_gib", 0.0)),
                                      copy_plan=bool((info or {}).get("copy_plan", False)),
                                      keep=bool((info or {}).get("keep", False))), **size}


def _in_pause(worker: Any, engine: Any, info: Any) -> None:
    """The front end's collective decision: some rank cannot stage beside its
    weights, so none does (every rank applies in the pause, consistently):
    this rank drops its overlapped staging and receives in the RPCs."""
    if _is_ours(engine):
        engine.drop()


def _poll(worker: Any, engine: Any, info: Any) -> dict[str, bool]:
    return engine.poll() if _is_ours(engine) else {"done": True, "prepared": False}


def _update(worker: Any, engine: Any, info: Any) -> None:
    worker.update_weights(info if info is not None else {})


def _check(worker: Any, engine: Any, info: Any) -> None:
    if _is_ours(engine):
        engine.check_complete()


def _finish(worker: Any, engine: Any, allow_fast: Any) -> dict[str, Any]:
    if _is_ours(engine) and engine.overlapped:
        return _swap(worker, engine)
    fast = None
    if _is_ours(engine):
        model = worker.model_runner.get_model()
        fast = _fast_reloader(worker) if allow_fast else None
        staged = engine.take_staged()
        if fast is not None:
            _apply_fast(worker, fast, model, staged)
        else:
            _apply_layerwise(worker, model, staged)
    worker.finish_weight_update()
    from vllm_rl_compat.fp32_head import refresh_head

    refresh_head(worker.model_runner.get_model())
    return {"rank": int(getattr(worker, "rank", 0)), "head_refreshed": True,
            "fast": fast is not None, "overlapped": False}


def _swap(worker: Any, engine: Any) -> dict[str, Any]:
    """Install an overlapped update's prepared shadow: pointers only (the fp32
    head's derived state was staged with it, so no refresh pass)."""
    loaded = engine.swap_stage()
    _reset_runner_caches(worker)
    worker.finish_weight_update()
    return {"rank": int(getattr(worker, "rank", 0)), "head_refreshed": True,
            "fast": True, "overlapped": True, **loaded}


def _abort(worker: Any, engine: Any, info: Any) -> dict[str, bool]:
    """Drop the update; ``stopped``: no staging work of it still runs."""
    stopped = engine.drop() if _is_ours(engine) else True
    worker._weight_update_active = False
    engine.reset_weight_update_target()
    return {"stopped": stopped}


_STEPS = {"init": _init, "shutdown": _shutdown, "start": _start, "in_pause": _in_pause,
          "update": _update, "poll": _poll, "check": _check, "finish": _finish,
          "abort": _abort}


# ------------------------------------------------------------------ guard
def _guard(name: str) -> Any:
    """vLLM's worker methods that change weights (``reload_weights``,
    ``reset_weights``: dev mode's ``/collective_rpc`` and ``/weight_checker``
    reach them) run in RL mode only inside one of our steps: elsewhere they
    would change the weights with no pause, version or derived state."""
    def wrap(original: Any) -> Any:
        def method(self: Any, *args: Any, **kwargs: Any) -> Any:
            from vllm_rl_compat.weights.protocol.versions import weight_sync_on

            if weight_sync_on(self.vllm_config) and _outside_step(self):
                raise PermissionError(
                    f"{name} refused in RL mode: it would change the weights outside a "
                    f"weight-update transaction (no pause, no version, no fp32 head "
                    f"refresh); use start_weight_update / update_weights / "
                    f"finish_weight_update (or WeightSync)")
            return original(self, *args, **kwargs)
        return method
    return wrap


LOAD_GUARD = "_rl_compat_load_guard"  # marks the guard on a live model's load_weights
_ROUTE = ("load weights through vLLM's RL API (start_weight_update / update_weights / "
          "finish_weight_update, with an rl_compat_* weight_transfer_config backend) or "
          "vllm_rl_compat.weight_sync.WeightSync.update_from_tensors")


def _guard_model(worker: Any) -> None:
    """RL mode: the live model's ``load_weights`` runs only inside one of our
    steps. RL frameworks call it directly from a worker extension (OpenRLHF's
    ``WorkerWrap.update_weight``, TRL's ``update_named_param`` and colocate
    ``sync_weights``, PipelineRL's ``receive_weight_update``): that would
    change the weights behind the transaction -- the fp32 head, the CPU
    packed copies and the engine core's version label cannot follow from a
    worker -- so it fails, naming the supported route. An instance attribute
    (``weights.staging`` leaves it off the shadow models it builds)."""
    model = worker.model_runner.get_model()
    original = model.load_weights
    if getattr(original, LOAD_GUARD, False):
        return

    def load_weights(*args: Any, **kwargs: Any) -> Any:
        if _outside_step(worker):
            raise PermissionError(
                f"model.load_weights called outside a weight-update transaction in RL "
                f"mode: the weights would change with no pause and no new version, and "
                f"the fp32 head and CPU packed weights would not follow; {_ROUTE}")
        return original(*args, **kwargs)

    setattr(load_weights, LOAD_GUARD, True)
    model.load_weights = load_weights


def _wrap_initialize(original: Any) -> Any:
    def initialize_from_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        from vllm_rl_compat.weights.protocol.versions import weight_sync_on

        if weight_sync_on(self.vllm_config):
            _guard_model(self)
        return result
    return initialize_from_config


def install() -> None:
    """Worker process: refuse vLLM's weight-changing worker methods, and direct
    calls of the model's ``load_weights``, outside a step."""
    from vllm_rl_compat.patching import patch_method, when_imported

    def apply(module: Any) -> None:
        for name in ("reload_weights", "reset_weights"):
            patch_method(module.Worker, name, _guard(name))
        patch_method(module.Worker, "initialize_from_config", _wrap_initialize)
    when_imported("vllm.v1.worker.gpu_worker", apply)


# ------------------------------------------------------------------ apply
def _fast_reloader(worker: Any) -> Any:
    """The worker's ``FastReloader``, or ``None`` for the layerwise reload."""
    if "_rl_compat_fast" not in worker.__dict__:
        from vllm_rl_compat.weights.worker import apply_cpu

        fast, reason = None, apply_cpu.fast_reload_blocker(worker.vllm_config)
        if reason is None:
            from vllm_rl_compat.contract import VLLMContractError

            try:
                apply_cpu.check_internals()
            except VLLMContractError as exc:  # a vLLM release moved an internal it needs
                reason = f"a vLLM internal it needs changed ({exc})"
            else:
                fast, reason = apply_cpu.build_fast_reloader(worker.model_runner.get_model())
        if fast is None:
            logger.info("weight updates use vLLM's layerwise reload: %s", reason)
        worker.__dict__["_rl_compat_fast"] = fast
    return worker.__dict__["_rl_compat_fast"]


def _apply_fast(worker: Any, fast: Any, model: Any,
                weights: Iterable[tuple[str, Any]]) -> None:
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        fast.apply(model, weights)
    _reset_runner_caches(worker)


def _reset_runner_caches(worker: Any) -> None:
    runner = worker.model_runner  # what GPUModelRunner.reload_weights resets too
    for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
        if hasattr(runner, reset):
            getattr(runner, reset)()


def _apply_layerwise(worker: Any, model: Any, staged: list[tuple[str, Any]]) -> None:
    spec = _spec(worker)
    exact = [(n, t) for n, t in staged if n in spec.exact_names]
    worker.reload_weights(weights_iterator=iter(staged), is_checkpoint_format=True)
    _copy_exact(model, spec, exact)
    from vllm_rl_compat.weights.worker.apply_cpu import rebuild_tied_heads

    rebuild_tied_heads(model)


def _copy_exact(model: Any, spec: Any, exact: list[tuple[str, Any]]) -> None:
    """Re-load tensors whose parameter is not in the model dtype (fp32 head).

    vLLM's layerwise reload materialises each layer from metadata recorded at
    start-up; a parameter made fp32 after that (fp32 head, ``weights`` mode)
    would be rebuilt in the recorded dtype and its values rounded on the way.
    Running the parameter's own weight loader again with the validated fp32
    tensor writes the exact values (sharding and padding stay the loader's).
    """
    if not exact:
        return
    import torch
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in exact:
            param = params[spec.exact_names[name]]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, tensor)
