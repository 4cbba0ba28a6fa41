"""Seeded sampling with chunked prefill on the CPU engine (``seeded_sampling``).

One engine with a small token budget (64 per step) serves every test: a
prompt longer than the budget, or one queued behind another request's
prefill, is prefilled in chunks, and vLLM samples (and discards) a token for
it at each partial step. Stock vLLM then rewinds the request's generator with
``set_offset``, which a CPU generator does not have: the engine died.

Exactness uses the same engine twice: prompt A (48 tokens) alone fits the
budget and is prefilled in one step; queued behind a 100-token request
(64 tokens in step 1, 36 + 28 of A in step 2, A's last 20 in step 3) its
prefill is split and one sample of A is discarded. With the generator
restored, A's seeded tokens must be the same in both runs. Prefix caching is
off (RL mode), so the second run recomputes A's prompt.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest

pytestmark = pytest.mark.engine

BUDGET = 64  # max_num_batched_tokens: tokens per engine step
# Enough tokens for a drifted generator to show: without the restore (vLLM's
# rewind merely skipped) A's tokens differed from the 5th on; the tiny model is
# peaked at some positions, so not every token changes.
MAX_TOKENS = 16
PROMPT_A = {"prompt_token_ids": [(37 * i + 11) % 5000 + 100 for i in range(48)]}
FILLER = {"prompt_token_ids": [(53 * i + 7) % 5000 + 100 for i in range(100)]}


def _seeded(seed: int, n: int = 1) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=1.0, seed=seed, n=n, max_tokens=MAX_TOKENS,
                          ignore_eos=True, detokenize=False)


@pytest.fixture(scope="module")
def llm(tiny_model: Callable[..., str], llm_factory: Callable[..., Any]) -> Any:
    return llm_factory(tiny_model("llama-untied"), enforce_eager=True,
                       max_num_batched_tokens=BUDGET, max_num_seqs=8,
                       enable_chunked_prefill=True, enable_prefix_caching=False)


def test_seeded_chunked_prefill_completes(llm: Any) -> None:
    """Seeded requests (n = 4) whose 100-token prompts exceed the step budget."""
    prompts = [FILLER, {"prompt_token_ids": FILLER["prompt_token_ids"][::-1]}]
    outs = llm.generate(prompts, _seeded(7, n=4), use_tqdm=False)
    assert [len(o.outputs) for o in outs] == [4, 4]
    assert all(len(c.token_ids) == MAX_TOKENS for o in outs for c in o.outputs)


def test_seeded_tokens_do_not_depend_on_chunking(llm: Any) -> None:
    """A's seeded tokens: prefilled in one step == prefilled in two chunks."""
    from vllm import SamplingParams

    alone = llm.generate([PROMPT_A], _seeded(1234), use_tqdm=False)[0]
    unseeded = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True,
                              detokenize=False)
    batched = llm.generate([FILLER, PROMPT_A], [unseeded, _seeded(1234)], use_tqdm=False)[1]
    assert list(alone.outputs[0].token_ids) == list(batched.outputs[0].token_ids)
