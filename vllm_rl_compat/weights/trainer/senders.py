"""Our transports on the trainer side, in vLLM's trainer API (trainer process).

A trainer written against vLLM's documented API works unchanged::

    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm_rl_compat.weights.trainer.senders import RLCompatGlooTrainerInitInfo

    sender = WeightTransferTrainerFactory.trainer_init(
        RLCompatGlooTrainerInitInfo(master_address="10.0.0.5", master_port=29555,
                                    world_size=1 + engine_workers, rank=0),
        client=client, source=ModuleSource(model))   # any VLLMWeightSyncClient
    sender.send_weights()                             # every training step

``rl_compat_gloo`` makes a fresh secret for each connection and hands it to
the engine inside the init info (through the client, i.e. behind the control
token over HTTP): a process without it cannot join the group.
``rl_compat_tensors`` writes the source to shared memory (same host);
``rl_compat_files`` sends a path (``send_weights(path)``). Each drives the
engine's transaction: ``start_weight_update``, ``update_weights``,
``finish_weight_update``; a rejected update raises here with the engine's
reason and nothing was applied.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
)

from vllm_rl_compat.weights.protocol.broadcast import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_TIMEOUT,
    TrainerBroadcaster,
    new_secret,
)


def source_pairs(source: Any) -> list[tuple[str, Any]]:
    """The (name, tensor) pairs of a ``WeightSource``: vLLM 0.32 iterates the
    source itself; later releases name the full iteration ``iter_full``."""
    iter_full = getattr(source, "iter_full", None)
    return list(iter_full() if callable(iter_full) else source)

@dataclass
class RLCompatGlooTrainerInitInfo(TrainerInitInfo):
    """Where the trainer hosts the group; ``world_size`` = 1 + engine workers."""

    backend: ClassVar[str] = "rl_compat_gloo"

    master_address: str
    master_port: int
    world_size: int
    bind_address: str | None = None  # default: master_address
    timeout: float = DEFAULT_TIMEOUT
    chunk_bytes: int = DEFAULT_CHUNK_BYTES


@dataclass
class RLCompatTensorsTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "rl_compat_tensors"


@dataclass
class RLCompatFilesTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "rl_compat_files"


def _update_round(client: VLLMWeightSyncClient, update_info: dict[str, Any]) -> None:
    client.start_weight_update()
    client.update_weights(update_info)  # on failure the engine has already resumed
    client.finish_weight_update()


class RLCompatGlooTrainer(TrainerWeightTransferEngine[RLCompatGlooTrainerInitInfo]):
    """Broadcast the source to the engine's workers over a private gloo group."""

    init_info_cls = RLCompatGlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: RLCompatGlooTrainerInitInfo, *,
                     client: VLLMWeightSyncClient, source: WeightSource | None = None
                     ) -> Self:
        if source is None:
            raise ValueError("rl_compat_gloo needs a WeightSource (e.g. ModuleSource(model))")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.broadcaster = None
        if engine.is_sender:
            engine.broadcaster = _rendezvous(init_info, client)
        return engine

    def send_weights(self) -> None:
        assert self.source is not None
        pairs = source_pairs(self.source)  # materialising may be a collective on every rank
        if not self.is_sender:
            return
        self.client.start_weight_update()
        with ThreadPoolExecutor(max_workers=1) as exe:
            # The workers receive inside update_weights while we send.
            receiving = exe.submit(self.client.update_weights, {"source": "gloo"})
            try:
                self.broadcaster.send(pairs)
            finally:
                receiving.result()
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        if self.broadcaster is not None:
            self.broadcaster.close()
            self.broadcaster = None


def _rendezvous(info: RLCompatGlooTrainerInitInfo,
                client: VLLMWeightSyncClient) -> TrainerBroadcaster:
    """Host the group while the engine joins it (both block until all are in)."""
    secret = new_secret()
    worker_info = {"master_address": info.master_address, "master_port": info.master_port,
                   "world_size": info.world_size, "rank_offset": 1, "secret": secret,
                   "timeout": info.timeout}
    with ThreadPoolExecutor(max_workers=1) as exe:
        joining = exe.submit(client.init_weight_transfer_engine, worker_info)
        try:
            return TrainerBroadcaster(info.master_address, info.master_port,
                                      info.world_size - 1, secret=secret,
                                      timeout=info.timeout, chunk_bytes=info.chunk_bytes,
                                      bind_address=info.bind_address)
        finally:
            joining.result()  # the engine's error, if it failed to join


class RLCompatTensorsTrainer(TrainerWeightTransferEngine[RLCompatTensorsTrainerInitInfo]):
    """Same host: the source goes through one file in shared memory."""

    init_info_cls = RLCompatTensorsTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: RLCompatTensorsTrainerInitInfo, *,
                     client: VLLMWeightSyncClient, source: WeightSource | None = None
                     ) -> Self:
        if source is None:
            raise ValueError("rl_compat_tensors needs a WeightSource")
        return cls(client=client, source=source, is_sender=init_info.is_sender)

    def send_weights(self) -> None:
        from vllm_rl_compat.weights.protocol.shm import remove_shm, write_shm

        assert self.source is not None
        pairs = source_pairs(self.source)
        if not self.is_sender:
            return
        path = write_shm(pairs)
        try:
            _update_round(self.client, {"source": "files", "path": path})
        finally:
            remove_shm(path)


class RLCompatFilesTrainer(TrainerWeightTransferEngine[RLCompatFilesTrainerInitInfo]):
    """A safetensors file or folder the engine's workers can read."""

    init_info_cls = RLCompatFilesTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: RLCompatFilesTrainerInitInfo, *,
                     client: VLLMWeightSyncClient, source: WeightSource | None = None
                     ) -> Self:
        return cls(client=client, source=None, is_sender=init_info.is_sender)

    def send_weights(self, path: str | os.PathLike | None = None) -> None:
        if path is None:
            raise ValueError("rl_compat_files: send_weights(path) needs the safetensors "
                             "file or folder to load")
        if self.is_sender:
            _update_round(self.client, {"source": "files", "path": os.path.abspath(path)})


# A trainer process loads no vLLM plugins; importing these init-info classes
# is what makes the factory know our backend names there.
from vllm_rl_compat.weights.protocol.registry import register as _register  # noqa: E402

_register()
