"""The trainer's side: teacher-forced logprobs of exactly the sampled tokens.

An RL trainer recomputes the logprob of every token the engine sampled with
its own forward pass and compares it with the engine's.  This module plays
that trainer with Hugging Face transformers:

* ``bf16-fp32head`` (default): the model runs in its dtype (bf16; each
  linear of the body sums its bf16 products in fp32 and rounds once, as a
  GPU trainer's bf16 GEMM does), and the lm_head projection is computed in
  fp32 (head weight and final hidden states upcast, fp32 matmul), as RL
  trainers commonly do to keep the log-softmax accurate;
* ``fp32``: the whole model in fp32 (an "ideal" trainer).

Logits are divided by the sampling temperature and masked with the same top-k
then top-p rule vLLM's sampler uses (masked tokens become ``-inf``, ties at
the top-k boundary are kept, top-p keeps the smallest high-probability set
whose mass reaches p and always the most likely token), then log-softmaxed in
fp32: the trainer's policy is the distribution the engine sampled from.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REFERENCE_KINDS = ("bf16-fp32head", "fp32")


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling transform both sides apply to the logits."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # <= 0 or >= vocab: off (vLLM accepts -1 and 0 for "off")


def apply_sampling_transform(logits: torch.Tensor, spec: SamplingSpec) -> torch.Tensor:
    """Return fp32 logprobs of the distribution the sampler draws from.

    ``logits`` is ``[tokens, vocab]``.  Order as in vLLM: temperature, top-k,
    top-p (on the top-k-masked distribution), log-softmax.  A temperature of
    0 means greedy in vLLM; its logprobs are then those of the unscaled logits.
    """
    x = logits.to(torch.float32)
    if spec.temperature > 0:
        x = x / spec.temperature
    vocab = x.shape[-1]
    if 0 < spec.top_k < vocab:
        kth_largest = torch.topk(x, spec.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth_largest, float("-inf"))
    if spec.top_p < 1.0:
        x = _mask_top_p(x, spec.top_p)
    return torch.log_softmax(x, dim=-1)


def _mask_top_p(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask the low-probability tail whose total mass is at most ``1 - top_p``.

    Works on ascending-sorted probabilities: a token is dropped when the mass of
    it and everything less likely is <= 1 - p; the most likely token never is.
    """
    ascending, order = torch.sort(x, dim=-1)
    tail_mass = torch.softmax(ascending, dim=-1).cumsum(dim=-1)
    drop = tail_mass <= (1.0 - top_p)
    drop[..., -1] = False
    ascending = ascending.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, ascending)


class ReferenceScorer:
    """Teacher-forcing scorer for one model folder, caching repeated sequences.

    Rows of the report often sample identical token sequences, so scores are
    memoised by (prompt, completion) token ids.
    """

    def __init__(self, model_dir: str | Path, kind: str = "bf16-fp32head",
                 dtype: str = "bfloat16", spec: SamplingSpec | None = None) -> None:
        if kind not in REFERENCE_KINDS:
            raise ValueError(
                f"unknown reference {kind!r}; choose one of {', '.join(REFERENCE_KINDS)}"
            )
        self.kind = kind
        self.spec = spec or SamplingSpec()
        self.model = load_model(model_dir, torch.float32 if kind == "fp32" else
                                 torch_dtype(dtype))
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = {}
        # Upcast the head once: converting a V x H weight per call costs more
        # than the whole bf16 forward pass of a small model.
        self._head = fp32_head_params(self.model)

    def score(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> list[float]:
        """Trainer logprob of each completion token given everything before it."""
        key = (tuple(prompt_ids), tuple(completion_ids))
        if key not in self._cache:
            self._cache[key] = self._score(list(prompt_ids), list(completion_ids))
        return list(self._cache[key])

    def score_many(self, pairs: Iterable[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """Score several (prompt, completion) pairs, one forward pass each."""
        return [self.score(p, c) for p, c in pairs]

    @torch.inference_mode()
    def _score(self, prompt: list[int], completion: list[int]) -> list[float]:
        if not completion:
            return []
        logprobs = completion_logprobs(self.model, self._head, self.spec, prompt, completion)
        return sampled(logprobs, completion).tolist()


def completion_logprobs(model: Any, head: tuple[torch.Tensor, torch.Tensor | None],
                        spec: SamplingSpec, prompt: Sequence[int],
                        completion: Sequence[int]) -> torch.Tensor:
    """``[len(completion), vocab]`` fp32 logprobs of the processed distribution at
    every completion position: one unpadded forward pass (no batching, so no
    padding effects), the head in fp32. The one trainer forward of the report and
    of ``check --online`` (which also differentiates through it)."""
    ids = torch.tensor([list(prompt) + list(completion)], dtype=torch.long)
    hidden = final_hidden(model, ids)[0, len(prompt) - 1 : -1]
    return apply_sampling_transform(head_logits_fp32(model, hidden, head), spec)


def sampled(logprobs: torch.Tensor, completion: Sequence[int]) -> torch.Tensor:
    """The logprob of each sampled token from ``completion_logprobs``' rows."""
    target = torch.tensor(list(completion), dtype=torch.long).unsqueeze(-1)
    return logprobs.gather(-1, target).squeeze(-1)


def torch_dtype(name: str) -> torch.dtype:
    """Map a vLLM-style dtype name to torch; errors name the bad value."""
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "half": torch.float16,
             "float32": torch.float32, "float": torch.float32}
    if name not in table:
        raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(table)}")
    return table[name]


def load_model(model_dir: str | Path, dtype: torch.dtype) -> Any:
    """Load the causal LM in ``dtype`` (default attention), in eval mode; in a
    16-bit dtype its body's linears accumulate in fp32 (``_fp32_accumulate``)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if dtype in (torch.bfloat16, torch.float16):
        for module in model.base_model.modules():
            if isinstance(module, torch.nn.Linear):
                module.forward = functools.partial(_fp32_accumulate, module)
    return model.eval()


def _fp32_accumulate(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A 16-bit linear as a GPU trainer's GEMM computes it: the exact products
    of the 16-bit operands summed in fp32, the result rounded to the input's
    dtype once. The same definition as torch's own CPU bf16 GEMM, up to the
    order of the sum; that one runs 5x slower on CPUs without AVX512-BF16
    (0.7 s vs 3.5 s for one 60-token SmolLM2-135M forward, measured here)."""
    bias = None if linear.bias is None else linear.bias.float()
    return torch.nn.functional.linear(x.float(), linear.weight.float(), bias).to(x.dtype)


def final_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """Final (post-norm) hidden states: the lm_head's input."""
    out = model.base_model(input_ids=ids, use_cache=False)
    return out.last_hidden_state


def fp32_head_params(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (possibly tied) lm_head weight and bias, upcast to fp32."""
    head = model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.float(), None if bias is None else bias.float()


def head_logits_fp32(model: Any, hidden: torch.Tensor,
                     params: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                     ) -> torch.Tensor:
    """lm_head projection in fp32, plus the model's own logit post-processing.

    Upcasts the hidden states and the head weight and bias (or uses ``params``
    from ``fp32_head_params``) and runs an fp32 matmul.  Then applies what the
    HF model applies after its head: Gemma-style final soft-capping and a
    ``logit_scale`` if configured.
    """
    weight, bias = params if params is not None else fp32_head_params(model)
    logits = torch.nn.functional.linear(hidden.float(), weight, bias)
    config = model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(config, "logit_scale", None)
    if scale and not isinstance(scale, bool):
        logits = logits * scale
    return logits
