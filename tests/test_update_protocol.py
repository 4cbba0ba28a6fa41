"""The weight update as one state machine under faults and hostile callers (issue 30).

One ``AsyncLLM`` on a tiny model for the module (a real CPU engine; the
steps are vLLM's own RL calls). Each case below failed on the code before
issue 30:

* an abort while ``update_weights`` still waits for staging (a stalled
  sender: here a FIFO nobody writes) ends that call with the abort's reason
  before the abort returns, and the next update cannot start while the
  stalled read still runs, so it can never consume the next update's bytes;
* ``pause_generation``, ``resume_generation`` and ``update_weight_version``
  are refused while an update is open (HTTP: 409, ``test_rl_http``);
* an update left open past its lease is aborted: our pause released, staging
  dropped, the next call told why;
* a boundary commit returns only once every output the engine core sent
  before it reached its stream (no sleep: ``weights.delivery``);
* vLLM's ``reset_weights`` / ``reload_weights`` worker methods are refused.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vllm_rl_compat.weights.spec import WeightUpdateError
from vllm_rl_compat.weights.transaction import TransactionStateError

pytestmark = pytest.mark.engine


class Rig:
    """The module's engine and the event loop it lives in."""

    def __init__(self, model_a: str, model_b: str) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.a, self.b = model_a, model_b
        self.loop = asyncio.new_event_loop()
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=model_a, dtype="bfloat16", max_model_len=512, seed=0, enforce_eager=True))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @property
    def txn(self) -> Any:
        from vllm_rl_compat.weights.native import transaction_of

        return transaction_of(self.engine, self.engine.vllm_config)

    async def greedy(self) -> list[int]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        async for out in self.engine.generate("which weights:", params,
                                              f"g-{time.monotonic_ns()}"):
            pass
        return list(out.outputs[0].token_ids)

    async def staging(self) -> dict[str, bool]:
        return (await self.engine.collective_rpc("rl_compat_staging"))[0]

    async def until(self, what: Callable[[], Any], timeout: float = 120.0) -> None:
        """Wait for a condition the engine reports (polled; the bound only
        turns a hang into a failure)."""
        deadline = time.monotonic() + timeout
        while not await what():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.01)

    async def update(self, path: str) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.engine.start_weight_update()
        await self.engine.update_weights(WeightTransferUpdateRequest(
            {"source": "files", "path": path}))
        await self.engine.finish_weight_update()


@pytest.fixture(scope="module")
def rig(tiny_model) -> Iterator[Rig]:
    made = Rig(tiny_model("llama-untied", 0), tiny_model("llama-untied", 1))
    made.fresh_a = made.run(made.greedy())
    yield made
    made.engine.shutdown()
    made.loop.close()


def test_abort_ends_a_waiting_update_and_a_stalled_read_blocks_the_next(rig, tmp_path):
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    from vllm_rl_compat.weights.native import abort_weight_update_async

    stalled = tmp_path / "stalled"
    stalled.mkdir()
    fifo = stalled / "model.safetensors"
    os.mkfifo(fifo)  # opening it for reading blocks until someone writes

    async def scenario() -> None:
        await rig.engine.start_weight_update()
        assert rig.txn.overlapped  # staged beside the weights: the call polls
        waiting = asyncio.ensure_future(rig.engine.update_weights(
            WeightTransferUpdateRequest({"source": "files", "path": str(stalled)})))
        await rig.until(lambda: _busy(rig))
        assert not waiting.done()
        dropped = await abort_weight_update_async(rig.engine)
        assert dropped is not None
        # The waiting call ended before the abort returned, with its reason.
        assert waiting.done()
        with pytest.raises(WeightUpdateError, match="aborted by abort_weight_update"):
            waiting.result()
        state = await rig.staging()
        assert state == {"held": False, "busy": True, "kept": False}, state
        # The read of the aborted update still blocks: no new update may stage
        # (it would share the staging thread and, over gloo, the stream).
        with pytest.raises(WeightUpdateError, match="still runs an aborted update"):
            await rig.engine.start_weight_update()
        assert not rig.txn.is_open and not await rig.engine.is_paused()

    rig.run(scenario())
    # The sender recovers: the header of a valid update arrives. The aborted
    # work reads it, then stops at its next check, before reading a tensor.
    header = _header_bytes(Path(rig.b) / "model.safetensors")
    rig.run(rig.until(lambda: _unblocked(rig, fifo, header)))
    rig.run(rig.update(rig.b))
    assert rig.run(rig.greedy()) != rig.fresh_a
    rig.run(rig.update(rig.a))
    assert rig.run(rig.greedy()) == rig.fresh_a


async def _busy(rig: Rig) -> bool:
    return (await rig.staging())["busy"]


def _header_bytes(file: Path) -> bytes:
    raw = file.read_bytes()
    return raw[:8 + int.from_bytes(raw[:8], "little")]


async def _unblocked(rig: Rig, fifo: Path, header: bytes) -> bool:
    """Write ``header`` into the FIFO once its reader waits; done when the
    staging thread is idle."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader waiting (yet, or any more)
        pass
    else:
        os.write(fd, header)
        os.close(fd)
    return not (await rig.staging())["busy"]


def test_pause_resume_and_label_refused_while_an_update_is_open(rig):
    from vllm_rl_compat.weights.native import abort_weight_update_async

    async def scenario() -> None:
        version = await rig.engine.get_weight_version()
        await rig.engine.start_weight_update()
        name = rig.txn.open_id[:8]
        for call in (lambda: rig.engine.pause_generation(mode="keep", clear_cache=False),
                     lambda: rig.engine.resume_generation(),
                     lambda: rig.engine.update_weight_version("forged")):
            with pytest.raises(TransactionStateError, match=f"weight update {name}"):
                await call()
        assert not await rig.engine.is_paused()
        assert await rig.engine.get_weight_version() == version
        assert await abort_weight_update_async(rig.engine) is not None
        await rig.engine.pause_generation(mode="keep", clear_cache=False)  # allowed again
        assert await rig.engine.is_paused()
        await rig.engine.resume_generation()

    rig.run(scenario())
    assert rig.run(rig.greedy()) == rig.fresh_a


def test_lease_expiry_aborts_releases_the_pause_and_says_why(rig, monkeypatch):
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_UPDATE_LEASE_S", "1.5")
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING", "in_pause")

    async def scenario() -> None:
        await rig.engine.start_weight_update()  # in the pause: generation stops
        assert rig.txn.lease == 1.5 and await rig.engine.is_paused()
        opened = time.monotonic()
        await rig.until(lambda: _closed(rig), timeout=60)
        assert time.monotonic() - opened >= 1.5
        assert not await rig.engine.is_paused()
        assert await rig.staging() == {"held": False, "busy": False, "kept": False}
        with pytest.raises(TransactionStateError, match="lease expired"):
            await rig.engine.update_weights(WeightTransferUpdateRequest(
                {"source": "files", "path": rig.b}))

    rig.run(scenario())
    assert rig.run(rig.greedy()) == rig.fresh_a


async def _closed(rig: Rig) -> bool:
    return not rig.txn.is_open


def test_commit_returns_after_the_outputs_sent_before_it(rig):
    """A slow output handler (every batch of outputs takes 0.1 s to reach its
    stream) cannot make a commit's reply overtake older outputs: no output of
    the old version is delivered after the update returns."""
    from vllm import SamplingParams

    from vllm_rl_compat.weight_sync import AsyncWeightSync

    engine = rig.engine
    delivered: list[tuple[float, str | None]] = []
    original_get = engine.engine_core.get_output_async
    original_process = engine.output_processor.process_outputs

    async def slow_get() -> Any:
        outputs = await original_get()
        await asyncio.sleep(0.1)
        return outputs

    def process(*args: Any, **kwargs: Any) -> Any:
        result = original_process(*args, **kwargs)
        delivered.append((time.monotonic(), kwargs.get("weight_version")))
        return result

    async def scenario() -> None:
        sync = await AsyncWeightSync.create(engine)
        old = await engine.get_weight_version()
        params = SamplingParams(max_tokens=30, ignore_eos=True, temperature=1.0)
        seen: list[int] = []

        async def consume() -> None:
            async for out in engine.generate("across a slow handler:", params, "slow"):
                seen.append(len(out.outputs[0].token_ids))

        task = asyncio.ensure_future(consume())
        await rig.until(lambda: _true_if(bool(seen)))
        await sync.update_from_files(rig.b)
        returned = time.monotonic()
        await asyncio.wait_for(task, 120)
        stale = [t for t, v in delivered if v == old and t > returned]
        assert not stale, f"{len(stale)} outputs of version {old} delivered after the commit"
        assert any(v != old for _, v in delivered)  # the request ran across it
        await sync.update_from_files(rig.a)

    engine.engine_core.get_output_async = slow_get
    engine.output_processor.process_outputs = process
    try:
        rig.run(scenario())
    finally:
        del engine.engine_core.get_output_async, engine.output_processor.process_outputs
    assert rig.run(rig.greedy()) == rig.fresh_a


async def _true_if(value: bool) -> bool:
    return value


@pytest.mark.parametrize("method", ["reset_weights", "reload_weights"])
def test_vllm_weight_changing_worker_methods_refused(rig, method):
    with pytest.raises(Exception, match=f"{method} refused in RL mode"):
        rig.run(rig.engine.collective_rpc(method))
    assert rig.run(rig.greedy()) == rig.fresh_a


def test_cancelled_staging_stops_between_tensors():
    """The staging thread's work checks for an abort before every tensor."""
    import torch

    from vllm_rl_compat.weights.backends import _Overlap
    from vllm_rl_compat.weights.staging import Cancelled, StagingJob

    overlap = _Overlap()
    release, reached = threading.Event(), threading.Event()
    loaded: list[str] = []

    def items() -> Iterator[tuple[str, Any]]:
        yield "a", torch.zeros(2)
        reached.set()
        release.wait(60)
        yield "b", torch.zeros(2)

    def work() -> None:
        for name, _ in overlap.track(items()):
            loaded.append(name)

    job = StagingJob()
    job.submit(work)
    assert reached.wait(60)
    overlap.cancelled = True
    release.set()
    assert job.cancel(wait_s=60) and not job.busy()
    assert loaded == ["a"] and [e[0] for e in overlap.entries] == ["a"]
    with pytest.raises(Cancelled):
        overlap.check()
