"""Front-end API: load new weights at a pause boundary, with weight versions.

Usage (offline ``LLM``)::

    sync = WeightSync(llm)
    sync.update_from_tensors(state_dict)      # or update_from_files(dir)
    outs = llm.generate(prompts, params)
    sync.version                              # int, +1 per successful update

Usage (``AsyncLLM``)::

    sync = await AsyncWeightSync.create(engine)
    await sync.update_from_tensors(state_dict)   # requests keep running

Every update: take a lock (concurrent updates are serialised), pause at an
engine step boundary keeping running requests and their KV cache
(``AsyncLLM.pause_generation(mode="keep", clear_cache=False)``; offline:
``sleep(level=0, mode="keep")``), stage the update in every worker (validate
every name, shape and dtype; receive a broadcast into staging), apply it only
if every worker staged it, bump the version, and resume in ``finally``.

Validation: an update must contain exactly the tensor names of the model's
own checkpoint (the safetensors files vLLM loaded the model from, read at
start-up), with the checkpoint's shapes (full, unsharded: each tensor-parallel
rank shards it like at load time). The dtype must equal the dtype of the
engine parameter the tensor loads into (found through the model's
``hf_to_vllm_mapper`` and ``packed_modules_mapping``; the model dtype when no
parameter matches): nothing is cast silently, so an fp32 head parameter gets
the trainer's fp32 values unrounded. Partial updates are refused: vLLM's
layerwise reload would build a layer that got only some of its tensors from
uninitialised memory.

Versions: the engine core labels every step's outputs with its weight
version (vLLM's ``set_weight_version``); this module sets it to
``weight_version_start`` and then to each new version while generation is
paused, so each finished ``CompletionOutput.weight_versions`` lists exact
per-token spans ``[start, end)``; ``token_versions(completion)`` returns them
as integers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

logger = logging.getLogger("vllm.rl_compat")

# Error listing: at most this many entries per kind of problem.
_MAX_LISTED = 8


class WeightUpdateError(RuntimeError):
    """An update was rejected or failed before anything was applied.

    The model is unchanged and the engine has resumed serving.
    """


class WeightSyncCorruptedError(RuntimeError):
    """Applying a validated update failed part-way: the model is undefined.

    This should not happen (everything that can be checked is checked before
    the first parameter changes); if it does, restart the engine or apply a
    complete update that succeeds.
    """


# --------------------------------------------------------------------- spec
@dataclass
class WeightSpec:
    """What an update must contain: checkpoint name -> (shape, dtype)."""

    entries: dict[str, tuple[tuple[int, ...], Any]]
    # checkpoint name -> parameter name, for parameters whose dtype is not the
    # model dtype (re-copied exactly after the reload; see worker_extension).
    exact_names: dict[str, str] = field(default_factory=dict)
    tied_embeddings: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"entries": {n: (list(s), _dtype_name(d)) for n, (s, d) in self.entries.items()},
                "exact_names": dict(self.exact_names), "tied": self.tied_embeddings}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "WeightSpec":
        import torch

        return cls({n: (tuple(s), getattr(torch, d)) for n, (s, d) in raw["entries"].items()},
                   dict(raw["exact_names"]), bool(raw["tied"]))

    @property
    def total_bytes(self) -> int:
        return sum(_numel(s) * d.itemsize for s, d in self.entries.values())

    def validate(self, items: Iterable[tuple[str, Any, Any]]) -> None:
        """Check ``(name, shape, dtype)`` triples; raise naming every problem."""
        seen: set[str] = set()
        dup, unknown, shape_bad, dtype_bad = [], [], [], []
        for name, shape, dtype in items:
            if name in seen:
                dup.append(name)
                continue
            seen.add(name)
            want = self.entries.get(name)
            if want is None:
                unknown.append(name)
                continue
            if tuple(shape) != tuple(want[0]):
                shape_bad.append(f"{name}: got shape {list(shape)}, expected {list(want[0])}")
            if dtype != want[1]:
                dtype_bad.append(f"{name}: got dtype {_dtype_name(dtype)}, expected "
                                 f"{_dtype_name(want[1])} (cast it before sending; "
                                 f"nothing is converted silently)")
        missing = [n for n in self.entries if n not in seen]
        problems = []
        for title, names in (("unknown names", unknown), ("missing names", missing),
                             ("duplicate names", dup), ("wrong shapes", shape_bad),
                             ("wrong dtypes", dtype_bad)):
            if names:
                listed = "; ".join(names[:_MAX_LISTED])
                more = f" (+{len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else ""
                problems.append(f"{len(names)} {title}: {listed}{more}")
        if any(n.startswith("lm_head.") for n in unknown) and self.tied_embeddings:
            problems.append("hint: this model ties lm_head to the input embedding; "
                            "send only the embedding (drop lm_head.*)")
        if problems:
            raise WeightUpdateError("weight update rejected, model unchanged: "
                                    + " | ".join(problems))


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32",
                       "F64": "float64", "I8": "int8", "U8": "uint8", "I16": "int16",
                       "I32": "int32", "I64": "int64", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """A ``.safetensors`` file, or every one in a folder (the index's when present)."""
    import json

    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise WeightUpdateError(f"weights path {str(p)!r} is neither a file nor a folder")
    index = p / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [p / n for n in names]
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise WeightUpdateError(f"no .safetensors files in {str(p)!r}")
    return files


def safetensors_header_spec(path: str | os.PathLike
                            ) -> tuple[list[str], list[tuple[str, tuple[int, ...], Any]]]:
    """Files and ``(name, shape, dtype)`` of every tensor, from headers only."""
    import torch
    from safetensors import safe_open

    files = safetensors_files(path)
    entries = []
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    raw = sl.get_dtype()
                    dtype = getattr(torch, _SAFETENSORS_DTYPES.get(raw, raw.lower()), raw)
                    entries.append((name, tuple(sl.get_shape()), dtype))
        except WeightUpdateError:
            raise
        except Exception as exc:  # corrupt header, short file, ...
            raise WeightUpdateError(f"cannot read safetensors file {str(file)!r}: {exc}") from exc
    return [str(f) for f in files], entries


def _checkpoint_dir(model_config: Any) -> Path:
    path = Path(model_config.model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model_config.model, revision=model_config.revision,
                                  allow_patterns=["*.safetensors", "*.json"],
                                  local_files_only=True))


def model_weight_spec(vllm_config: Any, model: Any) -> WeightSpec:
    """The update spec of a loaded model (worker side, once per worker).

    Names and shapes: the model's original safetensors checkpoint (what vLLM's
    loader accepted at start-up). Dtypes: the parameter each name loads into.
    """
    model_config = vllm_config.model_config
    if model_config.quantization is not None:
        raise WeightUpdateError(
            f"weight updates of quantized models ({model_config.quantization}) are not "
            f"supported: the checkpoint format differs from the trainer's tensors")
    _, header = safetensors_header_spec(_checkpoint_dir(model_config))
    params = dict(model.named_parameters())
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    packed = getattr(model, "packed_modules_mapping", {}) or {}
    model_dtype = model_config.dtype
    entries, exact = {}, {}
    for name, shape, _ in header:
        param_name = _resolve_param(name, params, mapper, packed)
        dtype = model_dtype
        if param_name is not None and params[param_name].dtype.is_floating_point:
            dtype = params[param_name].dtype
            if dtype != model_dtype:
                exact[name] = param_name
        entries[name] = (shape, dtype)
    tied = bool(getattr(model_config.hf_text_config, "tie_word_embeddings", False))
    return WeightSpec(entries, exact, tied)


def _resolve_param(name: str, params: Mapping[str, Any], mapper: Any,
                   packed: Mapping[str, list[str]]) -> str | None:
    """The vLLM parameter a checkpoint tensor loads into, if it can be named."""
    candidates = [name]
    if mapper is not None:
        mapped = mapper._map_name(name) if hasattr(mapper, "_map_name") else None
        if mapped:
            candidates.insert(0, mapped)
    for cand in list(candidates):
        for fused, parts in packed.items():
            for part in parts:
                if f".{part}." in cand:
                    candidates.append(cand.replace(f".{part}.", f".{fused}."))
    return next((c for c in candidates if c in params), None)


def as_named_tensors(weights: Any) -> list[tuple[str, Any]]:
    """``Mapping[str, Tensor]`` or iterable of ``(name, tensor)`` -> list of pairs."""
    import torch

    pairs = list(weights.items() if isinstance(weights, Mapping) else weights)
    bad = [repr(n) for n, t in pairs if not isinstance(n, str) or not isinstance(t, torch.Tensor)]
    if bad:
        raise WeightUpdateError(f"weights must map str names to torch.Tensor; bad entries: "
                                f"{', '.join(bad[:_MAX_LISTED])}")
    return pairs


def _write_shm(pairs: list[tuple[str, Any]]) -> str:
    """Write in-process tensors to a safetensors file in shared memory.

    vLLM's RPC path cannot carry tensors to multiprocess workers (pickling
    fails), so in-process tensors reach the workers as a file in ``/dev/shm``
    (RAM): one copy of the update, written before the engine pauses and
    deleted when the update ends. Workers on other hosts cannot see it: use
    the trainer broadcast there.
    """
    from safetensors.torch import save_file

    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = tempfile.mkdtemp(prefix="vllm-rl-compat-", dir=root)
    path = os.path.join(folder, "update.safetensors")
    try:
        save_file({n: t.detach().to("cpu").contiguous() for n, t in pairs}, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


def _remove_shm(path: str) -> None:
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def token_versions(completion: Any) -> list[tuple[int, int, int]]:
    """``[(version, start, end), ...]`` over a finished completion's output tokens.

    Token ``i`` for ``start <= i < end`` was sampled by weights ``version``
    (the KV of earlier positions may come from older versions: in keep mode
    running requests keep their cache, as vLLM V0 did).
    """
    spans = getattr(completion, "weight_versions", None)
    if spans is None:
        raise ValueError("no weight versions on this output: it is not finished, or "
                         "the engine does not run in RL mode with weight_sync on")
    return [(int(s.version), s.start, s.end) for s in spans]


def _version_start(vllm_config: Any) -> int:
    from vllm_rl_compat.config import rl_config_from_additional

    return rl_config_from_additional(vllm_config.additional_config).weight_version_start


def install_version_label() -> None:
    """Engine core: label steps ``weight_version_start`` until the first update.

    Why: vLLM's engine core starts with the opaque label ``"default"``, so
    requests finishing before a ``WeightSync`` exists would carry no integer
    version. What it changes: ``EngineCore._attach_weight_version`` replaces
    ``"default"`` once, on the first step, when ``weight_sync`` is on; every
    later label comes from ``set_weight_version``. Other processes never
    call the patched method.
    """
    from vllm.v1.engine.core import EngineCore

    original = EngineCore._attach_weight_version

    def _attach_weight_version(self: Any, outputs: Any) -> None:
        if self._weight_version == "default" and _weight_sync_on(self.vllm_config):
            self._weight_version = str(_version_start(self.vllm_config))
        original(self, outputs)

    EngineCore._attach_weight_version = _attach_weight_version


def _weight_sync_on(vllm_config: Any) -> bool:
    from vllm_rl_compat.config import rl_config_from_additional

    return rl_config_from_additional(vllm_config.additional_config).weight_sync


def _initial_version(current: str, vllm_config: Any) -> tuple[int, bool]:
    """(version, whether the engine must be told): adopt an integer label."""
    try:
        return int(current), False
    except (TypeError, ValueError):
        return _version_start(vllm_config), True


def _not_installed(exc: Exception) -> RuntimeError:
    return RuntimeError(
        "the vllm-rl-compat worker extension is not installed in this engine "
        "(start it with VLLM_RL_COMPAT=1 and rl_compat.weight_sync=true; a custom "
        "worker_extension_cls must subclass "
        "vllm_rl_compat.worker_extension.WeightSyncExtension): " + str(exc))


def _allow_fast() -> bool:
    """Read per update, so one engine can compare both apply paths."""
    from vllm_rl_compat import envs

    return envs.VLLM_RL_COMPAT_FAST_RELOAD


def _stage_failed(exc: Exception) -> WeightUpdateError:
    if isinstance(exc, WeightUpdateError):
        return exc
    return WeightUpdateError(f"weight update failed before anything was applied, model "
                             f"unchanged: {exc}")


# ------------------------------------------------------------ offline LLM
class WeightSync:
    """Weight updates for an offline ``vllm.LLM`` (updates between generate calls).

    ``LLM.generate`` blocks, so an update called from the same thread lands
    between two generate calls; the engine is additionally paused at a step
    boundary with ``sleep(level=0, mode="keep")`` / ``wake_up(["scheduling"])``
    so requests driven through ``llm.llm_engine`` step by step are kept too.
    """

    def __init__(self, llm: Any, *, rpc_timeout: float | None = None) -> None:
        self.llm = llm
        self._timeout = rpc_timeout
        self._lock = threading.Lock()
        self.last_pause_seconds: float | None = None  # pause-to-resume of the last update
        # per worker, the last successful apply: {"rank", "head_refreshed", "fast"}
        self.last_apply: list[dict[str, Any]] | None = None
        try:
            self.num_workers = len(llm.collective_rpc("rl_compat_ping"))
        except Exception as exc:  # noqa: BLE001
            raise _not_installed(exc) from exc
        engine = llm.llm_engine
        self._version, tell = _initial_version(engine.get_weight_version(), engine.vllm_config)
        if tell:
            engine.set_weight_version(str(self._version))
        self.spec = WeightSpec.from_dict(self._rpc("rl_compat_weight_spec")[0])

    @property
    def version(self) -> int:
        """Weights now in the engine (``weight_version_start`` + successful updates)."""
        return self._version

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        return self.llm.collective_rpc(method, timeout=self._timeout, args=args)

    def update_from_tensors(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Load in-process tensors (``name -> tensor``, checkpoint names); new version."""
        pairs = as_named_tensors(weights)
        self.spec.validate((n, tuple(t.shape), t.dtype) for n, t in pairs)
        path = _write_shm(pairs)
        try:
            return self._update("rl_compat_stage_files", path)
        finally:
            _remove_shm(path)

    def update_from_files(self, path: str | os.PathLike) -> int:
        """Load a safetensors file or folder (headers validated first); new version."""
        return self._update("rl_compat_stage_files", str(Path(path).resolve()))

    def connect_trainer(self, host: str, port: int, *, timeout: float = 60.0,
                        backend: str = "gloo") -> None:
        """Join a ``TrainerBroadcaster`` group (blocks until the trainer joins)."""
        with self._lock:
            self._rpc("rl_compat_connect_trainer", host, port, 1 + self.num_workers, 1,
                      timeout, backend)

    def update_from_trainer(self) -> int:
        """Receive one ``TrainerBroadcaster.send`` into staging, then apply it."""
        return self._update("rl_compat_stage_broadcast")

    def disconnect_trainer(self) -> None:
        with self._lock:
            self._rpc("rl_compat_disconnect_trainer")

    def _update(self, stage: str, *args: Any) -> int:
        with self._lock:
            t0 = time.perf_counter()
            self.llm.sleep(level=0, mode="keep")
            try:
                try:
                    self._rpc(stage, *args)
                except Exception as exc:  # noqa: BLE001
                    self._rpc("rl_compat_drop_staged")
                    raise _stage_failed(exc) from exc
                try:
                    self.last_apply = self._rpc("rl_compat_apply_staged", _allow_fast())
                except Exception as exc:  # noqa: BLE001
                    raise WeightSyncCorruptedError(
                        f"applying a validated update failed: {exc}") from exc
                self._version += 1
                self.llm.llm_engine.set_weight_version(str(self._version))
                return self._version
            finally:
                self.llm.wake_up(tags=["scheduling"])
                self.last_pause_seconds = time.perf_counter() - t0


# ------------------------------------------------------------- AsyncLLM
class AsyncWeightSync:
    """Weight updates for ``AsyncLLM`` while requests stream (keep mode).

    Create with ``await AsyncWeightSync.create(engine)``.
    """

    def __init__(self, engine: Any, num_workers: int, version: int, spec: WeightSpec,
                 rpc_timeout: float | None) -> None:
        self.engine = engine
        self.num_workers = num_workers
        self.spec = spec
        self._version = version
        self._timeout = rpc_timeout
        self._lock = asyncio.Lock()
        self.last_pause_seconds: float | None = None  # pause-to-resume of the last update
        # per worker, the last successful apply: {"rank", "head_refreshed", "fast"}
        self.last_apply: list[dict[str, Any]] | None = None

    @classmethod
    async def create(cls, engine: Any, *, rpc_timeout: float | None = None
                     ) -> "AsyncWeightSync":
        try:
            num_workers = len(await engine.collective_rpc("rl_compat_ping"))
        except Exception as exc:  # noqa: BLE001
            raise _not_installed(exc) from exc
        version, tell = _initial_version(await engine.get_weight_version(),
                                         engine.vllm_config)
        if tell:
            await engine.update_weight_version(str(version))
        spec = WeightSpec.from_dict(
            (await engine.collective_rpc("rl_compat_weight_spec", timeout=rpc_timeout))[0])
        return cls(engine, num_workers, version, spec, rpc_timeout)

    @property
    def version(self) -> int:
        return self._version

    async def _rpc(self, method: str, *args: Any) -> list[Any]:
        return await self.engine.collective_rpc(method, timeout=self._timeout, args=args)

    async def update_from_tensors(self, weights: Mapping[str, Any]
                                  | Iterable[tuple[str, Any]]) -> int:
        pairs = as_named_tensors(weights)
        self.spec.validate((n, tuple(t.shape), t.dtype) for n, t in pairs)
        path = await asyncio.to_thread(_write_shm, pairs)
        try:
            return await self._update("rl_compat_stage_files", path)
        finally:
            _remove_shm(path)

    async def update_from_files(self, path: str | os.PathLike) -> int:
        return await self._update("rl_compat_stage_files", str(Path(path).resolve()))

    async def connect_trainer(self, host: str, port: int, *, timeout: float = 60.0,
                              backend: str = "gloo") -> None:
        async with self._lock:
            await self._rpc("rl_compat_connect_trainer", host, port, 1 + self.num_workers,
                            1, timeout, backend)

    async def update_from_trainer(self) -> int:
        return await self._update("rl_compat_stage_broadcast")

    async def disconnect_trainer(self) -> None:
        async with self._lock:
            await self._rpc("rl_compat_disconnect_trainer")

    async def _update(self, stage: str, *args: Any) -> int:
        async with self._lock:
            t0 = time.perf_counter()
            await self.engine.pause_generation(mode="keep", clear_cache=False)
            try:
                try:
                    await self._rpc(stage, *args)
                except Exception as exc:  # noqa: BLE001
                    await self._rpc("rl_compat_drop_staged")
                    raise _stage_failed(exc) from exc
                try:
                    self.last_apply = await self._rpc("rl_compat_apply_staged", _allow_fast())
                except Exception as exc:  # noqa: BLE001
                    raise WeightSyncCorruptedError(
                        f"applying a validated update failed: {exc}") from exc
                self._version += 1
                await self.engine.update_weight_version(str(self._version))
                return self._version
            finally:
                await self.engine.resume_generation()
                self.last_pause_seconds = time.perf_counter() - t0
