"""How a row's new weights reach its running engine (the trainer's process).

* ``TransactionPush`` (rows with RL mode's weight fix): vLLM's RL calls
  through ``AsyncWeightSync`` (start / update / finish on the ``AsyncLLM``),
  i.e. our transaction and backend: staged while requests keep running,
  applied and labelled between two engine steps.
* ``StockPush`` (``stock`` and ``rl - weight_sync``): what a user of stock
  vLLM 0.32 has on a CPU engine. vLLM's own transfer backends are CUDA-only
  (on CPU the NCCL route returns without moving data), so the route is the
  worker's in-place ``reload_weights`` from a checkpoint folder
  (``collective_rpc``), then ``update_weight_version`` to label the outputs:
  two utility calls, with no pause around them, as vLLM's ``pause_generation``
  defaults to aborting the running requests.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


class TransactionPush:
    """RL mode's weight update: one transaction per version."""

    route = "AsyncWeightSync.update_from_tensors (vLLM's start/update/finish_weight_update)"

    def __init__(self, sync: Any) -> None:
        self.sync = sync

    @classmethod
    async def create(cls, engine: Any) -> "TransactionPush":
        from vllm_rl_compat.weight_sync import AsyncWeightSync

        return cls(await AsyncWeightSync.create(engine))

    async def __call__(self, weights: list[tuple[str, torch.Tensor]], version: int) -> None:
        got = await self.sync.update_from_tensors(dict(weights))
        if got != version:
            raise RuntimeError(f"engine is at weight version {got}, the trainer at {version}")

    def close(self) -> None:
        pass


class StockPush:
    """Stock vLLM on CPU: ``reload_weights`` from a folder, then relabel."""

    route = "collective_rpc('reload_weights', weights_path=...) + update_weight_version"

    def __init__(self, engine: Any, model_dir: str) -> None:
        self.engine = engine
        self.folder = Path(tempfile.mkdtemp(prefix="rl-compat-online-"))
        for name in ("config.json", "generation_config.json"):
            if (Path(model_dir) / name).is_file():
                shutil.copy(Path(model_dir) / name, self.folder / name)

    async def __call__(self, weights: list[tuple[str, torch.Tensor]], version: int) -> None:
        from safetensors.torch import save_file

        save_file(dict(weights), str(self.folder / "model.safetensors"))
        await self.engine.collective_rpc("reload_weights",
                                         kwargs={"weights_path": str(self.folder)})
        await self.engine.update_weight_version(str(version))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
