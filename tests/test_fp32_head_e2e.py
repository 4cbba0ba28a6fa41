"""End to end on SmolLM2-135M-Instruct (bf16): our fp32 head against vLLM's
native ``head_dtype=float32`` and the bf16 head, scored on the same tokens.

Every engine scores the same token sequences by teacher forcing (prompt
logprobs; at T = 1 without top-k/top-p these equal processed logprobs), so the
rows differ only in the head. The trainer reference is HF transformers with a
bf16 body and an fp32 head (``parity.reference``). Our head and the native one
both give fp32 logits from the same bf16 weight, so their metrics agree up to
fp32 accumulation order; the bf16 head rounds every logit and must be worse.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import ENGINE_KWARGS, shutdown_engine

pytestmark = pytest.mark.engine

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)",
    "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
    "In 1969, Apollo 11 landed on the Moon, and Neil Armstrong became the first person to walk there.",
    "To make a cup of tea, boil water, add the leaves, wait three minutes, and pour it through a strainer.",
    "Machine learning models are trained by minimising a loss function with gradient descent.",
]
HEADS = {
    "ours": {"additional_config": {"rl_compat": {"fp32_head": "compute"}}},
    "native": {"additional_config": {"rl_compat": {"fp32_head": "off"}},
               "hf_overrides": {"head_dtype": "float32"}},
    "bf16": {"additional_config": {"rl_compat": {"fp32_head": "off"}}},
}


def _engine_logprobs(model: str, sequences: list[list[int]], **kwargs: Any) -> list[list[float]]:
    """Logprob of every token after the first, from one engine (shut down after)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **{**ENGINE_KWARGS, "enforce_eager": True, **kwargs})
    try:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": s} for s in sequences], params,
                            use_tqdm=False)
        return [[entry[tok].logprob for tok, entry in zip(s[1:], o.prompt_logprobs[1:])]
                for s, o in zip(sequences, outs)]
    finally:
        shutdown_engine(llm)


@pytest.fixture(scope="module")
def scored() -> dict[str, Any]:
    """Per-head engine logprobs and mismatch metrics against the trainer."""
    from transformers import AutoTokenizer

    from vllm_rl_compat.models import default_model_dir
    from vllm_rl_compat.parity.metrics import compute_metrics
    from vllm_rl_compat.parity.reference import ReferenceScorer

    model = str(default_model_dir(progress=False))
    tokenizer = AutoTokenizer.from_pretrained(model)
    sequences = [tokenizer.encode(text) for text in TEXTS]
    scorer = ReferenceScorer(model)
    trainer = [scorer.score(s[:1], s[1:]) for s in sequences]
    engine = {name: _engine_logprobs(model, sequences, **kw) for name, kw in HEADS.items()}
    return {"logprobs": engine,
            "metrics": {name: compute_metrics(trainer, lps) for name, lps in engine.items()}}


def test_ours_equals_native_per_token(scored) -> None:
    """Both heads give fp32 logits of the same bf16 weight: only the fp32
    accumulation order differs (per-token differences around 1e-5)."""
    ours, native = scored["logprobs"]["ours"], scored["logprobs"]["native"]
    diff = max(abs(a - b) for x, y in zip(ours, native) for a, b in zip(x, y))
    assert diff < 1e-3


# Allowance for accumulation order: per-token differences < 1e-3 (above); a
# count statistic may flip one token that sits on the clip boundary.
def _allowance(field: str, tokens: int) -> float:
    return {"mean_abs_dlogp": 1e-3, "max_abs_dlogp": 1e-3, "kl_k3": 1e-4,
            "clip_rate": 1.0 / tokens}[field]


@pytest.mark.parametrize("field", ["mean_abs_dlogp", "max_abs_dlogp", "kl_k3", "clip_rate"])
def test_ours_no_worse_than_native(scored, field) -> None:
    ours, native = scored["metrics"]["ours"], scored["metrics"]["native"]
    got, want = getattr(ours, field), getattr(native, field)
    assert got <= want + _allowance(field, ours.tokens), (field, got, want)


def test_ours_better_than_bf16_head(scored) -> None:
    ours, bf16 = scored["metrics"]["ours"], scored["metrics"]["bf16"]
    assert ours.tokens == bf16.tokens > 100
    assert ours.mean_abs_dlogp < bf16.mean_abs_dlogp
    assert ours.kl_k3 < bf16.kl_k3
