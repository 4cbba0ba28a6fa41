"""AsyncLLM under load: streaming requests keep running across K updates.

Keep mode with ``clear_cache=False``: running requests are frozen at a step
boundary, the weights change, and they continue with their KV cache. Checks:
every request finishes with exactly its token budget (deltas add up, nothing
lost or duplicated), the per-token version spans cover every token, never
decrease, and agree with when the updates happened as the client saw them (a
token received while version v was current cannot come from a later
version), and every request spans several versions (all run across the
first update, which pauses at once); the prompt KV of each request is
reported as the first version's.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from vllm_rl_compat.weight_sync import (
    AsyncWeightSync,
    WeightUpdateError,
    prompt_versions,
    token_versions,
)

N_REQUESTS = 6
MAX_TOKENS = 40
K_UPDATES = 3


def _state(model_dir: str):
    from safetensors.torch import load_file

    from vllm_rl_compat.weights.protocol.spec import safetensors_files

    out = {}
    for f in safetensors_files(model_dir):
        out.update(load_file(str(f)))
    return out


async def _greedy(engine) -> list[int]:
    """16 greedy tokens of a fixed prompt: which weights are loaded."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    async for out in engine.generate("weights check:", params, f"greedy-{time.monotonic()}"):
        pass
    return list(out.outputs[0].token_ids)


async def _run(model_a: str, model_b: str, monkeypatch) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model_a, dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True,
        additional_config={"rl_compat": {"weight_version_start": 10}}))
    try:
        # Before any WeightSync exists the engine already labels weight_version_start.
        early = SamplingParams(max_tokens=4, ignore_eos=True)
        async for out in engine.generate("before any update", early, "early"):
            pass
        assert token_versions(out.outputs[0]) == [(10, 0, 4)]
        sync = await AsyncWeightSync.create(engine)
        assert sync.version == 10
        states = [_state(model_b), _state(model_a)]
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=1.0,
                                output_kind=RequestOutputKind.DELTA)
        received: dict[str, list[tuple[int, int]]] = {}  # rid -> [(n_tokens, version seen)]
        finals = {}

        async def consume(i: int) -> None:
            rid = f"req-{i}"
            received[rid] = []
            async for out in engine.generate(f"prompt number {i}:", params, rid):
                n = len(out.outputs[0].token_ids)
                received[rid].append((n, sync.version))
                if out.finished:
                    finals[rid] = out

        def min_tokens() -> int:
            return min((sum(n for n, _ in r) for r in received.values()), default=0)

        async def updater() -> list[int]:
            versions = []
            for k in range(K_UPDATES):
                while min_tokens() < 6 * (k + 1):
                    await asyncio.sleep(0.005)
                with monkeypatch.context() as mp:
                    if k == 0:  # pauses at once: every request is still running
                        mp.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING", "in_pause")
                    versions.append(await sync.update_from_tensors(states[k % 2]))
            return versions

        tasks = [asyncio.create_task(consume(i)) for i in range(N_REQUESTS)]
        versions = await updater()
        await asyncio.gather(*tasks)
        assert versions == [11, 12, 13] and sync.version == 13

        assert sorted(finals) == sorted(received)  # all N finished, once each
        multi = 0
        for rid, out in finals.items():
            seen = received[rid]
            assert sum(n for n, _ in seen) == MAX_TOKENS  # no token lost or duplicated
            spans = token_versions(out.outputs[0])
            assert spans[0][1] == 0 and spans[-1][2] == MAX_TOKENS
            assert all(a[2] == b[1] for a, b in zip(spans, spans[1:]))  # contiguous
            assert [v for v, _, _ in spans] == sorted({v for v, _, _ in spans})
            assert all(10 <= v <= 13 for v, _, _ in spans)
            per_token = [v for v, s, e in spans for _ in range(s, e)]
            pos = 0
            for n, current in seen:  # produced no later than received
                assert all(v <= current for v in per_token[pos:pos + n]), (rid, spans, seen)
                pos += n
            multi += len(spans) > 1
            # Keep mode: the prompt KV stays the first version's, however many
            # versions sampled the tokens (``kv_versions``).
            prompt = (spans[0][0], 0, len(out.prompt_token_ids))
            assert prompt_versions(out.outputs[0]) == [prompt], (rid, spans)
        # all were running at the first (in-pause) update: each continued after it
        assert multi == N_REQUESTS, "a request did not run across an update"

        # A bad update while requests run: rejected, generation continues.
        before = sync.version
        bad = dict(states[0])
        bad.pop("model.norm.weight")
        task = asyncio.create_task(consume(99))
        while not received.get("req-99"):
            await asyncio.sleep(0.005)
        with pytest.raises(WeightUpdateError, match="missing names: model.norm.weight"):
            await sync.update_from_tensors(bad)
        await asyncio.wait_for(task, 120)
        assert sync.version == before
        assert token_versions(finals["req-99"].outputs[0]) == [(13, 0, MAX_TOKENS)]
        assert not await engine.is_paused()

        # Concurrent update calls are serialised: versions are distinct and consecutive.
        t0 = time.monotonic()
        got = await asyncio.gather(*(sync.update_from_tensors(states[i % 2]) for i in range(3)))
        assert sorted(got) == [14, 15, 16], got
        assert time.monotonic() - t0 < 120

        # Cancelled updates are all or nothing: whenever the cancel lands, the
        # engine is serving, unpaused, with either the old or the new weights.
        ref = {}
        for idx in (1, 0):
            await sync.update_from_tensors(states[idx])
            ref[idx] = await _greedy(engine)
        assert ref[0] != ref[1]
        loaded = 0
        for delay in (0.0, 0.02, 0.08, 0.3):
            before, idx = sync.version, 1 - loaded
            task = asyncio.create_task(sync.update_from_tensors(states[idx]))
            await asyncio.sleep(delay)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            assert sync.version in (before, before + 1) and not await engine.is_paused()
            loaded = idx if sync.version == before + 1 else loaded
            assert await _greedy(engine) == ref[loaded], (delay, sync.version)
        assert await sync.update_from_tensors(states[0]) == sync.version  # still usable
        assert [r["overlapped"] for r in sync.last_apply] == [True]  # auto, on CPU
        # One round trip; the engine core commits between two steps: no pause.
        assert sync.last_steps[:3] == ["start", "update:1", "commit"], sync.last_steps
        assert sync.last_pause_seconds == 0.0

        # A start that fails (explicit overlapped staging that does not fit)
        # refuses the chunk and the commit queued behind it: nothing applied.
        v = sync.version
        with monkeypatch.context() as mp:
            mp.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING", "overlapped")
            mp.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB", "0.0001")
            with pytest.raises(WeightUpdateError, match=r"weight_staging='overlapped' "
                               r"refused: .*model unchanged"):
                await sync.update_from_tensors(states[1])
        assert sync.version == v and sync.last_steps[-1] == "abort", sync.last_steps
        assert await _greedy(engine) == ref[0] and not await engine.is_paused()
        # ``auto`` where the copy does not fit: staged in the pause's way (the
        # chunk read in the RPC), applied by the same commit, still no pause.
        with monkeypatch.context() as mp:
            mp.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB", "0.0001")
            assert await sync.update_from_tensors(states[1]) == v + 1
        assert [r["overlapped"] for r in sync.last_apply] == [False]
        assert "commit" in sync.last_steps and sync.last_pause_seconds == 0.0
        assert await _greedy(engine) == ref[1]

        # Overlapped staging through vLLM's own calls: between start and finish
        # the engine keeps generating (tokens of the old version), and its step
        # clock shows the steps it ran meanwhile.
        v, t_open = sync.version, time.monotonic()
        await engine.start_weight_update()
        await engine.update_weights({"update_info": {"source": "files", "path": model_a}})
        task = asyncio.create_task(consume(50))
        while sum(n for n, _ in received.get("req-50", [])) < 8:
            await asyncio.sleep(0.005)
        t_finish = time.monotonic()
        await engine.finish_weight_update()
        await asyncio.wait_for(task, 120)
        assert sync.version == v + 1
        assert "commit" in sync.last_steps and sync.last_pause_seconds == 0.0
        first = token_versions(finals["req-50"].outputs[0])[0]
        assert first[0] == v and first[2] >= 8, first
        steps = (await engine.collective_rpc("rl_compat_step_times", args=(t_open,)))[0]
        assert sum(span[1] < t_finish for span in steps) >= 8  # stepped while staging
        assert all(0 < cpu <= end - start + 1e-3 for start, end, _, cpu, _ in steps)
        assert await _greedy(engine) == ref[1]  # A's weights, as a fresh load gives
    finally:
        engine.shutdown()


@pytest.mark.engine
def test_async_streaming_across_updates(tiny_model, monkeypatch):
    asyncio.run(_run(tiny_model("llama-untied", 0), tiny_model("llama-untied", 1),
                     monkeypatch))


async def _tp2(model_a: str, model_b: str) -> None:
    """TP = 2: the engine core commits on both ranks between two steps."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=model_a, dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True,
        tensor_parallel_size=2))
    try:
        sync = await AsyncWeightSync.create(engine)
        assert sync.num_workers == 2
        fresh_a = await _greedy(engine)
        params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=1.0)
        seen: list[int] = []

        async def consume():
            async for out in engine.generate("across the commit:", params, "tp2-stream"):
                seen.append(len(out.outputs[0].token_ids))
            return out

        task = asyncio.create_task(consume())
        while not seen or seen[-1] < 4:
            await asyncio.sleep(0.005)
        assert await sync.update_from_files(model_b) == 1
        out = await asyncio.wait_for(task, 120)
        spans = token_versions(out.outputs[0])
        assert [v for v, _, _ in spans] == [0, 1] and spans[0][2] >= 4, spans
        assert sync.last_steps[:3] == ["start", "update:1", "commit"], sync.last_steps
        assert sync.last_pause_seconds == 0.0
        assert [r["overlapped"] for r in sync.last_apply] == [True, True]
        assert await _greedy(engine) != fresh_a
        await sync.update_from_files(model_a)
        assert await _greedy(engine) == fresh_a  # exact round trip on both ranks
    finally:
        engine.shutdown()


@pytest.mark.engine
@pytest.mark.tp2
def test_async_tp2_commits_between_steps(tiny_model, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    asyncio.run(_tp2(tiny_model("llama-untied", 0), tiny_model("llama-untied", 1)))
