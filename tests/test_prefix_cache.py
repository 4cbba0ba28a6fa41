"""Versioned prefix caching (``rl_compat.prefix_cache="versioned"``): two engines.

The hazard, shown and then removed: the same long prompt before and after a
weight update. With stock prefix caching (``disable_prefix_caching: false``)
the post-update request hits blocks computed under the old weights and its
logprobs differ from the new weights' (the stale hit, asserted); with the
versioned cache it misses, equals a cache-free computation on the new weights
bit for bit, and later requests of the new version hit again. Within one
version, the n = 8 children of a long prompt share its blocks (vLLM's own
prefix-cache counters); a user's ``cache_salt`` still separates users. Each
completion reports which version computed its prompt KV (the stale hit shows
as old-version positions).
"""

from __future__ import annotations

from typing import Any

import pytest

from test_weight_sync import EAGER, make_llm, shutdown

pytestmark = pytest.mark.engine

PROMPT = [(7 * i) % 40000 + 100 for i in range(300)]  # several full blocks
OTHER = [(11 * i) % 40000 + 100 for i in range(300)]
# The versioned engine's KV cache: 12 blocks of 128 tokens (11 usable); a
# 300-token prompt with 4 new tokens takes 3 (two full, cached, one partial).
BLOCKS = 12


def _gen(llm: Any, prompt: list[int], salt: str | None = None, n: int = 1) -> Any:
    from vllm import SamplingParams

    item: dict[str, Any] = {"prompt_token_ids": prompt}
    if salt is not None:
        item["cache_salt"] = salt
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=7, logprobs=0, n=n)
    return llm.generate([item], params, use_tqdm=False)[0]


def _sample(out: Any) -> list[tuple[int, float]]:
    c = out.outputs[0]
    return [(t, lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)]


def _counters(llm: Any) -> dict[str, int]:
    names = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits")
    return {m.name: m.value for m in llm.get_metrics() if m.name in names}


@pytest.fixture(scope="module")
def engines(tiny_model) -> Any:
    from vllm_rl_compat.weight_sync import WeightSync

    a, b = tiny_model("llama-untied", 0), tiny_model("llama-untied", 1)
    plain = make_llm(a, additional_config={"rl_compat": {"disable_prefix_caching": False}},
                     **EAGER)
    versioned = make_llm(a, additional_config={"rl_compat": {"prefix_cache": "versioned"}},
                         disable_log_stats=False, num_gpu_blocks_override=BLOCKS, **EAGER)
    yield {"a": a, "b": b, "plain": (plain, WeightSync(plain)),
           "versioned": (versioned, WeightSync(versioned))}
    shutdown(plain)
    shutdown(versioned)


def _before_and_after_update(llm: Any, sync: Any, b: str) -> tuple[Any, Any]:
    """The prompt under A (cached), then under B right after the update."""
    first = _gen(llm, PROMPT)
    warm = _gen(llm, PROMPT)
    assert warm.num_cached_tokens > 0  # prefix caching is on in both engines
    # Computed, then read from the cache: the same version either way.
    assert _prompt(first) == _prompt(warm) == [(sync.version, 0, len(PROMPT))]
    sync.update_from_files(b)
    return warm, _gen(llm, PROMPT)


def _prompt(out: Any) -> list[tuple[Any, int, int]]:
    """Which version computed each prompt position's KV (``kv_versions``)."""
    from vllm_rl_compat.weight_sync import prompt_versions

    assert out.kv_transfer_params is None  # the carrier key never reaches the user
    return prompt_versions(out.outputs[0])


def test_versioned_cache_is_exact_across_an_update(engines) -> None:
    b = engines["b"]
    plain, plain_sync = engines["plain"]
    versioned, versioned_sync = engines["versioned"]
    assert plain.llm_engine.vllm_config.cache_config.enable_prefix_caching
    assert versioned.llm_engine.vllm_config.cache_config.enable_prefix_caching

    _, stale = _before_and_after_update(plain, plain_sync, b)
    plain.reset_prefix_cache()  # nothing cached: the new weights' own numbers
    fresh_b = _gen(plain, PROMPT)
    assert fresh_b.num_cached_tokens == 0
    # The hazard: stock caching reuses KV computed under the old weights, and
    # the completion says so: its first tokens' KV is the old version's.
    assert stale.num_cached_tokens > 0 and _sample(stale) != _sample(fresh_b)
    hit, v = stale.num_cached_tokens, plain_sync.version
    assert _prompt(stale) == [(v - 1, 0, hit), (v, hit, len(PROMPT))]
    assert _prompt(fresh_b) == [(v, 0, len(PROMPT))]

    _, after = _before_and_after_update(versioned, versioned_sync, b)
    assert after.num_cached_tokens == 0
    assert _sample(after) == _sample(fresh_b)  # bit for bit
    again = _gen(versioned, PROMPT)  # the new version's blocks are shared again
    assert again.num_cached_tokens > 0
    assert [v for v, _, _ in _versions(after)] == [versioned_sync.version]
    assert _prompt(after) == _prompt(again) == [(versioned_sync.version, 0, len(PROMPT))]


def _versions(out: Any) -> list[tuple[Any, int, int]]:
    from vllm_rl_compat.weight_sync import token_versions

    return token_versions(out.outputs[0])


def test_n_children_share_the_prompt(engines) -> None:
    from vllm_rl_compat.weight_sync import prompt_versions

    versioned, _ = engines["versioned"]
    block = versioned.llm_engine.vllm_config.cache_config.block_size
    before = _counters(versioned)
    out = _gen(versioned, OTHER, n=8)
    assert len(out.outputs) == 8
    after = _counters(versioned)
    hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
    queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
    assert queries >= 8 * len(OTHER) - 8  # every child looked the prompt up
    assert hits >= 7 * (len(OTHER) - block)  # computed once, read by the other 7
    version = engines["versioned"][1].version
    assert all(prompt_versions(c) == [(version, 0, len(OTHER))] for c in out.outputs)


def test_user_salt_still_separates_users(engines) -> None:
    versioned, _ = engines["versioned"]
    prompt = [(13 * i) % 40000 + 100 for i in range(300)]
    assert _gen(versioned, prompt, salt="alice").num_cached_tokens == 0
    assert _gen(versioned, prompt, salt="alice").num_cached_tokens > 0
    assert _gen(versioned, prompt, salt="bob").num_cached_tokens == 0
    assert _gen(versioned, prompt).num_cached_tokens == 0  # no salt: another key again


def _filler(k: int) -> list[int]:
    return [(97 * k + 13 * i) % 40000 + 100 for i in range(300)]


def test_old_version_blocks_are_evicted_first(engines, tiny_model) -> None:
    """After an update no request can hit a block of an older version; vLLM's
    free-block queue evicts the least recently freed cached block first (a
    request's uncached partial block is re-used before any cached one), and
    every old-version block was freed before the update, so under memory
    pressure they go before any block of the new version: no freeing step is
    needed. Here each 300-token request evicts two cached blocks; 4 requests
    evict 8 of the 9 old ones and keep the new version's 2, a 5th would not."""
    versioned, sync = engines["versioned"]
    assert versioned.llm_engine.vllm_config.cache_config.num_gpu_blocks == BLOCKS
    for k in range(3):  # fill the cache with the current version's blocks
        _gen(versioned, _filler(k))
    sync.update_from_files(engines["a"])  # every cached block is old now
    prompt = [(17 * i) % 40000 + 100 for i in range(300)]
    _gen(versioned, prompt)
    assert _gen(versioned, prompt).num_cached_tokens == 256  # the new version's 2 blocks
    for k in range(10, 14):
        assert _gen(versioned, _filler(k)).num_cached_tokens == 0
    assert _gen(versioned, prompt).num_cached_tokens == 256  # old blocks went first
    for k in range(20, 25):  # the pressure is real: one more request evicts it too
        _gen(versioned, _filler(k))
    assert _gen(versioned, prompt).num_cached_tokens == 0
