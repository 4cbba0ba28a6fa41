"""Switch off: vLLM behaves exactly as without the plugin (two engine starts).

``VLLM_RL_COMPAT=0`` makes ``register()`` return before anything is imported
or patched, in every process. One child process with the switch off checks
everything RL mode would have changed, at once: the engine settings, the
logprob kind, the lm_head (stock class, bf16 logits equal to the stock
projection, no patch), the worker extension (``WeightSync`` cannot attach),
the seeded-sampling patch, and the front end (no vLLM call or plugin list
wrapped, no weight-transfer backend set). A second child with the plugin not loaded at
all (``VLLM_PLUGINS=""``) must give identical tokens, logprobs, settings and
head state. The RL-mode side of each check lives with its feature's tests.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import ENGINE_KWARGS, run_engine_subprocess

pytestmark = pytest.mark.engine

T = 0.7
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a fox"]
SAMPLING = {"temperature": T, "max_tokens": 8, "logprobs": 0, "seed": 1234}
STOCK = {"logprobs_mode": "raw_logprobs", "enable_prefix_caching": True,
         "worker_extension_cls": "", "weight_transfer_backend": None}
# Sampled (decode) vs scored (prefill) logprobs of the same bf16 engine differ by
# bf16 rounding of the body's activations; processed logprobs at T = 0.7 are
# much further away (checked relative to it, below).
TOL_RAW = 0.15


@pytest.fixture(scope="module")
def runs(tiny_model) -> dict[str, dict[str, Any]]:
    request = {"model": tiny_model("llama-untied"), "prompts": PROMPTS, "sampling": SAMPLING,
               "engine_kwargs": {**ENGINE_KWARGS, "enforce_eager": True, "max_logprobs": -1},
               "inspect": True}
    env = {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the head probe travels by value
    return {"switch_off": run_engine_subprocess(request, {**env, "VLLM_RL_COMPAT": "0"}),
            "plugins_disabled": run_engine_subprocess(request, {**env, "VLLM_PLUGINS": ""})}


def test_switch_off_is_identical_to_plugin_disabled(runs) -> None:
    off, disabled = runs["switch_off"], runs["plugins_disabled"]
    assert off["outputs"] == disabled["outputs"]
    assert off["settings"] == disabled["settings"]
    assert off["inspect"] == disabled["inspect"]
    assert {key: off["settings"][key] for key in STOCK} == STOCK


def test_switch_off_returns_raw_logprobs(runs) -> None:
    outputs, refs = runs["switch_off"]["outputs"], runs["switch_off"]["inspect"]["reference"]
    for out, ref in zip(outputs, refs):
        assert len(out["token_ids"]) == SAMPLING["max_tokens"]
        got = torch.tensor(out["logprobs"], dtype=torch.float64)
        raw, processed = (torch.tensor(ref[k], dtype=torch.float64) for k in ("raw", "processed"))
        assert (got - raw).abs().max() < TOL_RAW
        assert (got - processed).abs().mean() > 4 * (got - raw).abs().mean()


def test_switch_off_head_untouched(runs) -> None:
    assert runs["switch_off"]["inspect"]["head"] == {
        "cls": "LogitsProcessor", "dtypes": ["torch.bfloat16"], "stock_equal": True,
        "patched": False}


def test_switch_off_installs_no_extension(runs) -> None:
    assert "worker extension is not installed" in runs["switch_off"]["inspect"]["weight_sync_error"]


def test_switch_off_wraps_nothing_in_the_front_end(runs) -> None:
    """No RL calls routed, no HTTP routes added (the endpoint-plugin list is vLLM's)."""
    assert runs["switch_off"]["inspect"]["patched_here"] == []
