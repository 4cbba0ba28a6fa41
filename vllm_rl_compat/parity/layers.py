"""``check --layers``: where the train-inference mismatch starts, layer by layer.

For every scored position of a row (the state that produced each sampled
token's logits) the engine's residual stream after each decoder layer, its
final norm output and its logits (recorded while it generated:
``parity.capture``) are compared with the trainer reference's, teacher-forced
over prompt + completion: per token the relative error
``||h_engine - h_trainer|| / ||h_trainer||``, then its median and max.

The rounding floor comes from the data: the same reference model run twice
over the same tokens, in its dtype and all in fp32; per layer, the median
relative error between those two passes is what rounding in the model dtype
alone explains at that depth. A layer diverges when the engine's median error
exceeds ``FLOOR_FACTOR`` times its floor: two bf16 implementations of the
same math (the engine's fused kernels, the trainer's eager ops) round mostly
the same values the same way, so they stay well under the floor (measured:
0.03-0.8 of it on the tiny models), while a weight that is not the trainer's
or a broken kernel adds an error of its own. The first
diverging layer is the first one over, in the order layer.0 .. layer.N-1,
final_norm, logits (``null``: none). Written to ``layers.json`` and
``layers.png``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

FLOOR_FACTOR = 2.0


def slot_names(num_layers: int) -> list[str]:
    return [f"layer.{i}" for i in range(num_layers)] + ["final_norm", "logits"]


@torch.inference_mode()
def reference_states(model: Any, prompt: Sequence[int], completion: Sequence[int],
                     head: tuple[torch.Tensor, torch.Tensor | None]) -> list[torch.Tensor]:
    """Trainer-side states at the scored positions, one ``[T, dim]`` per slot."""
    from vllm_rl_compat.parity.reference import head_logits_fp32

    layers, norm = model.model.layers, model.model.norm
    seen: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(_keep(seen, i)) for i, layer in enumerate(layers)]
    hooks.append(norm.register_forward_hook(_keep(seen, len(layers))))
    try:
        ids = torch.tensor([list(prompt) + list(completion)], dtype=torch.long)
        model.base_model(input_ids=ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    scored = slice(len(prompt) - 1, len(prompt) - 1 + len(completion))
    states = [seen[i][0, scored].float() for i in range(len(layers) + 1)]
    states.append(head_logits_fp32(model, seen[len(layers)][0, scored], head))
    return states


def _keep(seen: dict[int, torch.Tensor], slot: int) -> Any:
    def hook(module: Any, inputs: Any, output: Any) -> None:
        seen[slot] = output[0] if isinstance(output, tuple) else output
    return hook


def rel_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per-token ``||got - want|| / ||want||`` over the last dim."""
    want = want.double()
    return (got.double() - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-30)


def rounding_floor(model_dtype: Any, model_fp32: Any, pairs: Sequence[tuple[list, list]],
                   heads: tuple[Any, Any]) -> list[float]:
    """Per slot: median relative error between the model-dtype and the fp32
    reference passes over the same tokens (what dtype rounding alone explains)."""
    per_slot: list[list[torch.Tensor]] = []
    for prompt, completion in pairs:
        if not completion:
            continue
        low = reference_states(model_dtype, prompt, completion, heads[0])
        high = reference_states(model_fp32, prompt, completion, heads[1])
        for i, (a, b) in enumerate(zip(low, high)):
            if len(per_slot) <= i:
                per_slot.append([])
            per_slot[i].append(rel_errors(a, b))
    return [float(torch.cat(errs).median()) for errs in per_slot]


def compare_row(captured: dict[str, Any], request_ids: Sequence[str],
                pairs: Sequence[tuple[list, list]], reference: Any,
                head: Any) -> list[torch.Tensor]:
    """Per slot, the per-token relative errors of one row's engine states."""
    per_slot: list[list[torch.Tensor]] = []
    for req_id, (prompt, completion) in zip(request_ids, pairs):
        if not completion:
            continue
        got = captured.get(req_id)
        want_positions = list(range(len(prompt) - 1, len(prompt) - 1 + len(completion)))
        if got is None or got["positions"].tolist() != want_positions:
            raise RuntimeError(f"check --layers: the engine recorded no states for request "
                               f"{req_id} at positions {want_positions[0]}..{want_positions[-1]}")
        engine = [*got["layers"], got["final_norm"], got["logits"]]
        want = reference_states(reference, prompt, completion, head)
        if len(engine) != len(want):
            raise RuntimeError(f"check --layers: the engine has {len(engine) - 2} decoder "
                               f"layers, the reference {len(want) - 2}")
        vocab = want[-1].shape[-1]
        engine[-1] = engine[-1][..., :vocab]  # vLLM may pad the vocabulary
        for i, (a, b) in enumerate(zip(engine, want)):
            if len(per_slot) <= i:
                per_slot.append([])
            per_slot[i].append(rel_errors(a, b))
    return [torch.cat(errs) for errs in per_slot]


def summarize(errors: list[torch.Tensor], floor: list[float]) -> dict[str, Any]:
    """The ``layers.json`` entry of one row."""
    names = slot_names(len(errors) - 2)
    layers = [{"name": name, "rel_err_median": float(e.median()), "rel_err_max": float(e.max()),
               "floor": f} for name, e, f in zip(names, errors, floor)]
    first = next((entry["name"] for entry in layers
                  if entry["rel_err_median"] > FLOOR_FACTOR * entry["floor"]), None)
    return {"layers": layers, "first_diverging_layer": first}


def write_layers(out: Path, rows: dict[str, dict[str, Any]], labels: dict[str, str],
                 reference: str) -> dict[str, Path]:
    """``layers.json`` and ``layers.png`` in ``out``."""
    paths = {"layers_json": out / "layers.json", "layers_png": out / "layers.png"}
    payload = {"reference": reference, "floor_factor": FLOOR_FACTOR,
               "rule": "first slot whose median relative error exceeds floor_factor x the "
                       "median error between the reference in its dtype and in fp32",
               "rows": rows}
    paths["layers_json"].write_text(json.dumps(payload, indent=1))
    _plot(paths["layers_png"], rows, labels)
    return paths


def _plot(path: Path, rows: dict[str, dict[str, Any]], labels: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    floor_drawn = False
    for key, row in rows.items():
        names = [e["name"] for e in row["layers"]]
        ax.plot(range(len(names)), [max(e["rel_err_median"], 1e-12) for e in row["layers"]],
                marker="o", ms=3, label=labels.get(key, key))
        if not floor_drawn:
            ax.plot(range(len(names)), [max(e["floor"], 1e-12) for e in row["layers"]], "k--",
                    label="rounding floor (reference: model dtype vs fp32)")
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            floor_drawn = True
    ax.set_yscale("log")
    ax.set_ylabel("median ||h_engine - h_trainer|| / ||h_trainer||")
    ax.set_title("check --layers: engine vs trainer, per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
