"""Our transports as vLLM weight-transfer engines (worker side, worker process).

Registered with ``WeightTransferEngineFactory`` under three names, one per
way the bytes arrive; each engine accepts every source in ``update_info``
(``{"source": "gloo"}``, ``{"source": "files", "path": ...}``), the name only
picks the default, so ``WeightSync`` works whichever is configured:

* ``rl_compat_gloo``: a broadcast from the trainer over a private gloo group
  (CPU engines, and across hosts); joined by ``init_weight_transfer_engine``
  with the group's secret (``weights.broadcast``);
* ``rl_compat_tensors``: same-host tensors, written by the sender to a
  safetensors file in shared memory (``weights.shm``);
* ``rl_compat_files``: a safetensors file or folder.

Unlike vLLM's engines, these never touch a parameter while receiving: every
chunk is validated against the model's spec (``weights.spec``) and read into
staging (files too: the bytes validated are the bytes applied). The worker
extension (``weights.worker``) applies the staging at the transaction's
finish step. Every method that changes state refuses calls that do not come
from the front end's transaction (``authorized``), so dev mode's
``/collective_rpc`` cannot drive them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from vllm_rl_compat.weights.registry import BACKENDS

SOURCES = ("gloo", "files")


@dataclass
class RLCompatInitInfo(WeightTransferInitInfo):
    """Worker-side init: where the trainer's broadcast group is (gloo only)."""

    master_address: str = ""
    master_port: int = 0
    # trainer + every worker of every data-parallel engine:
    # 1 + data_parallel_size * tensor_parallel_size * pipeline_parallel_size
    world_size: int = 0
    rank_offset: int = 1  # group rank of the first engine's first worker
    secret: str = ""
    timeout: float = 60.0


@dataclass
class RLCompatUpdateInfo(WeightTransferUpdateInfo):
    """One chunk: where its bytes come from."""

    source: str = ""
    path: str = ""


def worker_group_rank(parallel_config: Any, rank_offset: int) -> int:
    """This worker's rank in the trainer's broadcast group (``group_rank``).

    Every engine's worker ``r`` of data-parallel engine ``i`` gets
    ``rank_offset + i * world_size + r`` (vLLM's own NCCL weight transfer uses
    the same numbering; ``engine_layout`` for ``external_launcher``).
    """
    from vllm_rl_compat.weights.broadcast import engine_layout, group_rank

    pc = parallel_config
    dp_index, _ = engine_layout(pc)
    return group_rank(rank_offset, dp_index, pc.world_size, pc.rank)


class RLCompatWeightTransferEngine(
        WeightTransferEngine[RLCompatInitInfo, RLCompatUpdateInfo]):
    """Receive and validate into staging; the worker extension applies it."""

    init_info_cls = RLCompatInitInfo
    update_info_cls = RLCompatUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device,
                 model: torch.nn.Module) -> None:
        super().__init__(config, vllm_config, device, model)
        self.default_source = BACKENDS.get(config.backend, "gloo")
        self.authorized = False  # set by the worker extension for one step
        self._spec: Any = None
        self._group: Any = None
        self._staged: list[tuple[str, torch.Tensor]] = []

    @property
    def spec(self) -> Any:
        if self._spec is None:
            from vllm_rl_compat.weights.spec import model_weight_spec

            self._spec = model_weight_spec(self.vllm_config, self.model)
        return self._spec

    def _require_authorized(self, call: str) -> None:
        if not self.authorized:
            raise PermissionError(
                f"{call} refused: vllm-rl-compat weight backends only run inside a "
                f"weight-update transaction opened by the front end (LLM / AsyncLLM "
                f"/ the RL HTTP routes), not through /collective_rpc")

    # ---------------------------------------------------------- connect
    def init_transfer_engine(self, init_info: RLCompatInitInfo) -> None:
        self._require_authorized("init_weight_transfer_engine")
        self.shutdown()
        if not init_info.master_address:
            return  # files and shared memory need no connection
        from vllm_rl_compat.weights.broadcast import join_group

        rank = worker_group_rank(self.parallel_config, int(init_info.rank_offset))
        self._group = join_group(init_info.master_address, int(init_info.master_port),
                                 rank=rank, world_size=int(init_info.world_size),
                                 timeout=float(init_info.timeout), secret=init_info.secret)

    def shutdown(self) -> None:
        group, self._group = self._group, None
        if group is not None:
            group.close()

    # ----------------------------------------------------------- stage
    def start_weight_update(self) -> None:
        self._require_authorized("start_weight_update")
        self.drop()

    def parse_update_info(self, update_dict: dict[str, Any]) -> RLCompatUpdateInfo:
        info = super().parse_update_info(update_dict or {})
        info.source = info.source or self.default_source
        if info.source not in SOURCES:
            raise ValueError(f"update_info.source={info.source!r} is not one of "
                             f"{', '.join(SOURCES)}")
        if info.source == "files" and not info.path:
            raise ValueError("update_info.path is required for source 'files'")
        return info

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises an accelerator, which a CPU engine lacks.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: RLCompatUpdateInfo) -> None:
        self._require_authorized("update_weights")
        seen = {name for name, _ in self._staged}
        if update_info.source == "gloo":
            items = self._receive_broadcast(seen)
        else:
            items = self._read_files(update_info.path, seen)
        self._staged.extend(items)

    def _receive_broadcast(self, seen: set[str]) -> list[tuple[str, torch.Tensor]]:
        if self._group is None:
            raise RuntimeError("No trainer connected: call init_weight_transfer_engine "
                               "with the trainer's address and secret first")
        from vllm_rl_compat.weights.broadcast import receive_update

        try:
            return receive_update(self._group, lambda entries: self.spec.validate(
                entries, complete=False, seen=set(seen)))
        except Exception:
            self.shutdown()  # a failed transfer leaves the group in an unknown state
            raise

    def _read_files(self, path: str, seen: set[str]) -> list[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        from vllm_rl_compat.weights.spec import WeightUpdateError, safetensors_header_spec

        files, entries = safetensors_header_spec(path)
        self.spec.validate(entries, complete=False, seen=set(seen))
        items = []
        for file in files:
            try:
                with safe_open(file, framework="pt") as f:
                    items.extend((name, f.get_tensor(name)) for name in f.keys())
            except Exception as exc:  # truncated file, changed under us, ...
                raise WeightUpdateError(f"cannot read safetensors file {file!r}, model "
                                        f"unchanged: {exc}") from exc
        return items

    # ----------------------------------------------------------- finish
    def check_complete(self) -> None:
        """Every name of the spec staged exactly once (before anyone applies)."""
        self.spec.validate(((n, tuple(t.shape), t.dtype) for n, t in self._staged))

    def take_staged(self) -> list[tuple[str, torch.Tensor]]:
        staged, self._staged = self._staged, []
        return staged

    def drop(self) -> None:
        self._staged = []

    def finish_weight_update(self) -> None:
        self._require_authorized("finish_weight_update")

