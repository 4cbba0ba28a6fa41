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
* vLLM's ``reset_weights`` / ``reload_weights`` worker methods are refused,
  and so is a framework's worker extension calling ``model.load_weights``.

Also: the staging thread stops between tensors, a parameter no update writes
is found, and a model-based test walks random sequences of the calls.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from vllm_rl_compat.weights.frontend.transaction import TransactionStateError
from vllm_rl_compat.weights.protocol.spec import WeightUpdateError

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
        from vllm_rl_compat.weights.frontend.native import transaction_of

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
    # Callables over collective_rpc, as RL frameworks send them (they set it too).
    mp = pytest.MonkeyPatch()
    mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    made = Rig(tiny_model("llama-untied", 0), tiny_model("llama-untied", 1))
    made.fresh_a = made.run(made.greedy())
    yield made
    made.run(_shutdown(made.engine))  # in its loop: its sockets close there
    made.loop.close()
    mp.undo()


async def _shutdown(engine: Any) -> None:
    engine.shutdown()


def test_abort_ends_a_waiting_update_and_a_stalled_read_blocks_the_next(rig, tmp_path):
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    from vllm_rl_compat.weights.frontend.native import abort_weight_update_async

    stalled = tmp_path / "stalled"
    stalled.mkdir()
    fifo = stalled / "model.safetensors"
    os.mkfifo(fifo)  # a sender that connects and then sends nothing
    writer: list[int] = []

    async def reader_waiting() -> bool:
        """The staging thread has opened the FIFO (a non-blocking open for
        writing succeeds only then); held open, its read now waits."""
        try:
            writer.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return False
        return True

    async def scenario() -> None:
        await rig.engine.start_weight_update()
        assert rig.txn.overlapped  # staged beside the weights: the call polls
        waiting = asyncio.ensure_future(rig.engine.update_weights(
            WeightTransferUpdateRequest({"source": "files", "path": str(stalled)})))
        await rig.until(reader_waiting)
        assert not waiting.done()
        dropped = await abort_weight_update_async(rig.engine)
        assert dropped is not None
        # The waiting call ended before the abort returned, with its reason.
        assert waiting.done()
        with pytest.raises(WeightUpdateError, match="aborted by abort_weight_update"):
            waiting.result()
        state = await rig.staging()
        assert state == {"held": False, "busy": True, "kept": False}, state
        # The read of the aborted update still waits: no new update may stage
        # (it would share the staging thread and, over gloo, the stream).
        with pytest.raises(WeightUpdateError, match="still runs an aborted update"):
            await rig.engine.start_weight_update()
        assert not rig.txn.is_open and not await rig.engine.is_paused()

    try:
        rig.run(scenario())
        # The sender recovers: the header of a valid update arrives. The aborted
        # work reads it, then stops at its next check, before reading a tensor.
        os.write(writer[0], _header_bytes(Path(rig.b) / "model.safetensors"))
    finally:
        for fd in writer:
            os.close(fd)
    rig.run(rig.until(lambda: _idle(rig)))
    rig.run(rig.update(rig.b))
    assert rig.run(rig.greedy()) != rig.fresh_a
    rig.run(rig.update(rig.a))
    assert rig.run(rig.greedy()) == rig.fresh_a


def _header_bytes(file: Path) -> bytes:
    raw = file.read_bytes()
    return raw[:8 + int.from_bytes(raw[:8], "little")]


async def _idle(rig: Rig) -> bool:
    return not (await rig.staging())["busy"]


def test_pause_resume_and_label_refused_while_an_update_is_open(rig):
    from vllm_rl_compat.weights.frontend.native import abort_weight_update_async

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
    """A slow output handler (while the update runs, every batch of outputs
    waits 0.05 s before it reaches its stream) cannot make a commit's reply
    overtake older outputs: no output of the old version is delivered after
    the update returns."""
    from vllm import SamplingParams

    from vllm_rl_compat.weight_sync import AsyncWeightSync

    engine = rig.engine
    delivered: list[tuple[float, str | None]] = []
    slow = [False]
    original_get = engine.engine_core.get_output_async
    original_process = engine.output_processor.process_outputs

    async def slow_get() -> Any:
        outputs = await original_get()
        if slow[0]:
            await asyncio.sleep(0.05)
        return outputs

    def process(*args: Any, **kwargs: Any) -> Any:
        result = original_process(*args, **kwargs)
        delivered.append((time.monotonic(), kwargs.get("weight_version")))
        return result

    async def scenario() -> None:
        sync = await AsyncWeightSync.create(engine)
        old = await engine.get_weight_version()
        params = SamplingParams(max_tokens=4000, ignore_eos=True, temperature=1.0)
        seen: list[int] = []

        async def consume() -> None:
            async for out in engine.generate("across a slow handler:", params, "slow"):
                seen.append(len(out.outputs[0].token_ids))

        task = asyncio.ensure_future(consume())
        try:
            await rig.until(lambda: _true_if(bool(seen)))
            slow[0] = True
            await sync.update_from_files(rig.b)
            returned = time.monotonic()
            slow[0] = False
            await rig.until(lambda: _true_if(any(v != old for _, v in delivered)))
            assert not task.done()  # the request ran across the commit
            stale = [t for t, v in delivered if v == old and t > returned]
            assert not stale, f"{len(stale)} outputs of version {old} delivered after the commit"
        finally:
            slow[0] = False
            await engine.abort("slow")
            await asyncio.gather(task, return_exceptions=True)
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

    from vllm_rl_compat.weights.worker.backends import _Overlap
    from vllm_rl_compat.weights.worker.staging import Cancelled, StagingJob

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


def test_a_parameter_no_update_tensor_writes_is_found():
    """Coverage: after a complete update loaded into a fresh shadow, a
    parameter the loader never wrote is named (it would be swapped in
    uninitialised); a written one, even partly (zeroed padding), is not."""
    from types import SimpleNamespace

    import torch

    from vllm_rl_compat.weights.worker import staging

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.Parameter(torch.ones(4), requires_grad=False)
            self.emb = torch.nn.Parameter(torch.ones(5, 4), requires_grad=False)
            self.extra = torch.nn.Parameter(torch.ones(3), requires_grad=False)

        def load_weights(self, items: Any) -> None:
            for name, tensor in items:
                if name == "norm":
                    self.norm.data.copy_(tensor)
                else:  # four real rows, a zeroed padding row, like vLLM's vocab loader
                    self.emb.data[:4].copy_(tensor)
                    self.emb.data[4:].fill_(0)

    model = Model()
    stage = staging.build(model, SimpleNamespace(packed=[], kept=[], embeddings=[]))
    stage.poison()
    stage.load([("norm", torch.zeros(4)), ("emb", torch.zeros(4, 4))])
    assert stage.unwritten() == ["extra"]
    assert torch.equal(model.extra, torch.ones(3))  # the live model was never touched


def _framework_update_weight(worker: Any, name: str, values: list[float]) -> None:
    """What RL frameworks' vLLM worker extensions run after receiving a tensor:
    OpenRLHF ``openrlhf/trainer/ray/vllm_worker_wrap.py`` (``WorkerWrap.update_weight``),
    TRL ``trl/scripts/vllm_serve.py`` (``WeightSyncWorkerExtension.update_named_param``),
    PipelineRL ``pipelinerl/vllm1.py`` (``WorkerExtension.receive_weight_update``):
    ``self.model_runner.model.load_weights(weights=[(name, weight)])``. TRL's
    colocate mode (``trl/generation/vllm_generation.py``, ``sync_weights``)
    calls the same method on the same object, reached through
    ``llm.llm_engine.model_executor.driver_worker.worker.model_runner.model``."""
    import torch

    weight = torch.tensor(values, dtype=torch.bfloat16)  # as received from the trainer
    worker.model_runner.model.load_weights(weights=[(name, weight)])


def test_frameworks_loading_weights_directly_fail_naming_the_route(rig):
    """RL mode cannot keep the engine consistent behind such a call (the
    version label lives in the engine core, the fp32 head and packed copies
    in our apply), so it refuses it and names the supported route; nothing
    changes."""
    from safetensors.torch import load_file

    state = load_file(str(Path(rig.b) / "model.safetensors"))
    name = "model.norm.weight"
    with pytest.raises(Exception, match="load_weights called outside a weight-update") as err:
        rig.run(rig.engine.collective_rpc(_framework_update_weight,
                                          args=(name, state[name].float().tolist())))
    assert "start_weight_update" in str(err.value)
    assert rig.run(rig.greedy()) == rig.fresh_a
    rig.run(rig.update(rig.b))  # the supported route still works (its load runs in a step)
    assert rig.run(rig.greedy()) != rig.fresh_a
    rig.run(rig.update(rig.a))
    assert rig.run(rig.greedy()) == rig.fresh_a


def test_model_based_interleavings(rig, tmp_path_factory):
    """Random sequences of start / update (A, B or a bad tensor) / finish /
    abort / pause / resume / a version label, checked after every step
    against a model of what must hold: the served weights are exactly the
    last committed ones (greedy tokens equal that model's fresh ones), the
    version counts the commits, an update is open exactly when the model says,
    nothing is held for staging when none is, generation is paused only by the caller,
    and each call's answer (success or which error) is the model's.
    Bounded (8 sequences of up to 10 steps, derandomised: the same sequences
    every run; a failing one is printed as the steps to replay)."""
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import (
        RuleBasedStateMachine,
        invariant,
        rule,
        run_state_machine_as_test,
    )
    from safetensors.torch import load_file, save_file
    from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

    from vllm_rl_compat.weights.frontend.native import abort_weight_update_async

    bad = tmp_path_factory.mktemp("bad")
    state = load_file(str(Path(rig.b) / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"][:3].clone()
    save_file(state, str(bad / "model.safetensors"))
    paths = {"a": rig.a, "b": rig.b, "bad": str(bad)}
    engine = rig.engine
    fresh_b = rig.run(_fresh_greedy(rig, rig.b))
    refs = {"a": rig.fresh_a, "b": fresh_b}
    rig.run(rig.update(rig.a))  # a known start: A, integer label

    class Updates(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.live = "a"
            self.version = int(rig.run(engine.get_weight_version()))
            self.open = False
            self.chunk: str | None = None
            self.paused = False

        def expect(self, coro: Any, error: type[BaseException] | None,
                   match: str = "") -> Any:
            if error is None:
                return rig.run(coro)
            with pytest.raises(error, match=match):
                rig.run(coro)

        @rule()
        def start(self) -> None:
            if self.open:
                self.expect(engine.start_weight_update(), TransactionStateError, "in progress")
                return
            self.expect(engine.start_weight_update(), None)  # paused by the caller or not
            self.open, self.chunk = True, None

        @rule(which=st.sampled_from(["a", "b", "bad"]))
        def update(self, which: str) -> None:
            call = engine.update_weights(WeightTransferUpdateRequest(
                {"source": "files", "path": paths[which]}))
            if not self.open:
                self.expect(call, TransactionStateError, "no weight update is in progress")
            elif which == "bad":
                self.expect(call, WeightUpdateError, "model unchanged")
                self.open = False
            elif self.chunk is not None:  # every name a second time
                self.expect(call, WeightUpdateError, "model unchanged")
                self.open = False
            else:
                self.expect(call, None)
                self.chunk = which

        @rule()
        def finish(self) -> None:
            call = engine.finish_weight_update()
            if not self.open:
                self.expect(call, TransactionStateError, "no weight update is in progress")
            elif self.chunk is None:  # nothing sent: incomplete
                self.expect(call, WeightUpdateError, "model unchanged")
                self.open = False
            else:
                self.expect(call, None)
                self.live, self.version, self.open = self.chunk, self.version + 1, False

        @rule()
        def abort(self) -> None:
            dropped = rig.run(abort_weight_update_async(engine))
            assert (dropped is not None) == self.open
            self.open = False

        @rule()
        def pause_or_resume(self) -> None:
            call = (engine.resume_generation() if self.paused else
                    engine.pause_generation(mode="keep", clear_cache=False))
            if self.open:
                self.expect(call, TransactionStateError, "in progress")
            else:
                self.expect(call, None)
                self.paused = not self.paused

        @rule()
        def relabel(self) -> None:
            call = engine.update_weight_version(str(self.version))  # the same label
            self.expect(call, TransactionStateError if self.open else None, "in progress")

        @invariant()
        def holds(self) -> None:
            assert rig.txn.is_open == self.open
            assert rig.run(engine.is_paused()) == self.paused
            assert rig.run(engine.get_weight_version()) == str(self.version)
            staging = rig.run(rig.staging())
            assert self.open or not staging["held"], staging
            if not self.paused:
                assert rig.run(rig.greedy()) == refs[self.live]

        def teardown(self) -> None:
            if self.open:
                rig.run(abort_weight_update_async(engine))
            if self.paused:
                rig.run(engine.resume_generation())
            if self.live != "a":
                rig.run(rig.update(rig.a))

    run_state_machine_as_test(Updates, settings=settings(
        max_examples=8, stateful_step_count=10, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))


async def _fresh_greedy(rig: Rig, path: str) -> list[int]:
    """Greedy tokens of ``path``'s weights, loaded through an update (the
    exactness of an update against a fresh engine is ``test_weight_sync``'s)."""
    await rig.update(path)
    return await rig.greedy()


class _RecordingPort:
    """An ``LLMPort`` of two workers that disagree at start: rank 0 can stage
    beside its weights, rank 1 cannot (memory). Records every operation."""

    def __init__(self) -> None:
        self.ops: list[str] = []

    def rpc(self, kwargs: dict[str, Any]) -> list[Any]:
        self.ops.append(kwargs["step"])
        if kwargs["step"] == "start":
            return [{"overlapped": True, "weight_bytes": 2**30},
                    {"overlapped": False, "why": "memory", "weight_bytes": 2**30}]
        return [{"rank": 0}, {"rank": 1}] if kwargs["step"] == "finish" else [None, None]

    def pause(self) -> None:
        self.ops.append("pause")

    def resume(self) -> None:
        self.ops.append("resume")

    def is_paused(self) -> bool:
        return False

    def can_commit(self) -> bool:
        return False

    def get_version(self) -> str:
        return "0"

    def set_version(self, label: str) -> None:
        self.ops.append(f"label {label}")


def test_ranks_that_disagree_on_staging_all_stage_in_the_pause(monkeypatch):
    """The collective decision: one rank that cannot stage overlapped makes
    every rank stage in the pause (``in_pause`` before any chunk), so all
    apply the same way in the same pause; the lease is sized from the
    workers' weight bytes (120 s + 60 s per GiB)."""
    from types import SimpleNamespace

    from vllm_rl_compat.weights.frontend.drive import run
    from vllm_rl_compat.weights.frontend.transaction import Transaction

    monkeypatch.setenv("VLLM_RL_COMPAT_TXN_SECRET", "test-secret")
    monkeypatch.delenv("VLLM_RL_COMPAT_WEIGHT_UPDATE_LEASE_S", raising=False)
    txn = Transaction(SimpleNamespace(additional_config={}, weight_transfer_config=SimpleNamespace(
        backend="rl_compat_files")))
    port = _RecordingPort()
    run(txn.start({"staging": "auto"}), port, txn)
    assert port.ops == ["start", "in_pause", "pause"] and not txn.overlapped
    assert txn.lease == 180.0
    run(txn.update({"source": "files", "path": "x"}), port, txn)
    assert run(txn.finish(None, True), port, txn) == 1
    assert port.ops[3:] == ["update:1", "check", "finish", "label 1", "resume"], port.ops
