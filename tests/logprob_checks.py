"""Reference logprobs from an engine's own logits, for front-end tests.

Prompt logprobs are always raw (``log_softmax(logits)``, vLLM 0.32), so
scoring ``prompt + completion`` as a prompt with the full vocabulary gives the
engine's logits up to a per-position constant. ``log_softmax(raw / T)`` is
then exactly the processed distribution at temperature ``T`` (log_softmax is
shift-invariant), with no top-k/top-p.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def dense_rows(prompt_logprobs: Sequence[dict | None], start: int, vocab: int) -> torch.Tensor:
    """Full-vocabulary raw logprob rows for positions ``start..`` of a prompt."""
    rows = torch.full((len(prompt_logprobs) - start, vocab), float("-inf"), dtype=torch.float64)
    for i, entry in enumerate(prompt_logprobs[start:]):
        ids = torch.tensor(list(entry.keys()))
        rows[i, ids] = torch.tensor([lp.logprob for lp in entry.values()], dtype=torch.float64)
    return rows


def raw_rows(llm: Any, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """The engine's raw logprob rows for each completion position."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, prompt_logprobs=-1, detokenize=False)
    out = llm.generate({"prompt_token_ids": prompt_ids + completion_ids}, params, use_tqdm=False)
    vocab = llm.llm_engine.vllm_config.model_config.get_vocab_size()
    return dense_rows(out[0].prompt_logprobs, len(prompt_ids), vocab)


def expected_logprobs(rows: torch.Tensor, tokens: list[int], temperature: float) -> dict:
    """Raw and processed (at ``temperature``) logprobs of ``tokens`` from ``rows``."""
    idx = torch.tensor(tokens).unsqueeze(1)
    processed = torch.log_softmax(rows / temperature, dim=-1)
    return {"raw": rows.gather(1, idx).squeeze(1), "processed": processed.gather(1, idx).squeeze(1)}


def max_abs_diff(got: Sequence[float], want: torch.Tensor) -> float:
    return (torch.as_tensor(got, dtype=torch.float64) - want).abs().max().item()
