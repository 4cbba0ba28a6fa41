"""Overlapped staging: build the next weights beside the live ones while the
engine keeps stepping, then swap them in between two steps (worker process).

Why: the in-pause path (``weights.apply_cpu``) stops generation for the whole
update -- receiving, validating, loading and, on CPU, re-packing every Linear
for oneDNN -- about 10x a memcpy of the weights. Everything except the final
pointer swap can happen while the engine decodes: the worker's engine thread
runs the model, a staging thread (``StagingJob``) does the rest on another
core.

How, without touching anything the running model reads:

* ``StagedWeights`` (built by the staging thread when the update starts)
  mirrors the model's module tree: a *shadow* of every
  module, sharing its configuration (``__dict__`` copied shallowly) but with
  its own parameters of the same class, shape and loader attributes (tied
  parameters stay tied). The model's own ``load_weights`` runs on the shadow
  root, so name mapping, qkv / gate_up stacking, TP sharding and each
  parameter's ``weight_loader`` stay vLLM's, writing into the shadow.
  Opt-in, it is recorded the first time and later updates replay its writes
  without its Python (``weights.copy_plan``).
* On CPU a packed linear's live ``weight`` is empty (vLLM keeps only the
  oneDNN / sgl handle): its shadow weight gets storage on the first loader
  call; when every element has arrived (counted like vLLM's layerwise
  reload), ``process_weights_after_loading`` runs on the shadow layer and
  builds a *new* packed handle (vLLM can create a handle but not refill one)
  and the unpacked staging copy is freed. ``prepare`` finishes the rest:
  partly filled layers, linears vLLM kept unpacked, embedding heads (a tied
  head shares one handle), and a tied fp32 head's shadow (``fp32_head``)
  which the shadow embedding's loader fills.
* ``swap`` (engine thread, between two steps: in a pause, or in the engine
  core's commit, ``weights.engine_core.commit``): per module, each live parameter
  takes its shadow's storage (``param.data = ...``: identity, ties and
  every reference kept) and the attributes processing rebuilt
  (``cpu_linear``, the fp32 head shadow) are re-pointed. O(modules), no byte
  is copied.

Memory: one extra copy of the weights plus packed handles until the swap
(``staging_bytes``), refused beforehand when the machine (or the
``weight_staging_max_gib`` budget) does not have it. When the stage is to be
kept (``weight_staging_keep``) the swap exchanges storage, so the shadow ends
up holding the weights the model no longer reads, and the next update loads
into it (``reuse``): no shadow to build (pure Python, GIL held), no
allocation, no fresh pages -- the copy is then held between updates too.
Kept only when no rebuilt attribute refers to a shadow object
(``captured_by_derived_state``); freed by a failed update or any update
applied in the pause. Faults (bad tensors, a truncated file, a trainer that
dies or stalls) fail the staging thread; the live model was never touched
and the shadow is dropped.

Qualifies exactly when the fast in-pause apply does
(``apply_cpu.build_fast_reloader``): the CPU platform, unquantized models made
of packed or kept linears, embeddings and plain layers.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch

from vllm_rl_compat.weights.worker.apply_cpu import (
    FastReloader,
    Filling,
    counted_param,
    empty_like_meta,
    rebuild_packed_heads,
    reprocess,
    reprocess_kept_linears,
)
from vllm_rl_compat.weights.worker.copy_plan import CopyPlan, replay_item, unrecorded

logger = logging.getLogger("vllm.rl_compat")

_TREE_KEYS = ("_parameters", "_buffers", "_modules")


class StagingMemoryError(RuntimeError):
    """Overlapped staging needs more memory than this machine can give it."""


@dataclass
class _PackedShadow:
    """A packed linear's shadow layer and whether its handle is built."""

    layer: torch.nn.Module  # the shadow layer
    meta: torch.Tensor  # the weight as vLLM recorded it before packing
    done: bool = False


@dataclass
class StagedWeights:
    """The shadow tree of one model and the live modules it stands in for."""

    root: torch.nn.Module
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]]  # (live, shadow)
    packed: list[_PackedShadow]
    kept: list[torch.nn.Module]  # shadows of linears vLLM kept unpacked
    embeddings: list[torch.nn.Module]  # shadows of embedding-kind modules
    slots: list[torch.nn.Parameter] = field(default_factory=list)  # every new parameter
    fillings: dict[int, Filling] = field(default_factory=dict)  # slot index -> packed
    prepared: bool = False
    names: dict[int, str] = field(default_factory=dict)  # id(slot) -> the live parameter's name

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load (part of) a validated update into the shadow (staging thread)."""
        with torch.no_grad():
            self.root.load_weights(weights)

    def replay(self, plan: CopyPlan, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load through a recorded copy plan (``weights.copy_plan``); a tensor
        it does not fit goes through ``load``. Returns how many did not fit."""
        misfits = 0
        with torch.no_grad():
            for name, tensor in weights:
                if plan.fits(name, tensor):
                    replay_item(plan, name, tensor, self.slots, self.fillings)
                else:
                    self.root.load_weights([(name, tensor)])
                    misfits += 1
        return misfits

    def prepare(self) -> None:
        """Build every derived state the swap installs (staging thread)."""
        with torch.no_grad():
            for entry in self.packed:
                # part of it loaded (padding: not every element came)
                if not entry.done and entry.layer.weight.numel():
                    _pack(entry)
            reprocess_kept_linears(self.kept)
            rebuild_packed_heads(self.embeddings)
        self.prepared = True

    def swap(self, exchange: bool = False) -> int:
        """Install the staged state in the live model (engine thread, between steps).

        Returns the number of modules changed. Only pointers move: each live
        parameter (and tensor attribute the shadow holds, the fp32 head's)
        takes its shadow's storage; the attributes processing rebuilt are
        re-pointed. With ``exchange`` the shadow takes the old storage, so a
        kept stage (``reuse``) loads the next update into memory the live
        model no longer reads (only when ``captured_by_derived_state`` found
        nothing: else the shadow keeps sharing the new storage with the live
        model, as anything captured from it expects).
        """
        if not self.prepared:
            raise RuntimeError("staged weights swapped before prepare()")
        moved: set[int] = set()  # a tied parameter is exchanged once
        with torch.no_grad():
            for live, shadow in self.pairs:
                for name, staged in shadow._parameters.items():
                    current = live._parameters.get(name)
                    if staged is not None and current is not None:
                        _move(current, staged, moved, exchange)
            for live, key, current, value in self._rebuilt():
                if isinstance(value, torch.Tensor) and isinstance(current, torch.Tensor):
                    _move(current, value, moved, exchange)
                else:
                    live.__dict__[key] = value
        self.prepared = False
        return len(self.pairs)

    def _rebuilt(self) -> Iterator[tuple[torch.nn.Module, str, Any, Any]]:
        """``(live, key, live value, shadow value)`` of every attribute (not the
        module tree) where the shadow differs from its live module: what
        processing rebuilt, and the fp32 head's tensor."""
        for live, shadow in self.pairs:
            for key, value in shadow.__dict__.items():
                current = live.__dict__.get(key)
                if key not in _TREE_KEYS and current is not value:
                    yield live, key, current, value

    def reuse(self) -> None:
        """Ready a kept stage for the next update: nothing prepared, no packed
        layer part-filled (an update abandoned mid-layer leaves its count)."""
        for filling in self.fillings.values():
            filling.param.data, filling.loaded = torch.empty(0, dtype=filling.param.dtype), 0
        for entry in self.packed:
            entry.done = False

    def poison(self) -> None:
        """Fill every unpacked float slot with NaN (staging thread, before the
        first load): after a complete update, a slot still all NaN was written
        by no tensor of it (``unwritten``)."""
        with torch.no_grad():
            for slot in self._unpacked_float_slots():
                slot.fill_(float("nan"))

    def unwritten(self) -> list[str]:
        """Parameters the model reads that the loaded update did not write: an
        unpacked slot still all NaN after ``poison``, a packed layer that got
        no element. Swapped in, they would hold garbage."""
        missing = [self.names.get(id(s), "?") for s in self._unpacked_float_slots()
                   if s.numel() and bool(torch.isnan(s).all())]
        missing += [self.names.get(id(e.layer.weight), type(e.layer).__name__)
                    for e in self.packed if not e.done and not e.layer.weight.numel()]
        return missing

    def _unpacked_float_slots(self) -> Iterator[torch.nn.Parameter]:
        """Slots loaded in place (a packed layer's counts its own elements)."""
        filled = {id(f.param) for f in self.fillings.values()}
        return (s for s in self.slots if id(s) not in filled and s.is_floating_point())

    def held_bytes(self) -> int:
        """Memory the stage holds between updates (its parameters' storage)."""
        return sum(s.numel() * s.element_size() for s in self.slots)

    def captured_by_derived_state(self) -> str | None:
        """Why this stage must not be kept, or ``None``: a rebuilt attribute
        (a ``cpu_linear`` closure, say) that refers to a shadow module or
        parameter *object* would, after the swap, read the storage the next
        update is loaded into; one built from the *storage* (a packed handle,
        a packed copy) moves with it and is safe."""
        shadows = {id(s) for _, s in self.pairs} | {id(p) for p in self.slots}
        for live, key, _, value in self._rebuilt():
            if any(id(ref) in shadows for ref in _references(value)):
                return f"{type(live).__name__}.{key} refers to a staged module or parameter"
        return None


def _move(live: torch.Tensor, staged: torch.Tensor, moved: set[int], exchange: bool) -> None:
    if id(staged) in moved or staged is live:
        return
    if exchange:
        live.data, staged.data = staged.data, live.data
    else:
        live.data = staged.data
    moved.add(id(staged))


def _references(value: Any) -> list[Any]:
    """What a derived attribute can hold on to: a bound method's object, a
    function's closure cells and defaults."""
    if isinstance(value, torch.Tensor):
        return []
    refs = [getattr(value, "__self__", None), *(getattr(value, "__defaults__", None) or ())]
    for cell in getattr(value, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            refs.append(cell.cell_contents)
    return refs


def build(model: torch.nn.Module, plan: FastReloader) -> StagedWeights:
    """The shadow tree of ``model`` (no weight storage yet for packed layers)."""
    from vllm_rl_compat.fp32_head import SHADOW_ATTR, staged_shadow_loader

    packed_meta = {id(e.layer): e.meta for e in plan.packed}
    kept, embeddings = {id(m) for m in plan.kept}, {id(m) for m in plan.embeddings}
    modules: dict[int, torch.nn.Module] = {}
    params: dict[int, torch.nn.Parameter] = {}
    pairs: list[tuple[torch.nn.Module, torch.nn.Module]] = []
    staged = StagedWeights(model, pairs, [], [], [])

    def clone(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) in modules:
            return modules[id(module)]
        shadow = object.__new__(type(module))
        shadow.__dict__.update(module.__dict__)
        if getattr(shadow.__dict__.get("load_weights"), "_rl_compat_load_guard", False):
            del shadow.__dict__["load_weights"]  # the live model's guard (worker._guard_model)
        modules[id(module)] = shadow
        shadow._buffers = dict(module._buffers)
        shadow._modules = {n: clone(c) if c is not None else None
                           for n, c in module._modules.items()}
        shadow._parameters = {}
        for name, param in module._parameters.items():
            meta = packed_meta.get(id(module)) if name == "weight" else None
            if param is None:
                shadow._parameters[name] = None
            elif meta is not None:
                entry = _PackedShadow(shadow, meta)
                staged.packed.append(entry)
                new, staged.fillings[len(staged.slots)] = _packed_param(entry)
                staged.slots.append(new)
                shadow._parameters[name] = new
            else:
                shadow._parameters[name] = _param_like(param, params, staged.slots)
        if SHADOW_ATTR in module.__dict__:
            shadow.__dict__[SHADOW_ATTR] = _param_like(module.__dict__[SHADOW_ATTR], params,
                                                       staged.slots)
        if id(module) in kept:
            staged.kept.append(shadow)
        elif id(module) in embeddings:
            staged.embeddings.append(shadow)
        if any(p is not None for p in module._parameters.values()) or (
                SHADOW_ATTR in module.__dict__):
            pairs.append((module, shadow))
        return shadow

    staged.root = clone(model)
    live_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for module, shadow in pairs:
        for key, param in module._parameters.items():
            new = shadow._parameters.get(key)
            if param is not None and new is not None:
                staged.names.setdefault(id(new), live_names.get(id(param), key))
    # A tied fp32 head's shadow is filled by the embedding's loader: point the
    # shadow embedding's loader at the shadow head, not the live one.
    for param in params.values():
        loader = getattr(param, "weight_loader", None)
        head = getattr(loader, "_rl_compat_head", None)
        if head is not None:
            param.weight_loader = staged_shadow_loader(loader, modules[id(head)])
    return staged


def _param_like(live: torch.nn.Parameter, memo: dict[int, torch.nn.Parameter],
                slots: list[torch.nn.Parameter]) -> torch.nn.Parameter:
    """A parameter of ``live``'s class, shape, dtype and attributes, own storage."""
    if id(live) in memo:
        return memo[id(live)]
    new = torch.nn.Parameter(torch.empty_like(live), requires_grad=False)
    new.__class__ = live.__class__
    new.__dict__.update(live.__dict__)
    memo[id(live)] = new
    slots.append(new)
    return new


def _packed_param(entry: _PackedShadow) -> tuple[torch.nn.Parameter, Filling]:
    """Like the parameter vLLM loaded into at start-up; storage on first use,
    packed (and the staging copy freed) when its last element arrives."""
    return counted_param(entry.meta, entry.layer, lambda: empty_like_meta(entry.meta),
                         lambda: _pack(entry))


def _pack(entry: _PackedShadow) -> None:
    """Build the shadow layer's packed handle; its unpacked copy is freed.

    vLLM's packing replaces ``layer.weight`` with a new, empty, plain
    ``Parameter`` (no ``weight_loader``, no stacking attributes). The staged
    parameter -- the one the slots, fillings and copy plan know, with its
    counting loader -- is put back, emptied, as vLLM's layerwise reload and
    the in-pause apply do: a kept stage loads the next update through it."""
    staged = entry.layer.weight
    with unrecorded():  # vLLM's processing: a replay runs it itself
        reprocess(entry.layer)
    if entry.layer.weight is staged:
        raise RuntimeError(f"{type(entry.layer).__name__}: vLLM kept this weight "
                           f"unpacked on reload; overlapped staging does not apply")
    staged.data = torch.empty(0, dtype=entry.meta.dtype)  # now, not at the next GC
    entry.layer.weight = staged
    entry.done = True


# ------------------------------------------------------------------ memory
def staging_bytes(spec_bytes: int, largest: int) -> int:
    """Extra memory held until the swap: one copy of the weights (on CPU the
    packed handles take the place of the unpacked copies as layers complete)
    plus the largest tensor in flight."""
    return int(spec_bytes + largest)


def available_bytes(max_gib: float) -> tuple[int, str]:
    """What staging may use: the machine's available memory, the cgroup's
    headroom and the configured budget, whichever is smallest, and which."""
    import psutil

    limits = [(int(psutil.virtual_memory().available), "available system memory")]
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        limits.append((cgroup, "cgroup memory.max headroom"))
    if max_gib > 0:
        limits.append((int(max_gib * 2**30), "weight_staging_max_gib"))
    return min(limits)


def _cgroup_headroom() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return int(limit) - int(f.read().strip())
    except (OSError, ValueError):
        return None


def check_fits(needed: int, max_gib: float) -> None:
    have, what = available_bytes(max_gib)
    if needed > have:
        raise StagingMemoryError(
            f"overlapped weight staging needs {needed / 2**20:.0f} MiB (one extra copy "
            f"of the weights plus the largest tensor in flight) but {what} is "
            f"{have / 2**20:.0f} MiB; use rl_compat.weight_staging='in_pause' (no "
            f"extra copy) or free memory; model unchanged")


# -------------------------------------------------------------- the thread
class StagingJob:
    """One background thread per worker that runs staging work in order.

    A daemon thread: a staging step left running (a trainer that never sends,
    an update abandoned by its caller) must never keep the worker process
    alive at shutdown. Its CPU affinity avoids the cores vLLM bound its
    compute threads to, when the process has others, so staging does not take
    the step's core.

    The GIL is what it still shares with the engine thread: every op the model
    runs returns into Python and must take the GIL back, waiting up to the
    switch interval (5 ms by default) whenever staging runs Python (vLLM's
    ``load_weights`` spends about 0.6 ms of it per tensor). While a job runs
    the interval is ``SWITCH_INTERVAL_S``: beside a loader-shaped load a
    decode-shaped step ran 1.67x its time at 5 ms, 1.22x at 0.1 ms and 1.13x
    at 0.02 ms (beside pure Python: 7.82x, 1.23x, 1.15x), the staging
    throughput unchanged (``benchmarks/results/staging_gil_avx2.md``; its
    earlier runs, in its history: 1.46x / 1.23x / 1.20x at 0.1 ms against
    1.00x / 1.15x / 1.18x at 0.02 ms). Copies alone, even of 256 MiB from
    DRAM or into fresh pages, cost the step little or nothing there.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list[concurrent.futures.Future] = []
        self._inflight: set[concurrent.futures.Future] = set()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(_compute_cpus(),),
                                            name="rl-compat-staging", daemon=True)
            self._thread.start()
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inflight.add(future)
        self._pending.append(future)
        self._queue.put((future, fn))

    def _run(self, compute: set[int]) -> None:
        _staging_thread_setup(compute)
        while True:
            future, fn = self._queue.get()
            if not future.set_running_or_notify_cancel():
                self._inflight.discard(future)
                continue
            previous = sys.getswitchinterval()
            sys.setswitchinterval(SWITCH_INTERVAL_S)
            try:
                result, error = fn(), None
            except BaseException as exc:  # noqa: BLE001 - reported by done()
                result, error = None, exc
            finally:
                sys.setswitchinterval(previous)
            self._inflight.discard(future)  # not busy once its result is visible
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def done(self) -> bool:
        """``True`` when everything submitted finished; raises its first error."""
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()
        return not self._pending

    def busy(self) -> bool:
        """Work submitted and not finished (cancelled work included)."""
        return bool(self._inflight)

    def cancel(self, wait_s: float = 0.0) -> bool:
        """Forget submitted work; a running item stops at its next check
        (``Cancelled``, raised by the work itself between tensors). Waits up to
        ``wait_s`` for it; ``False`` if it still runs (blocked in a receive
        or a read), so the caller can refuse new work until it stops."""
        for future in self._pending:
            future.cancel()
        self._pending = []
        running = [f for f in list(self._inflight) if not f.cancelled()]
        if running and wait_s > 0:
            concurrent.futures.wait(running, timeout=wait_s)
        return not self.busy()


class Cancelled(RuntimeError):
    """Staging work of an aborted update stopped at a check between tensors."""


SWITCH_INTERVAL_S = 2e-5  # the GIL switch interval while staging work runs


def _compute_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))  # the engine thread's, inherited by OMP threads


def _spare_cpus(compute: set[int]) -> set[int]:
    return set(range(os.cpu_count() or 1)) - compute


@contextlib.contextmanager
def off_compute_cpus() -> Iterator[None]:
    """The calling (engine) thread runs on the spare CPUs for the block, so the
    threads a library starts in it inherit them: gloo's TCP loop threads, which
    copy every received byte, would otherwise sit on the compute core."""
    compute = _compute_cpus()
    spare = _spare_cpus(compute)
    try:
        if spare:
            os.sched_setaffinity(0, spare)
    except OSError:
        spare = set()
    try:
        yield
    finally:
        if spare:
            os.sched_setaffinity(0, compute)


def _staging_thread_setup(compute: set[int]) -> None:
    """Off the compute cores, at the process's own priority.

    Not niced below the engine core and front end that share the spare cores:
    the staging thread holds the GIL while it runs Python, and preempted while
    holding it, it keeps the engine thread waiting on the compute core (a
    priority inversion). From a trainer broadcast (the trainer on the spare
    core too) the engine thread blocked 1067 times per update, 115 ms off the
    CPU, at nice 10, and 235 and 193 times, 27 and 29 ms, in two runs at
    the process's priority, its wait between steps unchanged
    (``benchmarks/results/weight_sync_avx2.md`` at c7649ad, 6889e91 and
    3b60265)."""
    tid = threading.get_native_id()
    spare = _spare_cpus(compute)
    try:
        if spare:
            os.sched_setaffinity(tid, spare)
    except OSError:  # outside this process's cpuset: stay as we are
        pass
    torch.set_grad_enabled(False)
