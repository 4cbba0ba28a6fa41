"""Which weight layout vLLM's CPU engine gives each linear layer, asked of the machine.

Why: after loading, vLLM's ``dispatch_cpu_unquantized_gemm``
(``vllm/model_executor/layers/utils.py``) decides per layer, from the CPU and
the dtype, how a linear computes, and for linears it usually empties
``layer.weight``:

* ``onednn``: a oneDNN handle holds a pre-packed copy (bf16 on AVX512-BF16 /
  AMX CPUs, fp32 on every x86 CPU); ``weight`` emptied;
* ``sgl``: AMX only, small bf16 layers: an SGL-kernel packed copy; ``weight``
  emptied (and a bias converted to fp32);
* ``F.linear``: oneDNN refused the dtype (bf16 on AVX2-only CPUs, or any CPU
  with ``ONEDNN_MAX_CPU_ISA=AVX2``): ``weight`` kept, read on every call;
* ``zentorch``: the Zen CPU platform's own kernel.

Every weight path of this package reads shapes from the checkpoint spec and
rebuilds packed state with vLLM's own ``process_weights_after_loading``, so it
handles the first three; ``zentorch`` models (and anything unknown) take
vLLM's layerwise reload. Two readings, which must agree: ``layer_layout`` of a
loaded layer (the engine, ``rl_compat_layouts``), and ``predict`` from vLLM's
own dispatch checks on a weight of that shape, without an engine
(``vllm-rl-compat info``). Runs in any process; no engine state.
"""

from __future__ import annotations

from typing import Any

import torch

# What each layout supports: the in-pause fast apply and overlapped staging
# (``weights.apply_cpu``, ``weights.staging``), else vLLM's layerwise reload.
_EVERY_PATH = "overlapped staging, in-pause fast apply, layerwise reload"
WEIGHT_PATHS = {"onednn": _EVERY_PATH, "sgl": _EVERY_PATH, "F.linear": _EVERY_PATH,
                "zentorch": "layerwise reload only (zen CPU platform)",
                "other": "layerwise reload only"}

# The names each closure vLLM builds captures (``dispatch_cpu_unquantized_gemm``).
_CAPTURES = {"handler": "onednn", "packed_weight": "sgl", "zen_weight": "zentorch"}


def layer_layout(layer: torch.nn.Module) -> str:
    """The layout of a loaded linear (see the module docstring)."""
    fn = layer.__dict__.get("cpu_linear")
    code = getattr(fn, "__code__", None)
    for name in getattr(code, "co_freevars", ()):
        if name in _CAPTURES:
            return _CAPTURES[name]
    if fn is not None and layer.weight.numel() > 0:
        return "F.linear"
    return "other"


def model_layouts(model: torch.nn.Module) -> dict[str, str]:
    """``{linear kind: layout}`` of a loaded model; a kind is the module's last
    name (``qkv_proj``, ``down_proj``, ...); several layouts join with ``+``."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    found: dict[str, set[str]] = {}
    for name, module in model.named_modules():
        if type(getattr(module, "quant_method", None)) is UnquantizedLinearMethod:
            found.setdefault(name.rsplit(".", 1)[-1], set()).add(layer_layout(module))
    return {kind: "+".join(sorted(layouts)) for kind, layouts in sorted(found.items())}


def predict(dtype: torch.dtype, n: int, k: int) -> str:
    """The layout vLLM's dispatch gives an ``[n, k]`` weight of ``dtype`` in this
    process (its own checks, in its order; ``ONEDNN_MAX_CPU_ISA`` counts when
    it is set before oneDNN's first use)."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.utils import check_cpu_sgl_kernel
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return "other"
    if current_platform.is_zen_cpu():
        return "zentorch"
    if check_cpu_sgl_kernel(n, k, dtype):
        return "sgl"
    if getattr(ops, "_supports_onednn", False):
        try:
            ops.create_onednn_mm(torch.zeros(n, k, dtype=dtype).t(), 32)
            return "onednn"
        except RuntimeError:
            pass
    return "F.linear"


def llama_linear_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``{kind: (n, k)}`` of a Llama-shaped model's fused linears, from its HF config."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    return {"qkv_proj": ((heads + 2 * kv) * head_dim, hidden),
            "o_proj": (hidden, heads * head_dim),
            "gate_up_proj": (2 * inter, hidden),
            "down_proj": (hidden, inter)}


def predicted_layouts(config: dict[str, Any], dtype: torch.dtype) -> dict[str, str]:
    """``model_layouts`` as vLLM would give it to this Llama-shaped model."""
    return {kind: predict(dtype, n, k)
            for kind, (n, k) in sorted(llama_linear_shapes(config).items())}
