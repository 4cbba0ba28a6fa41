"""``WeightSync`` / ``AsyncWeightSync``: thin conveniences over vLLM's RL calls.

Usage (offline ``LLM``)::

    sync = WeightSync(llm)
    sync.update_from_tensors(state_dict)      # or update_from_files(dir)
    outs = llm.generate(prompts, params)
    sync.version                              # int, +1 per successful update

Usage (``AsyncLLM``)::

    sync = await AsyncWeightSync.create(engine)
    await sync.update_from_tensors(state_dict)   # requests keep running

Each update is one ``start_weight_update`` / ``update_weights`` /
``finish_weight_update`` round on the engine, i.e. the transaction
(``weights.transaction``) every other caller of vLLM's RL API gets: validate
into staging, apply, version, in keep mode (overlapped on an ``AsyncLLM``:
the same steps in one round trip, ``Transaction.update_once``). These
classes add only: checking tensors before they are written to shared memory, one lock per
object (updates from several threads or tasks are serialised), the
trainer-broadcast connection, and ``version`` / ``last_apply`` /
``last_pause_seconds``. Front-end process.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

from vllm_rl_compat.weights.frontend.drive import AsyncLLMPort, run_async
from vllm_rl_compat.weights.frontend.native import (
    abort_weight_update,
    abort_weight_update_async,
    staging_options,
    transaction_of,
)
from vllm_rl_compat.weights.frontend.transaction import TransactionStateError
from vllm_rl_compat.weights.protocol.broadcast import DEFAULT_TIMEOUT, engine_layout
from vllm_rl_compat.weights.protocol.registry import BACKENDS
from vllm_rl_compat.weights.protocol.shm import remove_shm, write_shm
from vllm_rl_compat.weights.protocol.spec import WeightSpec, as_named_tensors


def _not_installed(exc: Exception) -> RuntimeError:
    return RuntimeError(
        "the vllm-rl-compat worker extension is not installed in this engine "
        "(start it with VLLM_RL_COMPAT=1 and rl_compat.weight_sync=true; a custom "
        "worker_extension_cls must subclass "
        "vllm_rl_compat.weights.worker.WeightSyncExtension): " + str(exc))


def _check_backend(vllm_config: Any) -> None:
    backend = getattr(vllm_config.weight_transfer_config, "backend", None)
    if backend not in BACKENDS:
        raise RuntimeError(f"WeightSync needs one of the backends {', '.join(BACKENDS)} "
                           f"(weight_transfer_config.backend is {backend!r}); use vLLM's "
                           f"trainer API directly with {backend!r}")


def _files_info(path: str | os.PathLike) -> dict[str, Any]:
    return {"source": "files", "path": str(Path(path).resolve())}


def receiver_count(vllm_config: Any) -> int:
    """Workers a broadcast reaches: every worker of every data-parallel engine.

    From the config, not from ``collective_rpc``: vLLM's data-parallel client
    returns the first engine's results only.
    """
    pc = vllm_config.parallel_config
    return pc.world_size * engine_layout(pc)[1]


def _trainer_info(host: str, port: int, num_workers: int, secret: str, timeout: float,
                  backend: str) -> dict[str, Any]:
    if backend != "gloo":
        raise ValueError(f"backend={backend!r}: the trainer broadcast runs over gloo only")
    return {"master_address": host, "master_port": int(port), "world_size": 1 + num_workers,
            "rank_offset": 1, "secret": secret, "timeout": float(timeout)}


class _Common:
    """State both conveniences read from the engine's transaction."""

    _txn: Any
    spec: WeightSpec
    num_workers: int

    @property
    def version(self) -> int:
        """Weights now in the engine (``weight_version_start`` + successful updates)."""
        return self._txn.version

    @property
    def last_apply(self) -> list[dict[str, Any]] | None:
        """Per worker, the last successful apply: ``{"rank", "head_refreshed", "fast",
        "overlapped"}``."""
        return self._txn.last_apply

    @property
    def last_pause_seconds(self) -> float | None:
        """Pause to resume of the last update (``0.0``: it never paused, e.g. an
        overlapped update that failed while staging)."""
        return self._txn.last_pause_seconds

    @property
    def last_steps(self) -> list[str]:
        """The worker steps the last update ran (``start``, ``update:1``,
        ``poll:1``, ...); each one made while the engine steps waits for a step."""
        return list(self._txn.steps)

    @property
    def last_update_seconds(self) -> float | None:
        """Start of the last update to its new version live (or its failure)."""
        return self._txn.last_update_seconds

    def _tensors_file(self, weights: Any) -> str:
        pairs = as_named_tensors(weights)
        self.spec.validate((n, tuple(t.shape), t.dtype) for n, t in pairs)
        return write_shm(pairs)


class WeightSync(_Common):
    """Weight updates for an offline ``vllm.LLM`` (they land between generate calls)."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self._lock = threading.Lock()
        try:
            llm.collective_rpc("rl_compat_ping")
        except Exception as exc:  # noqa: BLE001
            raise _not_installed(exc) from exc
        config = llm.llm_engine.vllm_config
        self.num_workers = receiver_count(config)
        _check_backend(config)
        self._txn = transaction_of(llm, config)
        self.spec = WeightSpec.from_dict(llm.collective_rpc("rl_compat_weight_spec")[0])

    def update_from_tensors(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> int:
        """Load in-process tensors (``name -> tensor``, checkpoint names); new version."""
        path = self._tensors_file(weights)
        try:
            return self._update({"source": "files", "path": path})
        finally:
            remove_shm(path)

    def update_from_files(self, path: str | os.PathLike) -> int:
        """Load a safetensors file or folder (headers validated first); new version."""
        return self._update(_files_info(path))

    def connect_trainer(self, host: str, port: int, *, secret: str,
                        timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo") -> None:
        """Join a ``TrainerBroadcaster`` group (blocks until the trainer joins)."""
        info = _trainer_info(host, port, self.num_workers, secret, timeout, backend)
        with self._lock:
            self.llm.init_weight_transfer_engine({"init_info": info})

    def update_from_trainer(self) -> int:
        """Receive one ``TrainerBroadcaster.send`` into staging, then apply it."""
        return self._update({"source": "gloo"})

    def disconnect_trainer(self) -> None:
        with self._lock:
            self.llm.shutdown_weight_transfer_engine()

    def _update(self, update_info: dict[str, Any]) -> int:
        with self._lock:
            uid = None
            try:
                uid = self.llm.start_weight_update()
                self.llm.update_weights({"update_info": update_info}, update_id=uid)
                self.llm.finish_weight_update(update_id=uid)
            except BaseException as exc:  # e.g. KeyboardInterrupt between two calls
                if _ours_to_abort(uid, exc):
                    abort_weight_update(self.llm, uid)
                raise
            return self.version


def _ours_to_abort(uid: str | None, exc: BaseException) -> bool:
    """After a failed update: abort ours (by id), or, if the start never
    answered, whatever is open -- unless the start was refused because
    another caller's update is open, which is not ours to drop."""
    return uid is not None or not isinstance(exc, TransactionStateError)


class AsyncWeightSync(_Common):
    """Weight updates for ``AsyncLLM`` while requests stream (keep mode).

    Create with ``await AsyncWeightSync.create(engine)``.
    """

    def __init__(self, engine: Any, num_workers: int, spec: WeightSpec) -> None:
        self.engine = engine
        self.num_workers = num_workers
        self.spec = spec
        self._txn = transaction_of(engine, engine.vllm_config)
        self._lock = asyncio.Lock()

    @classmethod
    async def create(cls, engine: Any) -> "AsyncWeightSync":
        try:
            await engine.collective_rpc("rl_compat_ping")
        except Exception as exc:  # noqa: BLE001
            raise _not_installed(exc) from exc
        _check_backend(engine.vllm_config)
        spec = WeightSpec.from_dict((await engine.collective_rpc("rl_compat_weight_spec"))[0])
        return cls(engine, receiver_count(engine.vllm_config), spec)

    async def update_from_tensors(self, weights: Mapping[str, Any]
                                  | Iterable[tuple[str, Any]]) -> int:
        writing = asyncio.ensure_future(asyncio.to_thread(self._tensors_file, weights))
        try:
            path = await asyncio.shield(writing)
        except asyncio.CancelledError:  # the file is still being written: remove it after
            writing.add_done_callback(
                lambda f: f.cancelled() or f.exception() or remove_shm(f.result()))
            raise
        try:
            return await self._update({"source": "files", "path": path})
        finally:
            remove_shm(path)

    async def update_from_files(self, path: str | os.PathLike) -> int:
        return await self._update(_files_info(path))

    async def connect_trainer(self, host: str, port: int, *, secret: str,
                              timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo") -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        info = _trainer_info(host, port, self.num_workers, secret, timeout, backend)
        async with self._lock:
            await self.engine.init_weight_transfer_engine(WeightTransferInitRequest(info))

    async def update_from_trainer(self) -> int:
        return await self._update({"source": "gloo"})

    async def disconnect_trainer(self) -> None:
        async with self._lock:
            await self.engine.shutdown_weight_transfer_engine()

    async def _update(self, update_info: dict[str, Any]) -> int:
        """vLLM's three calls; or, staged beside the live weights on an engine
        that commits at a step boundary, the same transaction in one round
        trip (``Transaction.update_once``): one engine step sooner, and two."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        async with self._lock:
            uid = None
            try:
                staging = staging_options(self.engine.vllm_config)
                port = AsyncLLMPort(self.engine)
                if staging["staging"] != "in_pause" and await port.can_commit():
                    await run_async(self._txn.update_once(staging, update_info, None,
                                                          staging["allow_fast"]), port,
                                    self._txn)
                    return self.version
                uid = await self.engine.start_weight_update()
                await self.engine.update_weights(WeightTransferUpdateRequest(update_info),
                                                 update_id=uid)
                await self.engine.finish_weight_update(update_id=uid)
            except BaseException as exc:  # e.g. the task was cancelled between two calls
                if _ours_to_abort(uid, exc):
                    await abort_weight_update_async(self.engine, uid)
                raise
            return self.version
