"""Worker extension for pause-boundary weight loading (installed in RL mode).

vLLM appends this class to its worker's bases (``worker_extension_cls``), so
its methods run inside every worker via ``collective_rpc``. Method names are
prefixed ``rl_compat_`` so they never collide with the Worker's own
(``update_weights``, ``reload_weights``, ...).

An update is two RPCs, so that tensor-parallel ranks agree before any of them
changes a parameter: ``rl_compat_stage_*`` validates the complete update
(every name, shape and dtype; for a broadcast it also receives all bytes into
a staging buffer) and keeps it; ``rl_compat_apply_staged`` loads what was
staged through vLLM's in-place layerwise reload (``Worker.reload_weights``,
which re-runs ``process_weights_after_loading``: CPU repacking, oneDNN
handles), then refreshes derived lm_head state. The front end
(``vllm_rl_compat.weight_sync``) calls apply only when every rank staged
successfully and ``rl_compat_drop_staged`` otherwise.

Apply path: on the CPU platform, for unquantized models made of packed
linears, embeddings and plain layers, apply loads through
``vllm_rl_compat.fast_reload`` (each tensor through its parameter's own
weight loader, re-pack of exactly the changed layers, no re-allocation of the
model); any other model uses the layerwise reload. The choice is made once
per worker and returned by apply (``"fast": True/False``).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator

logger = logging.getLogger("vllm.rl_compat")


class WeightSyncExtension:
    """Worker-side weight loading; see ``vllm_rl_compat.weight_sync``."""

    def rl_compat_ping(self) -> bool:
        """Lets the front end check that the extension is installed."""
        return True

    # ----------------------------------------------------------- the spec
    def _rl_compat_spec(self):
        spec = getattr(self, "_rl_compat_spec_cache", None)
        if spec is None:
            from vllm_rl_compat.weight_sync import model_weight_spec

            spec = model_weight_spec(self.vllm_config, self.model_runner.get_model())
            self._rl_compat_spec_cache = spec
        return spec

    def rl_compat_weight_spec(self) -> dict[str, tuple[list[int], str]]:
        """``{checkpoint name: (shape, dtype)}`` an update must provide exactly."""
        return self._rl_compat_spec().as_dict()

    # ------------------------------------------------------------ staging
    def rl_compat_stage_files(self, path: str) -> dict[str, int]:
        """Validate safetensors headers (no data read yet) and stage the files."""
        from vllm_rl_compat.weight_sync import safetensors_header_spec

        files, entries = safetensors_header_spec(path)
        self._rl_compat_spec().validate(entries)
        return self._rl_compat_set_staged(("files", files))

    def rl_compat_stage_broadcast(self) -> dict[str, int]:
        """Receive a full update from the trainer into a staging buffer."""
        group = getattr(self, "_rl_compat_group", None)
        if group is None:
            raise RuntimeError(
                "No trainer connected: call connect_trainer(...) on the WeightSync "
                "object before update_from_trainer().")
        from vllm_rl_compat.broadcast import receive_update

        try:
            items = receive_update(group, self._rl_compat_spec().validate)
        except Exception:
            # A failed transfer leaves the group in an unknown state.
            self.rl_compat_disconnect_trainer()
            raise
        return self._rl_compat_set_staged(("tensors", items))

    def _rl_compat_set_staged(self, staged: tuple[str, Any]) -> dict[str, int]:
        self._rl_compat_staged = staged
        return {"rank": int(getattr(self, "rank", 0))}

    def rl_compat_drop_staged(self) -> bool:
        """Forget a staged update (frees the staging buffer)."""
        had = getattr(self, "_rl_compat_staged", None) is not None
        self._rl_compat_staged = None
        return had

    # -------------------------------------------------------------- apply
    def rl_compat_apply_staged(self, allow_fast: bool = True) -> dict[str, Any]:
        """Load the staged update in place, then refresh derived head state.

        ``allow_fast=False`` takes vLLM's layerwise reload for this update (the
        front end reads ``VLLM_RL_COMPAT_FAST_RELOAD`` per update)."""
        staged = getattr(self, "_rl_compat_staged", None)
        if staged is None:
            raise RuntimeError("rl_compat_apply_staged: nothing is staged.")
        self._rl_compat_staged = None
        kind, payload = staged
        model = self.model_runner.get_model()
        fast = self._rl_compat_fast_reloader() if allow_fast else None
        if fast is not None:
            self._rl_compat_apply_fast(fast, model, _iter_payload(kind, payload))
        else:
            self._rl_compat_apply_layerwise(model, kind, payload)
        refreshed = _refresh_head(model)
        return {"rank": int(getattr(self, "rank", 0)), "head_refreshed": refreshed,
                "fast": fast is not None}

    def _rl_compat_fast_reloader(self) -> Any:
        """The worker's ``FastReloader``, or ``None`` for the layerwise reload."""
        if not hasattr(self, "_rl_compat_fast"):
            from vllm_rl_compat.fast_reload import build_fast_reloader, fast_reload_blocker

            reason = fast_reload_blocker(self.vllm_config)
            fast = None
            if reason is None:
                fast, reason = build_fast_reloader(self.model_runner.get_model())
            if fast is None:
                logger.info("weight updates use vLLM's layerwise reload: %s", reason)
            self._rl_compat_fast = fast
        return self._rl_compat_fast

    def _rl_compat_apply_fast(self, fast: Any, model: Any,
                              weights: Iterable[tuple[str, Any]]) -> None:
        from vllm.config import set_current_vllm_config

        with set_current_vllm_config(self.vllm_config):
            fast.apply(model, weights)
        runner = self.model_runner  # what GPUModelRunner.reload_weights resets too
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()

    def _rl_compat_apply_layerwise(self, model: Any, kind: str, payload: Any) -> None:
        spec = self._rl_compat_spec()
        exact: list[tuple[str, Any]] = []  # tensors re-copied into non-model-dtype params

        def weights() -> Iterator[tuple[str, Any]]:
            for name, tensor in _iter_payload(kind, payload):
                if name in spec.exact_names:
                    exact.append((name, tensor))
                yield name, tensor

        self.reload_weights(weights_iterator=weights(), is_checkpoint_format=True)
        _copy_exact(model, spec, exact)
        from vllm_rl_compat.fast_reload import rebuild_tied_heads

        rebuild_tied_heads(model)

    # ---------------------------------------------------------- broadcast
    def rl_compat_connect_trainer(self, host: str, port: int, world_size: int,
                                  rank_offset: int, timeout: float,
                                  backend: str = "gloo") -> int:
        """Join the trainer's broadcast group; returns this worker's group rank."""
        from vllm_rl_compat.broadcast import join_group

        self.rl_compat_disconnect_trainer()
        rank = rank_offset + int(getattr(self, "rank", 0))
        self._rl_compat_group = join_group(host, port, rank=rank, world_size=world_size,
                                           timeout=timeout, backend=backend)
        return rank

    def rl_compat_disconnect_trainer(self) -> bool:
        group = getattr(self, "_rl_compat_group", None)
        self._rl_compat_group = None
        if group is not None:
            group.close()
        return group is not None


def _iter_payload(kind: str, payload: Any) -> Iterable[tuple[str, Any]]:
    if kind == "tensors":
        yield from payload
        return
    from safetensors import safe_open

    for file in payload:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


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


def _refresh_head(model: Any) -> bool:
    """Bring the fp32 head's derived state in line with the new weights."""
    from vllm_rl_compat.fp32_head import refresh_head

    refresh_head(model)
    return True
