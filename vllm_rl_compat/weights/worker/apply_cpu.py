"""Fast in-place apply of a validated full update on CPU (unquantized models).

Why: profiling a full update of SmolLM2-135M (bf16, 257 MiB) showed that
vLLM's generic layerwise reload (``Worker.reload_weights``) spends most of its
time on work a value-only update does not need: it moves every layer to the
meta device, re-allocates every parameter (fresh, page-faulting memory),
buffers each loader call behind an ``inspect``-bound wrapper, loads, re-runs
``process_weights_after_loading`` and copies the result back. The RPCs, the
pause and the head refresh take under 4 ms together (numbers in
``benchmarks/results/weight_sync_<cpu kind>.md``). The re-pack itself and reading
the bytes once remain: on a 2-core machine the apply went from ~240 to ~170 ms.

What it does instead, when the model qualifies (``fast_reload_blocker``
returns ``None``): the update is validated beforehand (every name, shape and
dtype, ``weights.spec.WeightSpec``), so only values change. Every tensor goes
through the model's own ``load_weights`` and each parameter's own
``weight_loader`` (name mapping, qkv / gate_up stacking, TP sharding and the
fp32 head's shadow loader stay vLLM's / ours), into:

* packed CPU linears (``UnquantizedLinearMethod``; after loading, vLLM keeps
  only a oneDNN / sgl packed copy and an empty ``weight``): a scratch tensor
  of the original weight shape, re-used across layers and updates, installed
  as the live parameter's data only while that layer loads. When the layer
  has received all its elements (counted like vLLM's layerwise reload, with
  its ``CopyCounter``), ``quant_method.process_weights_after_loading`` runs --
  the same call the layerwise reload makes, so the same
  ``dispatch_cpu_unquantized_gemm`` branch builds the packed weight from the
  same values -- and the original (empty) parameter object is put back, as
  the layerwise reload does.
* CPU linears whose weight vLLM kept (``dispatch_cpu_unquantized_gemm``
  falls back to ``torch.nn.functional.linear`` when oneDNN cannot build a
  bf16 matmul, e.g. on AVX2-only CPUs): in place, then their
  ``process_weights_after_loading`` re-runs as in the layerwise reload.
* every other parameter (embeddings, lm_head, norms): in place, then the
  embedding-kind modules (``UnquantizedEmbeddingMethod``) re-run
  ``process_weights_after_loading`` (their oneDNN handle); modules sharing
  one weight (a tied lm_head and the embedding) share one rebuilt handle.
  The layerwise reload leaves a tied lm_head's handle built from the old
  weights (it sees no tensor for that module); ``rebuild_tied_heads`` fixes
  that after it in the fallback path.

Memory: one scratch tensor per distinct packed weight shape stays allocated
between updates (SmolLM2-135M: four shapes, 7.3 MB); while an update loads,
one more per layer being filled (files and trainer streams come layer by
layer). vLLM's layerwise reload allocates every layer's full weights afresh
on each update instead.

What it does not modify: attention layers (no tensors in an unquantized
checkpoint; the layerwise reload re-runs their processing, which re-sets the
unit kv scales they already hold), buffers (rotary caches), parameters that
are not in the update, anything outside the model.

Fallback: the whole update goes through vLLM's layerwise reload when the
model does not qualify: not the CPU platform (or the zentorch CPU path), a
quantization or kv-cache quantization config, or any module holding
parameters that is not one of the kinds above (a custom quant method,
an MLA ``_cpu_skip_gemm_dispatch`` layer, a layer with its own
``process_weights_after_loading``). The decision
is per model, made once per worker and logged; ``VLLM_RL_COMPAT_FAST_RELOAD=0``
in the front end forces the fallback for the updates it starts (for comparisons). A failure while applying (for example
vLLM choosing to keep a weight unpacked, which raises) is reported like a
failed layerwise reload: ``WeightSyncCorruptedError`` in the front end.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

logger = logging.getLogger("vllm.rl_compat")



@dataclass
class _Packed:
    """One packed CPU linear: its live (empty) weight parameter and load state."""

    layer: torch.nn.Module
    param: torch.nn.Parameter  # the live weight between updates (numel 0)
    meta: torch.Tensor  # original weight (class, attributes, shape), recorded by vLLM
    loading: torch.nn.Parameter | None = None  # stands in for ``param`` during an apply
    active: bool = False


@dataclass
class FastReloader:
    """Per-worker plan (built once) plus a pool of re-used scratch tensors."""

    packed: list[_Packed]
    embeddings: list[torch.nn.Module]
    kept: list[torch.nn.Module] = field(default_factory=list)  # linears vLLM left unpacked
    pool: dict[tuple, list[torch.Tensor]] = field(default_factory=dict)

    def apply(self, model: torch.nn.Module, weights: Iterable[tuple[str, Any]]) -> None:
        """Load ``weights`` (a validated full update) in place; see module doc."""
        for entry in self.packed:
            entry.loading = self._loading_param(entry)
            entry.layer.weight = entry.loading
        try:
            with torch.no_grad():
                model.load_weights(weights)
                for entry in self.packed:
                    if entry.active:  # not every element loaded (padding): as vLLM does
                        self._finish(entry)
                reprocess_kept_linears(self.kept)
                rebuild_packed_heads(self.embeddings)
        finally:
            for entry in self.packed:
                if entry.active:
                    self._release(entry)
                entry.layer.weight = entry.param
                entry.loading = None
            for free in self.pool.values():  # keep one scratch tensor per shape
                del free[1:]

    def _loading_param(self, entry: _Packed) -> torch.nn.Parameter:
        def storage() -> torch.Tensor:
            entry.active = True
            return self._take(entry.meta)

        param, _ = counted_param(entry.meta, entry.layer, storage,
                                 lambda: self._finish(entry))
        return param

    def _finish(self, entry: _Packed) -> None:
        """Re-pack a loaded layer, then put its live (empty) parameter back."""
        layer = entry.layer
        reprocess(layer)
        if layer.weight is entry.loading:
            raise RuntimeError(f"{type(layer).__name__}: vLLM kept this weight unpacked "
                               f"on reload; the fast path does not apply")
        self._release(entry)
        layer.weight = entry.param

    def _release(self, entry: _Packed) -> None:
        scratch = entry.loading.data
        entry.loading.data = torch.empty(0, dtype=entry.meta.dtype)
        entry.active = False
        self.pool.setdefault(_key(entry.meta), []).append(scratch)

    def _take(self, meta: torch.Tensor) -> torch.Tensor:
        free = self.pool.get(_key(meta))
        return free.pop() if free else empty_like_meta(meta)


def _key(meta: torch.Tensor) -> tuple:
    return tuple(meta.size()), tuple(meta.stride()), meta.dtype


def empty_like_meta(meta: torch.Tensor) -> torch.Tensor:
    """CPU storage of the weight vLLM recorded (shape, strides, dtype)."""
    return torch.empty_strided(tuple(meta.size()), tuple(meta.stride()),
                               dtype=meta.dtype, device="cpu")


@dataclass
class Filling:
    """A packed weight's staging storage and load count while it is filled.

    Storage on the first write (``storage()``); ``on_complete`` (the re-pack,
    which must empty the parameter, so a later write starts afresh) when every
    element has arrived, counted like vLLM's layerwise reload (``CopyCounter``:
    the elements ``copy_`` wrote). Shared by the loader wrapper of
    ``counted_param`` and a replayed copy plan (``weights.copy_plan``), so the
    two can fill one layer between them."""

    param: torch.nn.Parameter
    total: int
    storage: Callable[[], torch.Tensor]
    on_complete: Callable[[], None]
    loaded: int = 0

    def begin(self) -> None:
        if self.param.numel() == 0:
            self.param.data, self.loaded = self.storage(), 0

    def add(self, copied: int) -> None:
        self.loaded += min(copied, self.total)
        if self.loaded >= self.total:
            self.on_complete()


def counted_param(meta: torch.Tensor, layer: torch.nn.Module,
                  storage: Callable[[], torch.Tensor],
                  on_complete: Callable[[], None]) -> tuple[torch.nn.Parameter, Filling]:
    """A parameter like the one vLLM loaded a packed weight into at start-up
    (class, loader attributes re-bound to ``layer``), without storage until its
    first loader call, and the ``Filling`` that counts its loads."""
    from vllm.model_executor.model_loader.reload.meta import CopyCounter
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    param = torch.nn.Parameter(torch.empty(0, dtype=meta.dtype), requires_grad=False)
    param.__class__ = meta.__class__
    param.__dict__ = _restored_attrs(meta, layer)
    loader = getattr(param, "weight_loader", default_weight_loader)
    filling = Filling(param, meta.numel(), storage, on_complete)

    def weight_loader(*args: Any, **kwargs: Any) -> Any:
        filling.begin()
        with CopyCounter() as counter:
            result = loader(*args, **kwargs)
        filling.add(counter.copied_numel)
        return result

    param.weight_loader = weight_loader
    return param, filling


def reprocess(module: torch.nn.Module) -> None:
    """Re-run the module's ``process_weights_after_loading`` on its current values,
    dropping the old CPU handle first so its memory is re-used."""
    module.__dict__.pop("cpu_linear", None)
    module.quant_method.process_weights_after_loading(module)


def reprocess_kept_linears(layers: list[torch.nn.Module]) -> None:
    """Re-run ``process_weights_after_loading`` of linears updated in place; their
    weight must stay the live parameter (else the plan no longer matches).

    Skipped where the layer's ``cpu_linear`` cannot hold anything derived from
    the old weight (``weight_free``): vLLM's fallback after a failed oneDNN
    handle (AVX2 CPUs: every bf16 linear) takes the weight per call, and
    re-dispatching only fails the same oneDNN creation again -- about 0.5 ms
    per layer, mostly holding the GIL, which an overlapped update's staging
    thread shares with the engine thread.
    """
    for layer in layers:
        if weight_free(layer.__dict__.get("cpu_linear")):
            continue
        weight = layer.weight
        reprocess(layer)
        if layer.weight is not weight:
            raise RuntimeError(f"{type(layer).__name__}: vLLM packed a weight it had kept "
                               f"unpacked at start-up; the fast path does not apply")


def weight_free(fn: Any) -> bool:
    """``fn`` (a layer's ``cpu_linear``) reads the weight it is passed and
    captures nothing: no closure cells, defaults or bound object that could
    hold a handle or packed copy of an earlier weight."""
    if fn is torch.nn.functional.linear:
        return True
    return (isinstance(fn, types.FunctionType) and not fn.__closure__
            and not fn.__defaults__ and not fn.__kwdefaults__)


def rebuild_packed_heads(modules: list[torch.nn.Module]) -> None:
    """Re-run ``process_weights_after_loading`` of embedding-kind modules (on CPU:
    their oneDNN handle for use as a head); modules sharing one weight parameter
    (a tied lm_head) share the rebuilt ``cpu_linear``."""
    built: dict[int, torch.nn.Module] = {}
    for module in modules:
        first = built.get(id(module.weight))
        if (first is not None and getattr(module, "bias", None) is None
                and "cpu_linear" in first.__dict__):
            module.cpu_linear = first.cpu_linear
            continue
        reprocess(module)
        built[id(module.weight)] = module


def rebuild_tied_heads(model: torch.nn.Module) -> int:
    """After vLLM's layerwise reload: rebuild the packed state of embedding-kind
    modules that share their weight with another module. The reload processes
    only the module the checkpoint names (the embedding), so a tied lm_head kept
    a oneDNN handle of the old weights. Returns how many groups were rebuilt."""
    groups: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        if _module_kind(module, dict(module.named_parameters(recurse=False))) == "embedding":
            groups.setdefault(id(module.weight), []).append(module)
    tied = [g for g in groups.values() if len(g) > 1]
    for group in tied:
        rebuild_packed_heads(group)
    return len(tied)


# ------------------------------------------------------------------ decision
def check_internals() -> None:
    """Check the private vLLM names the fast path needs (``contract.ENTRIES``).

    Called before the fast path is chosen, so a vLLM release that moved one
    makes the worker take the layerwise reload (``VLLMContractError`` names
    the symbol) instead of failing mid-apply.
    """
    from vllm_rl_compat.contract import require

    require("LAYERWISE_INFO", "LayerReloadingInfo.restore_metadata", "CopyCounter",
            "layer_ref_sentinel", "_get_original_loader")


def fast_reload_blocker(vllm_config: Any) -> str | None:
    """Why this engine cannot use the fast path (``None``: it can)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or current_platform.is_zen_cpu():
        return "not the plain CPU platform"
    if vllm_config.model_config.quantization is not None:
        return "quantized model"
    if str(vllm_config.cache_config.cache_dtype) != "auto":
        return "quantized kv cache"
    return None


def build_fast_reloader(model: torch.nn.Module) -> tuple[FastReloader | None, str]:
    """A plan for ``model``, or ``None`` and the first module that blocks it."""
    packed: list[_Packed] = []
    embeddings: list[torch.nn.Module] = []
    kept: list[torch.nn.Module] = []
    for name, module in model.named_modules():
        params = dict(module.named_parameters(recurse=False))
        if not params:
            continue
        kind = _module_kind(module, params)
        if kind is None:
            return None, f"module {name or '<root>'} ({type(module).__name__})"
        if kind == "packed":
            packed.append(_packed_entry(module))
        elif kind == "kept":
            kept.append(module)
        elif kind == "embedding":
            embeddings.append(module)
    return FastReloader(packed, embeddings, kept), ""


def _module_kind(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> str | None:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        UnquantizedEmbeddingMethod,
    )

    method = type(getattr(module, "quant_method", None))
    if method is UnquantizedLinearMethod:
        if (not set(params) <= {"weight", "bias"}
                or getattr(module, "_cpu_skip_gemm_dispatch", False)):
            return None
        if params["weight"].numel() > 0:
            return "kept"
        return "packed" if _recorded_weight(module) is not None else None
    if method is UnquantizedEmbeddingMethod:
        return "embedding"
    if getattr(module, "quant_method", None) is None and not hasattr(
            module, "process_weights_after_loading"):
        return "plain" if all(p.numel() > 0 for p in params.values()) else None
    return None


def _recorded_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The weight's meta tensor vLLM recorded at load time (before packing)."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    info = LAYERWISE_INFO.get(module)
    meta = info.restore_metadata[0].get("weight") if info is not None else None
    return meta if meta is not None and meta.numel() > 0 else None


def _restored_attrs(meta: torch.Tensor, layer: torch.nn.Module) -> dict[str, Any]:
    """``meta``'s attributes with its loader methods bound to ``layer``.

    vLLM stores them unbound from the layer (``reload.sanitize``). Its layerwise
    reload then edits the recorded ``meta`` in place and leaves it so: methods
    bound to the live layer, and ``weight_loader`` wrapped in the reload's
    buffering loader (which would swallow our writes). So the loader is taken
    unwrapped (vLLM's ``_get_original_loader``) and methods bound to the
    sentinel or to a layer of this type are re-bound to ``layer`` (a shadow
    layer in overlapped staging)."""
    from types import MethodType

    from vllm.model_executor.model_loader.reload.layerwise import _get_original_loader
    from vllm.model_executor.model_loader.reload.sanitize import layer_ref_sentinel

    attrs = dict(meta.__dict__)
    for key in ("weight_loader", "_weight_loader"):  # vLLM's parameter classes: the latter
        if key in attrs:
            attrs[key] = _get_original_loader(meta)
    return {key: value.__func__.__get__(layer)
            if isinstance(value, MethodType) and (value.__self__ is layer_ref_sentinel
                                                  or type(value.__self__) is type(layer))
            else value for key, value in attrs.items()}


def _packed_entry(module: torch.nn.Module) -> _Packed:
    return _Packed(module, module.weight, _recorded_weight(module))
