"""Weight broadcast from a separate trainer process (torch.distributed style).

The trainer and the engine's workers form their own small process group:
the trainer is rank 0 and every vLLM worker of every data-parallel engine has
one rank after it (``group_rank``: ``1 + dp_index * tp_pp_size + worker
rank``), so the group's world size is ``1 + data_parallel_size *
tensor_parallel_size * pipeline_parallel_size`` (times the prefill-context
parallel size, if used). The group is built from a ``TCPStore`` (hosted by the
trainer) and a ``ProcessGroupGloo`` constructed directly
(``ProcessGroupNCCL`` for ``backend="nccl"``), so it never touches
``torch.distributed``'s default group or vLLM's own groups inside the worker.
Every operation is bounded by the group's ``timeout``: gloo's own timeout, and
for NCCL (whose ``wait()`` only orders the CUDA stream) a CPU-side deadline
per collective (``wait_for_event``) after which the communicator is aborted
and ``BroadcastError`` raised, before NCCL's watchdog would end the process.
(Not bounded by us: NCCL's communicator set-up inside the first collective
of ``join_group``, which waits for every rank in NCCL's own bootstrap.)

All ranks share a ``secret`` (make one with ``new_secret()`` and hand it to
both sides out of band). Forming the group (``join_group`` /
``TrainerBroadcaster``):

1. rendezvous: every rank joins the store under a key prefix derived from the
   secret by a one-way hash, so ranks with different secrets never meet, and
   store key names (which anyone reaching the port can list) do not reveal
   the secret; an all-reduce makes the join a barrier;
2. challenge: rank 0 broadcasts a fresh random nonce, then each rank ``r`` in
   turn broadcasts ``HMAC(secret, nonce || r || label)``; every rank checks
   every other rank's MAC, the group agrees on the verdict (all-reduce) and,
   if any MAC was wrong, every rank raises ``BroadcastError`` and closes the
   group before any weight metadata or data has been sent.

Protocol of one update (``TrainerBroadcaster.send`` / ``receive_update``):

1. metadata: a JSON list of ``[name, shape, dtype]`` plus total bytes and the
   chunk size, broadcast from the trainer; its length is capped
   (``MAX_HEADER_BYTES``) and checked before a buffer is allocated for it;
2. verdict: every receiver checks the metadata's types, validates the tensors
   against its model and requires the total and chunk size to agree with
   them; the group agrees (all-reduce) and, if any receiver rejected it,
   broadcasts that receiver's error text, so the trainer raises the same
   clear error and no tensor data is sent (nor any staging memory allocated);
3. data: the tensors' bytes, laid out back to back, are broadcast in chunks of
   at most ``chunk_bytes``; receivers stage the update in host memory, one
   buffer of the update's total size (gloo writes each chunk straight into
   it; NCCL receives each chunk into one GPU bounce buffer of ``chunk_bytes``
   and copies it to the host before the next chunk). The trainer needs one
   chunk of extra memory (on its GPU for NCCL); each receiver holds the whole
   update (its total bytes) in host memory until it has been applied or
   dropped, and with NCCL one chunk of GPU memory during the transfer (checked
   during the verdict, so a worker without it rejects the update clearly);
4. done: a final all-reduce, so the trainer knows every receiver has all
   bytes.

A failure at any point (timeout, a peer that died) raises on every live side;
receivers drop their staging buffer and the model is untouched.

Security: the trainer's store listens only on ``bind_address`` (default: the
address the workers connect to). A peer without the secret cannot complete
the rendezvous, and one that guesses the store prefix fails the challenge, so
it can neither read the weights nor feed the engine weights; a receiver
allocates no more than its model's size for an update. Not covered: the
traffic is not encrypted or integrity-protected after the challenge (an
on-path attacker can read or alter the weights, or replay an old trainer
MAC), and anyone reaching the port can still disrupt the group (denial of
service). Across hosts, use a private network (or a tunnel). The secret must
be high-entropy (``new_secret()``): the store prefix is a plain hash of it.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger("vllm.rl_compat")

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_BYTES = 64 << 20
DEFAULT_TIMEOUT = 60.0
MAX_HEADER_BYTES = 64 << 20  # a JSON header larger than this is refused unread
_MAX_ERROR_BYTES = 64 << 10
_STORE_PREFIX = "vllm_rl_compat/weights"
_LABEL = b"vllm-rl-compat"
_NONCE_BYTES = 32
_MAC_BYTES = hashlib.sha256().digest_size
# NCCL's watchdog ends the whole process when a collective outlives the
# group's timeout, so its timeout is this much longer than our own deadline.
_NCCL_WATCHDOG_SLACK = 60.0
_POLL_MIN, _POLL_MAX = 20e-6, 1e-3  # seconds between event polls (backs off)


class BroadcastError(RuntimeError):
    """The broadcast failed or was rejected; nothing was applied."""


def new_secret() -> str:
    """A fresh random secret for one trainer <-> engine pairing."""
    return secrets.token_hex(32)


def wait_for_event(event: Any, timeout: float, what: str, *,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> None:
    """Block the CPU until ``event.query()`` is true, at most ``timeout`` seconds.

    ``event`` is anything with ``query() -> bool`` (a ``torch.cuda.Event``
    here). Past the deadline raises ``BroadcastError`` saying ``what`` did
    not arrive in time; the caller cleans up (aborts the communicator).
    """
    deadline = clock() + timeout
    delay = _POLL_MIN
    while not event.query():
        left = deadline - clock()
        if left <= 0:
            raise BroadcastError(f"weight broadcast timed out after {timeout:g} s: {what}")
        sleep(min(delay, left))
        delay = min(delay * 2, _POLL_MAX)


def _abort_pg(pg: Any) -> None:
    """Abort a communicator without its peers (NCCL: in-flight kernels exit).

    ``abort()`` (``ncclCommAbort``), not ``shutdown()``: a shutdown may wait
    for the very collective that is stuck.
    """
    try:
        pg.abort()
    except Exception as exc:  # noqa: BLE001 - say so; the caller raises anyway
        logger.error("could not abort the weight broadcast's NCCL communicator (%s: %s); "
                     "its kernel may hold the GPU stream until NCCL's watchdog ends the "
                     "process", type(exc).__name__, exc)


@dataclass
class Group:
    """A private process group: the store that built it and the group itself.

    ``listen_socket`` (rank 0 only) is the store's listening socket; the store
    serves a duplicate of its descriptor, this object is kept for inspection
    and is closed with the group.

    On a CUDA device every collective waits on the CPU until it completed or
    ``timeout`` passed; then the communicator is aborted (the group is
    unusable afterwards) and ``BroadcastError`` raised.
    """

    store: Any
    pg: Any
    rank: int
    world_size: int
    device: torch.device
    timeout: float
    listen_socket: socket.socket | None = None

    def _live_pg(self) -> Any:
        if self.pg is None:
            raise BroadcastError("the weight broadcast group is closed (or was aborted "
                                 "after a timeout); reconnect the trainer")
        return self.pg

    def _complete(self, work: Any, what: str) -> None:
        """Wait for ``work``; on CUDA with a CPU deadline (see ``wait_for_event``)."""
        work.wait()  # gloo: blocks, bounded by its timeout; NCCL: orders the stream only
        if self.device.type != "cuda":
            return
        event = torch.cuda.Event()
        event.record()  # current stream, now behind the collective
        try:
            wait_for_event(event, self.timeout, what)
        except BroadcastError as exc:
            self.abort()
            raise BroadcastError(f"{exc}; the NCCL communicator was aborted, reconnect "
                                 "the trainer") from None

    def _late(self, root: int | None) -> str:
        """Who kept this rank waiting, for the timeout's message."""
        if root is None:
            return "a member of the weight broadcast group did not take part in time"
        if root == self.rank:
            return "a receiver did not take part in time"
        who = "the trainer (rank 0)" if root == 0 else f"rank {root}"
        return f"{who} did not send in time"

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        work = self._live_pg().broadcast([tensor], opts)
        self._complete(work, f"{self._late(root)} (a {tensor.nbytes}-byte broadcast from "
                             f"rank {root}; or a member of the group died)")

    def allreduce_min(self, value: int) -> int:
        pg = self._live_pg()
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        work = pg.allreduce([t], opts)
        self._complete(work, f"{self._late(None)} (an all-reduce)")
        return int(t.item())

    def broadcast_bytes(self, data: bytes | None, root: int,
                        max_bytes: int = MAX_HEADER_BYTES) -> bytes:
        """Broadcast a byte string; a length over ``max_bytes`` is refused.

        The length goes first, so every rank sees the same length and refuses
        it together, before any rank allocates or sends the payload.
        """
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64,
                            device=self.device)
        self.broadcast(size, root)
        n = int(size.item())
        if not 0 <= n <= max_bytes:
            raise BroadcastError(f"refusing a {n}-byte message from rank {root} "
                                 f"(limit {max_bytes} bytes)")
        if self.rank == root:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        self.broadcast(buf, root)
        return bytes(buf.cpu().numpy()) if self.rank != root else data

    def abort(self) -> None:
        """Abort the communicator (no peer needed); the group cannot be used again."""
        pg, self.pg = self.pg, None
        if pg is not None:
            _abort_pg(pg)

    def close(self) -> None:
        for obj in (self.pg,):
            shutdown = getattr(obj, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception:  # noqa: BLE001 - best effort on a broken group
                    pass
        self.pg = None
        self.store = None
        if self.listen_socket is not None:
            self.listen_socket.close()
            self.listen_socket = None


def _check_secret(secret: Any) -> None:
    # Never echo the value: it may be a real (if mistyped) secret.
    if not isinstance(secret, str) or not secret:
        raise ValueError("secret must be a non-empty str (see new_secret())")


def _store_prefix(secret: str) -> str:
    """Store namespace for ``secret``; key names are public, so only a hash."""
    digest = hashlib.sha256(_LABEL + secret.encode()).hexdigest()[:32]
    return f"{_STORE_PREFIX}/{digest}"


def _listen(bind_address: str, port: int) -> socket.socket:
    """The store's listening socket, bound only where the caller allows."""
    try:
        return socket.create_server((bind_address, port), family=socket.AF_INET,
                                    backlog=128)
    except OSError as exc:
        raise BroadcastError(f"cannot listen on {bind_address}:{port}: {exc}") from exc


def _open_store(host: str, port: int, rank: int, world_size: int,
                td: datetime.timedelta, bind_address: str | None
                ) -> tuple[Any, socket.socket | None]:
    """Rank 0 hosts the store on its own socket; the others connect to it."""
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=td), None
    sock = _listen(host if bind_address is None else bind_address, port)
    # The store takes ownership of (and closes) the descriptor it is given;
    # a duplicate lets ``sock`` live and close independently.
    fd = os.dup(sock.fileno())
    try:
        store = dist.TCPStore(host, sock.getsockname()[1], world_size, is_master=True,
                              timeout=td, wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        sock.close()
        raise
    return store, sock


def _join(host: str, port: int, *, rank: int, world_size: int, timeout: float,
          backend: str, prefix: str, bind_address: str | None = None) -> Group:
    """Form the group under ``prefix`` (no challenge); blocks until all joined."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside the weight broadcast group of "
                         f"world_size={world_size}; the world size must count the trainer "
                         "and every worker of every data-parallel engine (group_rank)")
    td = datetime.timedelta(seconds=timeout)
    sock = None
    try:
        store, sock = _open_store(host, port, rank, world_size, td, bind_address)
        prefixed = dist.PrefixStore(prefix, store)
        if backend == "gloo":
            pg = dist.ProcessGroupGloo(prefixed, rank, world_size, td)
            device = torch.device("cpu")
        else:
            opts = dist.ProcessGroupNCCL.Options()
            # Our CPU deadline (Group._complete) fires first and aborts the
            # communicator; the watchdog would end the process instead.
            opts._timeout = datetime.timedelta(seconds=timeout + _NCCL_WATCHDOG_SLACK)
            pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
            device = torch.device("cuda", torch.cuda.current_device())
        group = Group(store, pg, rank, world_size, device, timeout, sock)
        # Make the join itself a rendezvous: everyone is in before anyone returns.
        group.allreduce_min(0)
    except BroadcastError:  # NCCL: the join's all-reduce missed its deadline
        if sock is not None:
            sock.close()
        raise
    except Exception as exc:
        if sock is not None:
            sock.close()
        raise BroadcastError(
            f"could not form the weight broadcast group as rank {rank} of {world_size} "
            f"within {timeout:g} s (not all ranks joined, or they hold different "
            f"secrets): {type(exc).__name__}: {exc}") from exc
    return group


def _mac(key: bytes, nonce: bytes, rank: int) -> bytes:
    return hmac.new(key, nonce + rank.to_bytes(4, "big") + _LABEL, hashlib.sha256).digest()


def _challenge(group: Group, secret: str) -> None:
    """Prove to each other that every rank holds ``secret``; raise if one does not.

    Knowing the store prefix is not enough (its hash is visible to anyone who
    lists the store's keys), so each rank MACs a fresh nonce bound to its rank.
    """
    key = secret.encode()
    w, me = group.world_size, group.rank
    nonce = group.broadcast_bytes(secrets.token_bytes(_NONCE_BYTES) if me == 0 else None,
                                  root=0, max_bytes=_NONCE_BYTES)
    first_bad = w
    for r in range(w):
        got = group.broadcast_bytes(_mac(key, nonce, r) if r == me else None, root=r,
                                    max_bytes=_MAC_BYTES)
        if r != me and first_bad == w and not hmac.compare_digest(got, _mac(key, nonce, r)):
            first_bad = r
    if group.allreduce_min(0 if first_bad < w else 1) == 1:
        return
    # Name the culprit as the trainer saw it; if the trainer saw none, some
    # receiver could not verify the trainer itself.
    seen = torch.tensor([first_bad], dtype=torch.int64, device=group.device)
    group.broadcast(seen, 0)
    culprit = int(seen.item()) % w
    raise BroadcastError("a peer that does not hold the secret joined the weight "
                         f"broadcast group (rank {culprit}); nothing was sent")


def engine_layout(parallel_config: Any) -> tuple[int, int]:
    """``(dp_index, engines)``: this engine's data-parallel index and how many
    engines' workers the group holds, from vLLM's ``ParallelConfig``. Under
    ``external_launcher`` vLLM's ``world_size`` already spans every
    data-parallel rank and ``rank`` is global: one "engine" of that size."""
    pc = parallel_config
    if pc.distributed_executor_backend == "external_launcher":
        return 0, 1
    return pc.data_parallel_index, pc.data_parallel_size


def group_rank(rank_offset: int, dp_index: int, world_size: int, rank: int) -> int:
    """Group rank of a vLLM worker: ``rank_offset + dp_index * world_size + rank``.

    ``world_size`` is one engine's worker count (vLLM's
    ``ParallelConfig.world_size``: tensor x pipeline x prefill-context
    parallel), ``dp_index`` the engine's data-parallel index
    (``ParallelConfig.data_parallel_index``: vLLM resets
    ``data_parallel_rank`` to 0 in every engine of a dense model, the index
    keeps the engine apart) and ``rank`` the worker's rank in its engine
    (``ParallelConfig.rank``). The trainer's group then has ``rank_offset +
    data_parallel_size * world_size`` ranks (``rank_offset`` is 1: the trainer).
    """
    for name, value in (("rank_offset", rank_offset), ("dp_index", dp_index),
                        ("world_size", world_size), ("rank", rank)):
        if type(value) is not int or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if world_size == 0 or rank >= world_size:
        raise ValueError(f"worker rank {rank} is not below the engine's world size "
                         f"{world_size}")
    return rank_offset + dp_index * world_size + rank


def join_group(host: str, port: int, *, rank: int, world_size: int,
               timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo",
               secret: str, bind_address: str | None = None) -> Group:
    """Join (rank 0: host) the trainer <-> workers group; blocks until all joined.

    Every rank must pass the same ``secret``; the group is only returned once
    every member has proven it holds it. Rank 0 listens on ``bind_address``
    (default ``host``; ``"0.0.0.0"`` for all interfaces); other ranks ignore it.
    ``backend="nccl"`` puts the group on the current CUDA device (engine on
    GPU); receivers still stage updates in host memory (``receive_update``).
    It is written for CUDA but only its CPU-side parts are tested here.
    """
    _check_secret(secret)
    group = _join(host, port, rank=rank, world_size=world_size, timeout=timeout,
                  backend=backend, prefix=_store_prefix(secret), bind_address=bind_address)
    try:
        _challenge(group, secret)
    except BroadcastError:
        group.close()
        raise
    except Exception as exc:
        group.close()
        raise BroadcastError(f"the weight broadcast group's secret check failed: "
                             f"{type(exc).__name__}: {exc}") from exc
    return group


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise BroadcastError(f"unknown dtype {name!r} in broadcast metadata")
    return dtype


class TrainerBroadcaster:
    """Trainer side: host the group and send state dicts to the engine.

    Example (trainer process)::

        from vllm_rl_compat.weights.protocol.broadcast import TrainerBroadcaster, new_secret

        secret = new_secret()  # give it to the engine side out of band
        bc = TrainerBroadcaster("127.0.0.1", 29555, num_receivers=2, secret=secret)
        bc.send({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
        bc.close()

    The engine side must connect with the same host, port and secret at the
    same time as the constructor (each blocks until the other joined), and
    receive at the same time as each ``send``. ``num_receivers`` counts every
    vLLM worker of every data-parallel engine: ``data_parallel_size *
    tensor_parallel_size * pipeline_parallel_size`` (see ``group_rank``).
    With ``backend="nccl"`` the chunk lives on the current CUDA device and each
    chunk's broadcast is bounded by ``timeout`` on the CPU, as on the workers.
    """

    def __init__(self, host: str, port: int, num_receivers: int, *, secret: str,
                 timeout: float = DEFAULT_TIMEOUT, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 backend: str = "gloo", bind_address: str | None = None) -> None:
        _check_secret(secret)
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        self.group = join_group(host, port, rank=0, world_size=1 + num_receivers,
                                timeout=timeout, backend=backend, secret=secret,
                                bind_address=bind_address)

    def send(self, state_dict: Mapping[str, torch.Tensor]
             | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Send one complete update; raises ``BroadcastError`` if it is rejected."""
        items = list(state_dict.items() if isinstance(state_dict, Mapping) else state_dict)
        entries = [(name, tuple(t.shape), t.dtype) for name, t in items]
        offsets, total = _layout(entries)
        header = {"protocol": PROTOCOL_VERSION, "total_bytes": total,
                  "chunk_bytes": self.chunk_bytes,
                  "tensors": [[n, list(s), _dtype_name(d)] for n, s, d in entries]}
        g = self.group
        g.broadcast_bytes(json.dumps(header).encode(), root=0)
        _agree(g, None)
        chunk = torch.zeros(min(self.chunk_bytes, max(total, 1)), dtype=torch.uint8,
                            device=g.device)
        sent = 0  # stream position of chunk[0]
        filled = 0
        for (_, t), start in zip(items, offsets):
            filled = start - sent  # alignment padding stays whatever is in the chunk
            while filled >= chunk.numel():  # (only if padding crosses a chunk edge)
                g.broadcast(chunk, 0)
                sent += chunk.numel()
                filled -= chunk.numel()
            data = t.detach().contiguous().reshape(-1).view(torch.uint8)
            pos = 0
            while pos < data.numel():
                n = min(data.numel() - pos, chunk.numel() - filled)
                chunk[filled:filled + n].copy_(data[pos:pos + n])
                filled += n
                pos += n
                if filled == chunk.numel():
                    g.broadcast(chunk, 0)
                    sent += chunk.numel()
                    filled = 0
        if total > sent:
            g.broadcast(chunk[:total - sent], 0)
        if g.allreduce_min(1) != 1:
            raise BroadcastError("a receiver failed after the data was sent")

    def close(self) -> None:
        self.group.close()


def _agree(group: Group, error: str | None) -> None:
    """All-reduce a verdict; if any rank failed, every rank raises its error text."""
    mine = group.rank if error is not None else group.world_size
    first_bad = group.allreduce_min(mine)
    if first_bad == group.world_size:
        return
    if not 0 <= first_bad < group.world_size:  # only a misbehaving peer sends this
        raise BroadcastError(f"invalid verdict {first_bad} from the broadcast group")
    payload = None
    if group.rank == first_bad:
        payload = error.encode()[:_MAX_ERROR_BYTES]
    text = group.broadcast_bytes(payload, root=first_bad, max_bytes=_MAX_ERROR_BYTES)
    raise BroadcastError(f"weight update rejected by receiver rank {first_bad}: "
                         f"{text.decode(errors='replace')}")


def _short(value: Any) -> str:
    """``repr`` cut short: header values are untrusted and may be huge."""
    text = repr(value)
    return text if len(text) <= 100 else text[:100] + "..."


def _int_field(header: dict, key: str) -> int:
    value = header.get(key)
    if type(value) is not int:  # bool and float are refused too
        raise BroadcastError(f"broadcast metadata field {key!r} must be an int, "
                             f"got {_short(value)}")
    return value


def _parse_entries(tensors: Any) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """``[[name, shape, dtype], ...]`` -> entries; malformed items are refused."""
    if not isinstance(tensors, list):
        raise BroadcastError("broadcast metadata field 'tensors' must be a list")
    entries = []
    for item in tensors:
        ok = (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
              and isinstance(item[1], list)
              and all(type(s) is int and s >= 0 for s in item[1]))
        if not ok:
            raise BroadcastError(f"malformed tensor entry {_short(item)} "
                                 "in broadcast metadata")
        entries.append((item[0], tuple(item[1]), _dtype_from_name(item[2])))
    return entries


def _check_header(raw: bytes, validate: Callable[[Iterable], None]
                  ) -> tuple[list[tuple[str, tuple[int, ...], torch.dtype]], int, int]:
    """Parse and check a header; returns ``(entries, total, chunk)``.

    Sizes are only trusted once they follow from tensors the model accepted,
    so a receiver never allocates more than its model's size.
    """
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise BroadcastError("broadcast metadata is not a JSON object")
    if header.get("protocol") != PROTOCOL_VERSION:
        raise BroadcastError(f"trainer speaks protocol {_short(header.get('protocol'))}, "
                             f"this engine {PROTOCOL_VERSION}")
    entries = _parse_entries(header.get("tensors"))
    validate(entries)
    total = _layout(entries)[1]
    claimed = _int_field(header, "total_bytes")
    if claimed != total:
        raise BroadcastError(f"broadcast metadata claims total_bytes={claimed}, but its "
                             f"tensors take {total} bytes")
    chunk = _int_field(header, "chunk_bytes")
    if chunk <= 0:
        raise BroadcastError(f"broadcast metadata has chunk_bytes={chunk}; "
                             "it must be positive")
    return entries, total, min(chunk, max(total, 1))


def check_bounce_fits(device: Any, need: int, free: int) -> None:
    """Refuse a ``need``-byte GPU bounce buffer when only ``free`` bytes are free."""
    if need > free:
        raise BroadcastError(
            f"the NCCL weight broadcast needs {need} bytes ({need / 2**20:.1f} MiB) of "
            f"free GPU memory on {device} for its bounce buffer (one chunk), but only "
            f"{free} bytes ({free / 2**20:.1f} MiB) are free; send with a smaller "
            "chunk_bytes or start the engine with a lower gpu_memory_utilization")


def _gpu_free_bytes(device: torch.device) -> int:
    """Bytes a new allocation on ``device`` can use: the driver's free memory
    plus what torch's caching allocator holds unused (e.g. the last update's
    bounce buffer)."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free) + max(int(cached), 0)


def _bounce_buffer(device: torch.device, nbytes: int) -> torch.Tensor:
    """The one GPU buffer an NCCL receive needs (``nbytes`` = one chunk)."""
    check_bounce_fits(device, nbytes, _gpu_free_bytes(device))
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    except torch.cuda.OutOfMemoryError as exc:  # free but fragmented, or taken meanwhile
        raise BroadcastError(f"could not allocate the NCCL weight broadcast's {nbytes}-byte "
                             f"bounce buffer on {device}: {exc}") from exc


def receive_update(group: Group, validate: Callable[[Iterable], None]
                   ) -> list[tuple[str, torch.Tensor]]:
    """Receiver side of one update: metadata, verdict, data into host staging.

    Returns ``(name, tensor)`` views into one staging buffer in host (CPU)
    memory, whatever the group's device; applying them copies into the
    parameters wherever those live. Over NCCL each chunk arrives in one GPU
    bounce buffer of the update's chunk size, then is copied to the host
    before the next chunk: that buffer is the only GPU memory an update needs
    (besides NCCL's own, set up when the group formed). It is allocated before
    the verdict, so a worker without that much free GPU memory rejects the
    update with a clear error on every rank. Staging is ordinary (pageable)
    host memory, not pinned: pinning a whole update would keep that much
    page-locked memory per worker in torch's pinned-memory cache for the
    process's lifetime. Raises ``BroadcastError`` (rejected, or the transfer
    broke); nothing is kept then.
    """
    received = 0
    total = 0
    bounce = None
    try:
        raw = group.broadcast_bytes(None, root=0, max_bytes=MAX_HEADER_BYTES)
        error = None
        try:
            entries, total, chunk = _check_header(raw, validate)
            if group.device.type == "cuda":
                bounce = _bounce_buffer(group.device, chunk)
        except Exception as exc:  # noqa: BLE001 - sent to the group as text
            error = str(exc) or type(exc).__name__
        _agree(group, error)
        staging = torch.empty(total, dtype=torch.uint8, device="cpu")
        while received < total:
            n = min(chunk, total - received)
            dst = staging[received:received + n]
            if bounce is None:
                group.broadcast(dst, 0)  # gloo: straight into staging
            else:
                group.broadcast(bounce[:n], 0)  # returns once the chunk is there
                dst.copy_(bounce[:n])  # the stream is idle now: a bounded copy
            received += n
        if group.allreduce_min(1) != 1:
            raise BroadcastError("another receiver failed")
    except BroadcastError:
        raise
    except Exception as exc:
        raise BroadcastError(
            f"weight broadcast from the trainer failed after {received} of {total} "
            f"bytes (timeout {group.timeout:g} s): {type(exc).__name__}: {exc}") from exc
    finally:
        bounce = None  # an exception's traceback must not keep GPU memory alive
    offsets, _ = _layout(entries)
    return [(name, staging[start:start + _nbytes(shape, dtype)].view(dtype).view(shape))
            for (name, shape, dtype), start in zip(entries, offsets)]


_ALIGN = 64  # every tensor starts at a multiple of this many bytes


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * dtype.itemsize


def _layout(entries: list[tuple[str, tuple[int, ...], torch.dtype]]
            ) -> tuple[list[int], int]:
    """Byte offset of each tensor in the stream (aligned) and the total size."""
    offsets, pos = [], 0
    for _, shape, dtype in entries:
        pos = -(-pos // _ALIGN) * _ALIGN
        offsets.append(pos)
        pos += _nbytes(shape, dtype)
    return offsets, pos
