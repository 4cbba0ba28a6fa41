"""The NCCL side of the trainer broadcast, as far as it runs without a GPU.

No engine and no GPU: the CPU deadline that bounds every NCCL collective
(``wait_for_event``, with stand-in events), the group's abort on that
deadline (a stand-in communicator), the GPU-memory check and host staging
of ``receive_update`` (a stand-in group), and the group ranks of vLLM
workers with data parallelism (vLLM's real ``ParallelConfig``).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch

from vllm_rl_compat.weights.protocol import broadcast as bc


# ------------------------------------------------------------ deadline wait
class _Event:
    """Completes after ``polls`` queries (never, if ``None``)."""

    def __init__(self, polls: int | None) -> None:
        self.polls = polls
        self.queries = 0

    def query(self) -> bool:
        self.queries += 1
        return self.polls is not None and self.queries > self.polls


class _Clock:
    """Fake time: ``sleep`` advances it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def test_wait_returns_when_the_event_completes() -> None:
    ev = _Event(0)
    bc.wait_for_event(ev, 5.0, "unused")
    assert ev.queries == 1

    ev, fake = _Event(30), _Clock()
    bc.wait_for_event(ev, 5.0, "unused", clock=fake.clock, sleep=fake.sleep)
    assert ev.queries == 31 and len(fake.sleeps) == 30
    assert max(fake.sleeps) <= bc._POLL_MAX  # polls back off, but stay short
    assert fake.now - 100.0 < 0.05


def test_wait_raises_at_the_deadline_with_fake_time() -> None:
    ev, fake = _Event(None), _Clock()
    with pytest.raises(bc.BroadcastError) as info:
        bc.wait_for_event(ev, 2.5, "the trainer (rank 0) did not send in time",
                          clock=fake.clock, sleep=fake.sleep)
    assert str(info.value) == ("weight broadcast timed out after 2.5 s: "
                               "the trainer (rank 0) did not send in time")
    assert fake.now == pytest.approx(102.5)  # never sleeps past the deadline


def test_wait_raises_within_the_deadline_in_real_time() -> None:
    ev = _Event(None)
    start = time.monotonic()
    with pytest.raises(bc.BroadcastError, match="timed out after 0.2 s: late"):
        bc.wait_for_event(ev, 0.2, "late")
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 5.0, elapsed  # bounded (a loaded 2-core CI may oversleep)
    assert ev.queries > 10  # it polled, it did not block in one call


# ------------------------------------------ a CUDA group reaching its deadline
class _Work:
    def wait(self) -> bool:  # NCCL: only orders the stream; returns at once
        return True


class _NeverDone:
    """Stands in for ``torch.cuda.Event`` on a stream stuck behind NCCL."""

    def record(self) -> None:
        pass

    def query(self) -> bool:
        return False


class _StuckPG:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> _Work:
        self.calls.append("broadcast")
        return _Work()

    def abort(self) -> None:
        self.calls.append("abort")


def test_cuda_group_aborts_and_raises_at_its_deadline(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    monkeypatch.setattr(torch.cuda, "Event", _NeverDone)
    pg = _StuckPG()
    g = bc.Group(store=None, pg=pg, rank=2, world_size=3,
                 device=torch.device("cuda", 0), timeout=0.2)
    start = time.monotonic()
    with pytest.raises(bc.BroadcastError) as info:
        g.broadcast(torch.empty(64, dtype=torch.uint8), 0)
    assert time.monotonic() - start < 5.0  # bounded, not NCCL's watchdog minutes
    assert str(info.value) == (
        "weight broadcast timed out after 0.2 s: the trainer (rank 0) did not send in "
        "time (a 64-byte broadcast from rank 0; or a member of the group died); the "
        "NCCL communicator was aborted, reconnect the trainer")
    assert pg.calls == ["broadcast", "abort"]
    with pytest.raises(bc.BroadcastError, match="closed .*reconnect the trainer"):
        g.allreduce_min(1)  # the aborted group is never used again
    g.close()  # and closing it does not touch the aborted communicator
    assert pg.calls == ["broadcast", "abort"]


# --------------------------------------------------- staging through a bounce
def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"a.weight": torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
            "b.bias": torch.randn(13, generator=g),
            "c.empty": torch.empty(0, 4)}


def _stream(sd: dict[str, torch.Tensor]) -> tuple[list[list[Any]], bytes]:
    """The header's tensor list and the data stream the trainer would send."""
    entries = [(n, tuple(t.shape), t.dtype) for n, t in sd.items()]
    offsets, total = bc._layout(entries)
    data = bytearray(total)
    for t, start in zip(sd.values(), offsets):
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        data[start:start + len(raw)] = raw
    return [[n, list(s), bc._dtype_name(d)] for n, s, d in entries], bytes(data)


class _FakeCudaGroup:
    """Receiver rank 1 of 2 on a 'CUDA' group; the trainer's side is scripted."""

    def __init__(self, header: dict[str, Any], data: bytes) -> None:
        self.rank, self.world_size, self.timeout = 1, 2, 5.0
        self.device = torch.device("cuda", 0)
        self.header, self.data, self.pos = json.dumps(header).encode(), data, 0
        self.filled: list[tuple[int, int]] = []  # (data_ptr, bytes) per data chunk
        self.sent_errors: list[bytes] = []

    def broadcast_bytes(self, data: bytes | None, root: int, max_bytes: int = 0) -> bytes:
        if root == 0:
            return self.header
        self.sent_errors.append(data)  # this receiver's rejection, to everyone
        return data

    def allreduce_min(self, value: int) -> int:
        return value  # the trainer always agrees

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        n = tensor.numel()
        tensor.copy_(torch.frombuffer(bytearray(self.data[self.pos:self.pos + n]),
                                      dtype=torch.uint8))
        self.pos += n
        self.filled.append((tensor.data_ptr(), n))


def test_nccl_receive_stages_every_chunk_on_the_host(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    sd = _state_dict()
    tensors, data = _stream(sd)
    header = {"protocol": bc.PROTOCOL_VERSION, "total_bytes": len(data),
              "chunk_bytes": 48, "tensors": tensors}
    bounces: list[torch.Tensor] = []

    def bounce(device: torch.device, nbytes: int) -> torch.Tensor:
        assert device.type == "cuda"
        bounces.append(torch.full((nbytes,), 0xAB, dtype=torch.uint8))  # CPU stand-in
        return bounces[-1]

    monkeypatch.setattr(bc, "_bounce_buffer", bounce)
    group = _FakeCudaGroup(header, data)
    items = bc.receive_update(group, lambda entries: list(entries))

    assert [b.numel() for b in bounces] == [48]  # one chunk-sized buffer per update
    base = bounces[0].data_ptr()
    assert all(ptr == base for ptr, _ in group.filled)  # every chunk went through it
    assert sum(n for _, n in group.filled) == len(data) == group.pos
    assert [n for n, _ in items] == list(sd)
    for (name, got), want in zip(items, sd.values()):
        assert got.device.type == "cpu"  # the apply step gets host tensors
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


def test_nccl_receive_without_gpu_memory_rejects_clearly(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    sd = _state_dict()
    tensors, data = _stream(sd)
    header = {"protocol": bc.PROTOCOL_VERSION, "total_bytes": len(data),
              "chunk_bytes": 1 << 20, "tensors": tensors}
    monkeypatch.setattr(bc, "_gpu_free_bytes", lambda device: 100)
    group = _FakeCudaGroup(header, data)
    need = len(data)  # the chunk is capped at the update's size
    with pytest.raises(bc.BroadcastError) as info:
        bc.receive_update(group, lambda entries: list(entries))
    text = str(info.value)
    assert text.startswith("weight update rejected by receiver rank 1: ")
    assert (f"needs {need} bytes (0.0 MiB) of free GPU memory on cuda:0 for its bounce "
            "buffer (one chunk), but only 100 bytes (0.0 MiB) are free") in text
    assert group.sent_errors and group.filled == []  # told everyone, received nothing


def test_check_bounce_fits() -> None:
    bc.check_bounce_fits("cuda:0", 64 << 20, 64 << 20)
    with pytest.raises(bc.BroadcastError,
                       match=r"needs 67108864 bytes \(64.0 MiB\) .* on cuda:1 .* only "
                             r"1048576 bytes \(1.0 MiB\) are free; send with a smaller "
                             r"chunk_bytes"):
        bc.check_bounce_fits("cuda:1", 64 << 20, 1 << 20)


# ------------------------------------------------------------------- ranks
@pytest.mark.parametrize("offset,dp_index,world,rank,want", [
    (1, 0, 1, 0, 1),     # one engine, one worker
    (1, 0, 4, 3, 4),     # TP*PP = 4, last worker of engine 0
    (1, 1, 4, 0, 5),     # engine 1 starts right after engine 0
    (1, 1, 4, 3, 8),
    (1, 3, 2, 1, 8),     # DP = 4, TP = 2: ranks 1..8
    (3, 2, 2, 0, 7),     # another trainer-side layout (offset 3)
])
def test_group_rank_table(offset: int, dp_index: int, world: int, rank: int,
                          want: int) -> None:
    assert bc.group_rank(offset, dp_index, world, rank) == want


@pytest.mark.parametrize("args", [(1, 0, 4, 4), (1, 0, 0, 0), (1, -1, 4, 0),
                                  (1, 0, 4, -1), (1, 0, 4, True), (1, 0.0, 4, 0)])
def test_group_rank_refuses_nonsense(args: tuple) -> None:
    with pytest.raises(ValueError):
        bc.group_rank(*args)


def test_join_refuses_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="every worker of every data-parallel engine"):
        bc.join_group("127.0.0.1", 1, rank=5, world_size=5, timeout=1, secret="s")


def test_worker_ranks_with_data_parallel_are_distinct_and_dense(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.config import ParallelConfig

    from vllm_rl_compat.weights.worker.backends import worker_group_rank

    dp, tp, pp = 2, 2, 2
    ranks = []
    for dp_rank in range(dp):
        for worker in range(tp * pp):
            pc = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                data_parallel_size=dp, data_parallel_rank=dp_rank)
            pc.rank = worker  # what vLLM's WorkerBase sets
            # A dense model's engines run as independent DP=1 engines: vLLM
            # resets data_parallel_rank to 0, data_parallel_index keeps it.
            pc.reconfigure_for_independent_dp_rank()
            assert (pc.world_size, pc.data_parallel_rank, pc.data_parallel_size) == (4, 0, 1)
            ranks.append(worker_group_rank(pc, 1))
    assert ranks == list(range(1, 1 + dp * tp * pp))  # trainer is 0; world 1 + 8

    # external_launcher: world_size already counts every DP rank, rank is global
    monkeypatch.setenv("RANK", "3")
    pc = ParallelConfig(tensor_parallel_size=2, data_parallel_size=2,
                        distributed_executor_backend="external_launcher")
    pc.rank = 3
    assert (pc.world_size, pc.data_parallel_index) == (4, 1)
    assert worker_group_rank(pc, 1) == 4


def test_front_end_counts_every_worker_of_every_dp_engine(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's world size the front end hands out (``1 + receivers``)
    holds every worker rank above: vLLM's DP client answers a
    ``collective_rpc`` from the first engine only, so it is read from config."""
    from types import SimpleNamespace

    from vllm.config import ParallelConfig

    from vllm_rl_compat.weights.frontend.sync import receiver_count

    pc = ParallelConfig(tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2)
    assert receiver_count(SimpleNamespace(parallel_config=pc)) == 8
    assert receiver_count(SimpleNamespace(parallel_config=ParallelConfig())) == 1
    monkeypatch.setenv("RANK", "0")
    pc = ParallelConfig(tensor_parallel_size=2, data_parallel_size=2,
                        distributed_executor_backend="external_launcher")
    assert receiver_count(SimpleNamespace(parallel_config=pc)) == 4
