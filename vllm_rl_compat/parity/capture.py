"""Worker side of ``check --layers``: the engine's own hidden states, as it generated.

Runs inside each vLLM worker (``llm.collective_rpc(install, ...)``, then
``dump``). Forward hooks on every decoder layer, the final norm and the
logits processor record, for the positions whose sampled token the report
scores (``num_prompt_tokens - 1`` onwards: the state that produced each
sampled token's logits), the residual stream after each layer (vLLM's
layers return ``(hidden, residual)`` with the add deferred to the next
norm, so the stream is their sum), the final norm's output and the logits,
in fp32. Nothing is changed: the hooks only read, so the engine's numbers
are those of a run without them (the tests compare the metrics), and
without ``--layers`` nothing is installed at all.

Which flat batch row belongs to which request and position comes from the
model runner's own step state (``scheduler_output.num_scheduled_tokens`` in
``input_batch.req_ids`` order, ``num_computed_tokens_cpu``): the runner's
``execute_model`` is wrapped on this instance to remember the step's
scheduler output. TP > 1: the residual stream is replicated across ranks
after each all-reduce and the logits are gathered on rank 0, so rank 0
records and the other ranks do nothing.
"""

from __future__ import annotations

from typing import Any

import torch

_STATE = "_rl_compat_capture"


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers (``model.model.layers`` in vLLM's LMs)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise RuntimeError(f"check --layers: {type(model).__name__} has no model.layers "
                           f"ModuleList; this architecture is not supported")
    return layers


def _final_norm(model: torch.nn.Module) -> torch.nn.Module:
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is None:
        raise RuntimeError(f"check --layers: {type(model).__name__} has no model.norm")
    return norm


def install(self: Any, max_tokens: int) -> int:
    """Worker: start recording (rank 0 only); returns the number of decoder layers."""
    from vllm_rl_compat.contract import require

    require("GPUModelRunner.execute_model", "InputBatch")
    runner = self.model_runner
    model = runner.get_model()
    layers = decoder_layers(model)
    if self.rank != 0:
        return len(layers)
    state = {"sched": None, "rows": None, "max_tokens": max_tokens, "store": {},
             "handles": []}
    runner.__dict__[_STATE] = state
    original = runner.execute_model

    def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        state["sched"], state["rows"] = scheduler_output, None
        return original(scheduler_output, *args, **kwargs)

    runner.execute_model = execute_model
    for i, layer in enumerate(layers):
        state["handles"].append(layer.register_forward_hook(_recorder(runner, i, _stream)))
    n = len(layers)
    state["handles"].append(_final_norm(model).register_forward_hook(
        _recorder(runner, n, _first)))
    state["handles"].append(model.logits_processor.register_forward_hook(
        _recorder(runner, n + 1, _first, logits=True)))
    return n


def _stream(output: Any) -> torch.Tensor:
    """The residual stream after a decoder layer."""
    if isinstance(output, tuple):
        hidden, residual = output[0], output[1] if len(output) > 1 else None
        return hidden if residual is None else hidden + residual
    return output


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _rows(runner: Any, state: dict) -> list[tuple[str, int, int, int]]:
    """This step's ``(req_id, first position, tokens, prompt length)`` in row order."""
    if state["rows"] is None:
        batch, sched = runner.input_batch, state["sched"]
        state["rows"] = [(req_id, int(batch.num_computed_tokens_cpu[i]),
                          int(sched.num_scheduled_tokens.get(req_id, 0)),
                          int(batch.num_prompt_tokens[i]))
                         for i, req_id in enumerate(batch.req_ids)]
    return state["rows"]


def _recorder(runner: Any, slot: int, pick: Any, logits: bool = False) -> Any:
    """A forward hook storing the scored positions' rows of ``pick(output)``."""
    def hook(module: Any, inputs: Any, output: Any) -> None:
        state = runner.__dict__[_STATE]
        if state["sched"] is None or output is None:
            return
        tensor = pick(output)
        offset = 0
        for row, (req_id, start, count, prompt_len) in enumerate(_rows(runner, state)):
            if logits:  # one row per request: its last scheduled position
                positions, take = [start + count - 1], [row]
            else:
                positions = list(range(start, start + count))
                take = list(range(offset, offset + count))
                offset += count
            for pos, index in zip(positions, take):
                if prompt_len - 1 <= pos < prompt_len - 1 + state["max_tokens"]:
                    slots = state["store"].setdefault(req_id, {}).setdefault(pos, {})
                    # a copy: the sampler scales the logits in place afterwards
                    slots[slot] = tensor[index].detach().to("cpu", torch.float32, copy=True)
    return hook


def dump(self: Any, path: str) -> dict[str, Any]:
    """Worker: stop recording, save ``{external request id: tensors}`` to ``path``.

    Per request: ``positions`` [T], ``layers`` [L, T, H], ``final_norm`` [T, H],
    ``logits`` [T, V] (fp32), for the positions recorded on every slot.
    """
    runner = self.model_runner
    state = runner.__dict__.pop(_STATE, None)
    if state is None:
        return {"rank": self.rank, "saved": False}
    for handle in state["handles"]:
        handle.remove()
    runner.__dict__.pop("execute_model", None)
    n = len(decoder_layers(runner.get_model()))
    out = {}
    for req_id, by_pos in state["store"].items():
        positions = sorted(p for p, slots in by_pos.items() if len(slots) == n + 2)
        slots = [by_pos[p] for p in positions]
        out[req_id.rsplit("-", 1)[0]] = {
            "positions": torch.tensor(positions),
            "layers": torch.stack([torch.stack([s[i] for s in slots]) for i in range(n)]),
            "final_norm": torch.stack([s[n] for s in slots]),
            "logits": torch.stack([s[n + 1] for s in slots])}
    torch.save(out, path)
    return {"rank": self.rank, "saved": True, "requests": len(out)}
