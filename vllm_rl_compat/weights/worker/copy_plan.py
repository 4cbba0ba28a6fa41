"""A recorded copy plan: stage an update without running vLLM's ``load_weights``
(staging thread of a worker process).

Why: overlapped staging (``weights.staging``) runs the model's own
``load_weights`` in a thread beside the engine thread. The copies release the
GIL, but the loader's Python (name mapping, stacking, ``weight_loader``
dispatch: about 0.6 ms per tensor) holds it, and every op of a decode step
waits for it on return: steps that overlap staging ran 1.2-2x longer
(``benchmarks/results/staging_gil_<cpu kind>.md``). For a given model and
update layout, though, what the loader does is fixed: the same narrow views of
the same checkpoint tensors copied into the same regions of the same
parameters. So the first overlapped update of a worker is loaded by vLLM and
*recorded*; later ones *replay* the record: one ``copy_`` (or ``fill_``) per
recorded write, a few microseconds of Python each.

Recording is a ``TorchDispatchMode`` pushed in the staging thread only (the
mode stack is thread-local: the engine thread never sees it). It sees every
aten op the loader runs and keeps each write into a staging parameter (a
*slot*) as (slot, region, source): the source must be a region of one of the
update's own tensors. Anything it cannot express makes the record unusable,
and updates keep going through ``load_weights`` (the reason is logged once):

* a write other than ``copy_`` / ``fill_`` / ``zero_`` into a slot, or a copy
  from a computed tensor (a loader that transforms values);
* a slot whose storage was replaced (``param.data = ...``) by the loader;
* two checkpoint tensors writing overlapping regions of one slot (the result
  would depend on the order they arrive in).

Replay applies the writes of each arriving tensor in recorded order; tensors
whose dtype, shape or strides differ from the recorded ones (say an fp32
update of a bf16-served model, recorded in bf16) go through ``load_weights``
instead, one run of them at a time. A packed linear's completion is counted
the same way in both (``apply_cpu.Filling``), so the two mix within one update.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
_QUIET = threading.local()


@dataclass(frozen=True)
class Region:
    """A strided region of a tensor, relative to its first element."""

    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.as_strided(tensor, self.size, self.stride,
                                tensor.storage_offset() + self.offset)


@dataclass(frozen=True)
class Write:
    """One recorded write: ``slot[dst] = source[src]`` or ``slot[dst] = value``."""

    slot: int
    dst: Region
    src: Region | None  # None: fill with ``value``
    value: Any = 0


Layout = tuple[tuple[int, ...], tuple[int, ...], torch.dtype]


@dataclass
class CopyPlan:
    """Per checkpoint name, the writes its tensor makes, for one slot layout."""

    writes: dict[str, list[Write]]
    layouts: dict[str, Layout]  # each name's tensor as recorded
    slots: list[tuple[tuple[int, ...], torch.dtype]]  # what it was recorded against

    def fits(self, name: str, tensor: torch.Tensor) -> bool:
        return self.layouts.get(name) == layout(tensor)

    def matches(self, slots: list[torch.nn.Parameter]) -> bool:
        return self.slots == slot_signature(slots)


def layout(tensor: torch.Tensor) -> Layout:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


def slot_signature(slots: list[torch.nn.Parameter]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(s.shape), s.dtype) for s in slots]


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Ops in this block are not recorded (a packed layer's re-pack: vLLM's
    processing, which replay runs itself)."""
    _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.depth -= 1


@dataclass
class _Input:
    start: int
    end: int
    name: str
    ref: weakref.ref
    dtype: torch.dtype


class PlanRecorder(TorchDispatchMode):
    """Records the writes ``load_weights`` makes into ``slots`` (see module doc)."""

    def __init__(self, slots: list[torch.nn.Parameter], packed: set[int]) -> None:
        super().__init__()
        self.slots = slots
        self.storage = {i: s.data_ptr() for i, s in enumerate(slots) if i not in packed}
        self.signature = slot_signature(slots)  # as ``build`` makes them, before loading
        self.bases: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # slot layouts
        self.writes: dict[str, list[Write]] = {}
        self.layouts: dict[str, Layout] = {}
        self.inputs: list[_Input] = []
        self.current: str | None = None
        self.failure: str | None = None
        self._last_copy: tuple[str, int] | None = None
        self._written: dict[Any, list[tuple[int, str]]] = {}

    def track(self, items: Iterable[tuple[str, torch.Tensor]]
              ) -> Iterator[tuple[str, torch.Tensor]]:
        """``items``, each registered as a possible copy source as it passes."""
        for name, tensor in items:
            if name in self.layouts:
                self.failure = self.failure or f"{name} arrived twice"
            self.layouts[name] = layout(tensor)
            self.writes.setdefault(name, [])
            start = tensor.data_ptr()
            self.inputs.append(_Input(start, start + tensor.numel() * tensor.element_size(),
                                      name, weakref.ref(tensor), tensor.dtype))
            self.current = name
            yield name, tensor

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.failure is None and not getattr(_QUIET, "depth", 0):
            self._observe(func, args, kwargs)
        return func(*args, **kwargs)

    # -------------------------------------------------------------- record
    def _observe(self, func: Any, args: tuple, kwargs: dict) -> None:
        for target in self._targets(func, args, kwargs):
            slot = self._slot_of(target)
            if slot is None or target.numel() == 0:
                continue
            base = self.slots[slot]
            if target.dtype != base.dtype:
                self.failure = f"{func} writes a {target.dtype} view into a {base.dtype} parameter"
                return
            dst = _region(target, base)
            self.bases.setdefault(slot, (tuple(base.shape), tuple(base.stride())))
            if func is _aten.copy_.default:
                self._copy(slot, dst, args[1])
            elif func is _aten.fill_.Scalar:
                self._fill(slot, dst, args[1])
            elif func is _aten.zero_.default:
                self._fill(slot, dst, 0)
            else:
                self.failure = f"the loader writes into a parameter with {func}"

    def _targets(self, func: Any, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensors ``func`` writes (its schema's mutable arguments)."""
        spots = self._written.get(func)
        if spots is None:
            spots = [(i, a.name) for i, a in enumerate(func._schema.arguments)
                     if a.alias_info is not None and a.alias_info.is_write]
            self._written[func] = spots
        found = [args[i] if i < len(args) else kwargs.get(name) for i, name in spots]
        return [t for t in found if isinstance(t, torch.Tensor)]

    def _slot_of(self, tensor: torch.Tensor) -> int | None:
        ptr = tensor.data_ptr()
        for i, slot in enumerate(self.slots):
            start = slot.data_ptr()
            if slot.numel() and start <= ptr < start + slot.numel() * slot.element_size():
                return i
        return None

    def _copy(self, slot: int, dst: Region, source: Any) -> None:
        found = self._input_of(source) if isinstance(source, torch.Tensor) else None
        if found is None:
            self.failure = ("the loader copies a computed tensor (not a view of the "
                            "update's own tensors) into a parameter")
            return
        entry, src = found
        self.writes[entry.name].append(Write(slot, dst, src))
        self._last_copy = (entry.name, slot)

    def _fill(self, slot: int, dst: Region, value: Any) -> None:
        if isinstance(value, torch.Tensor) or self.current is None:
            self.failure = "the loader fills a parameter with a tensor value"
            return
        # A fill belongs with the copy just before it into the same slot (a
        # loader call zeroing its padding), else with the tensor being loaded.
        last = self._last_copy
        owner = last[0] if last is not None and last[1] == slot else self.current
        self.writes[owner].append(Write(slot, dst, None, value))

    def _input_of(self, source: torch.Tensor) -> tuple[_Input, Region] | None:
        ptr = source.data_ptr()
        span = sum((n - 1) * s for n, s in zip(source.shape, source.stride()) if n)
        last = ptr + span * source.element_size()
        for entry in reversed(self.inputs):
            tensor = entry.ref()
            if (tensor is not None and entry.start <= ptr and last < entry.end
                    and source.dtype == entry.dtype):
                return entry, _region(source, tensor)
        return None

    # -------------------------------------------------------------- result
    def finish(self) -> CopyPlan | str:
        """The plan, or why this loader cannot be replayed."""
        if self.failure is None:
            moved = [i for i, ptr in self.storage.items() if self.slots[i].data_ptr() != ptr]
            if moved:
                self.failure = (f"the loader replaced the storage of {len(moved)} "
                                f"parameter(s) instead of writing into it")
        if self.failure is None:
            self.failure = _overlap(self.writes, self.bases)
        if self.failure is not None:
            return self.failure
        return CopyPlan(self.writes, self.layouts, self.signature)


def _region(view: torch.Tensor, base: torch.Tensor) -> Region:
    offset, rest = divmod(view.data_ptr() - base.data_ptr(), view.element_size())
    if rest:
        raise RuntimeError("a view that does not start on an element")
    return Region(offset, tuple(view.shape), tuple(view.stride()))


def _overlap(writes: dict[str, list[Write]],
             bases: dict[int, tuple[tuple[int, ...], tuple[int, ...]]]) -> str | None:
    """Do two checkpoint tensors write overlapping regions of one slot?"""
    by_slot: dict[int, dict[str, list[Write]]] = {}
    for name, items in writes.items():
        for w in items:
            by_slot.setdefault(w.slot, {}).setdefault(name, []).append(w)
    for slot, names in by_slot.items():
        if len(names) < 2:
            continue
        mark = torch.empty_strided(*bases[slot], dtype=torch.uint8).zero_()
        for name, items in names.items():
            if any(bool(w.dst.of(mark).any()) for w in items):
                return f"{name} writes where another tensor of the update writes too"
            for w in items:
                w.dst.of(mark).fill_(1)
    return None


def replay_item(plan: CopyPlan, name: str, tensor: torch.Tensor,
                slots: list[torch.nn.Parameter], fillings: dict[int, Any]) -> None:
    """Make the writes recorded for ``name`` from ``tensor`` (it ``fits``)."""
    copied: dict[int, int] = {}
    for w in plan.writes[name]:
        filling = fillings.get(w.slot)
        if filling is not None and w.slot not in copied:
            filling.begin()
        dst = w.dst.of(slots[w.slot].data)
        if w.src is None:
            dst.fill_(w.value)
            copied.setdefault(w.slot, 0)
        else:
            dst.copy_(w.src.of(tensor))
            copied[w.slot] = copied.get(w.slot, 0) + dst.numel()
    for slot, n in copied.items():
        if slot in fillings:
            fillings[slot].add(n)

