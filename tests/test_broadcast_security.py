"""Security of the trainer -> engine weight broadcast (no vLLM engine needed).

Every rank runs in its own spawned process (gloo groups that time out can
leave threads stuck in a shared process), so each test exercises the real
store, sockets and process group.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import queue
import socket
from typing import Any, Callable

import pytest
import torch

from vllm_rl_compat.weights.protocol import broadcast as bc

HOST = "127.0.0.1"
SECRET = "s3cret-for-tests-" + "a" * 32
_STARTUP = 120.0  # seconds for the spawned ranks to import torch


# ----------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _state_dict() -> dict[str, torch.Tensor]:
    """Odd shapes and mixed dtypes, so alignment padding is exercised."""
    g = torch.Generator().manual_seed(1234)
    return {
        "a.weight": torch.randn(3, 5, 7, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(13, generator=g),
        "c.scalar": torch.randn((), generator=g),
        "d.weight": torch.randn(1, 33, generator=g).to(torch.bfloat16),
        "e.empty": torch.empty(0, 4),
    }


def _accept(entries: Any) -> None:
    list(entries)


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _entry(rank: int, out: Any, ready: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        # Start together: on a busy machine importing torch can take longer
        # than the protocol timeouts under test.
        ready.wait(timeout=_STARTUP)
        out.put((rank, "ok", fn(*args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, type(exc).__name__, str(exc)))


def _run(targets: list[tuple[Callable[..., Any], tuple]], limit: float = 20.0
         ) -> list[tuple[str, Any]]:
    """Run ``fn(*args)`` per rank in spawned processes; ``(status, value)`` each.

    ``limit`` bounds the ranks' work after they all started (the protocol
    timeouts used here are 3-5 s, so it only catches hangs).
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ready = ctx.Barrier(len(targets))
    procs = [ctx.Process(target=_entry, args=(i, out, ready, fn, args), daemon=True)
             for i, (fn, args) in enumerate(targets)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    try:
        while len(results) < len(procs):
            rank, status, value = out.get(timeout=limit + (_STARTUP if not results else 0))
            results[rank] = (status, value)
    except queue.Empty:
        pytest.fail(f"ranks {sorted(set(range(len(procs))) - set(results))} "
                    f"did not finish within {limit} s")
    finally:
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
    return [results[i] for i in range(len(procs))]


# ------------------------------------------------------- per-rank bodies
def _trainer_send(port: int, receivers: int, secret: str, timeout: float) -> str:
    b = bc.TrainerBroadcaster(HOST, port, receivers, secret=secret, timeout=timeout,
                              chunk_bytes=100)  # small chunks: many data broadcasts
    try:
        b.send(_state_dict())
    finally:
        b.close()
    return "sent"


def _receiver(port: int, rank: int, world: int, secret: str, timeout: float
              ) -> dict[str, tuple[str, list[int], bytes]]:
    g = bc.join_group(HOST, port, rank=rank, world_size=world, timeout=timeout,
                      secret=secret)
    try:
        items = bc.receive_update(g, _accept)
    finally:
        g.close()
    return {n: (str(t.dtype), list(t.shape), _as_bytes(t)) for n, t in items}


def _joiner(port: int, rank: int, world: int, secret: str, timeout: float) -> str:
    bc.join_group(HOST, port, rank=rank, world_size=world, timeout=timeout,
                  secret=secret).close()
    return "joined"


def _impostor(port: int, rank: int, world: int, timeout: float) -> str:
    """Right store prefix (e.g. read from the store's key names), wrong secret."""
    g = bc._join(HOST, port, rank=rank, world_size=world, timeout=timeout,
                 backend="gloo", prefix=bc._store_prefix(SECRET))
    try:
        bc._challenge(g, "a-guess")
    finally:
        g.close()
    return "passed the challenge"


def _fake_trainer(port: int, headers: list[Any]) -> list[str]:
    """Holds the secret but sends absurd headers; returns each verdict's error."""
    g = bc.join_group(HOST, port, rank=0, world_size=2, timeout=5, secret=SECRET)
    errors = []
    for header in headers:
        g.broadcast_bytes(json.dumps(header).encode(), root=0)
        try:
            bc._agree(g, None)
            errors.append("accepted")
        except bc.BroadcastError as exc:
            errors.append(str(exc))
    g.close()
    return errors


def _picky_receiver(port: int, count: int) -> tuple[list[str], int]:
    """Receives ``count`` headers; returns errors and the largest allocation."""
    sizes = []
    real_empty = torch.empty

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        sizes.append(int(args[0]) if args and isinstance(args[0], int) else 0)
        return real_empty(*args, **kwargs)

    torch.empty = spy  # this process only
    g = bc.join_group(HOST, port, rank=1, world_size=2, timeout=5, secret=SECRET)
    errors = []
    for _ in range(count):
        try:
            bc.receive_update(g, _accept)
            errors.append("accepted")
        except bc.BroadcastError as exc:
            errors.append(str(exc))
    g.close()
    return errors, max(sizes, default=0)


def _oversized_header_trainer(port: int) -> str:
    g = bc.join_group(HOST, port, rank=0, world_size=2, timeout=5, secret=SECRET)
    g.broadcast(torch.tensor([1 << 40], dtype=torch.int64), 0)  # length only
    g.close()
    return "sent length"


# ------------------------------------------------------------------- tests
def test_same_secret_update_arrives_bit_identical() -> None:
    port = _free_port()
    res = _run([(_trainer_send, (port, 2, SECRET, 5.0)),
                (_receiver, (port, 1, 3, SECRET, 5.0)),
                (_receiver, (port, 2, 3, SECRET, 5.0))])
    assert res[0] == ("ok", "sent")
    expected = {n: (str(t.dtype), list(t.shape), _as_bytes(t))
                for n, t in _state_dict().items()}
    for status, got in res[1:]:
        assert status == "ok", got
        assert list(got) == list(expected)
        assert got == expected


def test_wrong_secret_cannot_join() -> None:
    port = _free_port()
    res = _run([(_joiner, (port, 0, 2, SECRET, 3.0)),
                (_joiner, (port, 1, 2, "another-secret", 3.0))])
    for status, text in res:
        assert status == "BroadcastError", text
        assert "could not form the weight broadcast group" in text
        assert SECRET not in text and "another-secret" not in text


def test_right_prefix_wrong_mac_fails_everywhere() -> None:
    port = _free_port()
    res = _run([(_joiner, (port, 0, 3, SECRET, 5.0)),
                (_joiner, (port, 1, 3, SECRET, 5.0)),
                (_impostor, (port, 2, 3, 5.0))])
    for status, text in res:
        assert status == "BroadcastError", text
        assert text == ("a peer that does not hold the secret joined the weight "
                        "broadcast group (rank 2); nothing was sent")


def _layout_total(tensors: list[list[Any]]) -> int:
    entries = [(n, tuple(s), getattr(torch, d)) for n, s, d in tensors]
    return bc._layout(entries)[1]


def test_absurd_headers_are_refused_before_allocation() -> None:
    tensors = [["w", [4, 3], "float32"], ["b", [5], "bfloat16"]]
    total = _layout_total(tensors)
    assert total == 64 + 10

    def header(**over: Any) -> dict[str, Any]:
        h = {"protocol": bc.PROTOCOL_VERSION, "total_bytes": total, "chunk_bytes": 16,
             "tensors": tensors}
        h.update(over)
        return {k: v for k, v in h.items() if v is not None}

    headers = [header(total_bytes=1 << 50), header(chunk_bytes=0),
               header(chunk_bytes=-8), header(chunk_bytes="16"),
               header(total_bytes=None), header(total_bytes=True),
               header(tensors=[["w", [-4, 3], "float32"]]), header(tensors=[["w", [4], "os"]]),
               ["not", "a", "dict"]]
    port = _free_port()
    (ts, terr), (rs, (rerr, biggest)) = _run(
        [(_fake_trainer, (port, headers)), (_picky_receiver, (port, len(headers)))])
    assert ts == "ok" and rs == "ok", (terr, rerr)
    assert terr == rerr  # the fake trainer hears each refusal through the verdict
    wants = [f"claims total_bytes={1 << 50}, but its tensors take {total} bytes",
             "chunk_bytes=0; it must be positive", "chunk_bytes=-8; it must be positive",
             "'chunk_bytes' must be an int, got '16'",
             "'total_bytes' must be an int, got None", "'total_bytes' must be an int, got True",
             "malformed tensor entry ['w', [-4, 3], 'float32']", "unknown dtype 'os'",
             "not a JSON object"]
    for err, want in zip(rerr, wants):
        assert err.startswith("weight update rejected by receiver rank 1: "), err
        assert want in err
    assert biggest < 4096  # only the headers themselves were ever allocated


def test_oversized_header_length_is_refused() -> None:
    port = _free_port()
    (ts, tval), (rs, (rerr, biggest)) = _run(
        [(_oversized_header_trainer, (port,)), (_picky_receiver, (port, 1))])
    assert ts == "ok", tval
    assert rs == "ok", rerr
    assert rerr == [f"refusing a {1 << 40}-byte message from rank 0 "
                    f"(limit {bc.MAX_HEADER_BYTES} bytes)"]
    assert biggest < 4096


def _other_ipv4() -> str | None:
    """This machine's outbound IPv4 address (no packet is sent), if not loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        addr = s.getsockname()[0]
    return None if addr.startswith("127.") else addr


def test_bind_address_limits_the_listener() -> None:
    port = _free_port()
    b = bc.TrainerBroadcaster(HOST, port, 0, secret=SECRET, timeout=5,
                              bind_address="127.0.0.1")
    try:
        sock = b.group.listen_socket
        assert sock is not None
        assert sock.getsockname() == ("127.0.0.1", port)
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        other = _other_ipv4()
        if other is not None:
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
        b.send({"x": torch.arange(6, dtype=torch.float32)})  # a group of one works
    finally:
        b.close()
    assert b.group.listen_socket is None


def test_oversized_message_refused_by_its_sender_too() -> None:
    port = _free_port()
    g = bc.join_group(HOST, port, rank=0, world_size=1, timeout=5, secret=SECRET)
    try:
        with pytest.raises(bc.BroadcastError, match="refusing a 11-byte message"):
            g.broadcast_bytes(b"x" * 11, root=0, max_bytes=10)
        assert g.broadcast_bytes(b"x" * 10, root=0, max_bytes=10) == b"x" * 10
    finally:
        g.close()


@pytest.mark.parametrize("secret", ["", None, b"bytes"])
def test_secret_is_required(secret: Any) -> None:
    with pytest.raises(ValueError, match="secret"):
        bc.join_group(HOST, 1, rank=0, world_size=1, secret=secret)
    with pytest.raises(ValueError, match="secret"):
        bc.TrainerBroadcaster(HOST, 1, 0, secret=secret)


def test_new_secret_and_store_prefix() -> None:
    a, b = bc.new_secret(), bc.new_secret()
    assert a != b and len(a) == 64 and int(a, 16) >= 0
    prefix = bc._store_prefix(a)
    assert a not in prefix and a[:16] not in prefix
    assert prefix == bc._store_prefix(a) != bc._store_prefix(b)
    assert len(prefix.rsplit("/", 1)[1]) == 32
