"""Weight broadcast from a separate trainer process (torch.distributed style).

The trainer and the engine's workers form their own small process group:
the trainer is rank 0, worker ``i`` is rank ``1 + i``. The group is built from
a ``TCPStore`` (hosted by the trainer) and a ``ProcessGroupGloo`` constructed
directly (``ProcessGroupNCCL`` for ``backend="nccl"``), so it never touches
``torch.distributed``'s default group or vLLM's own groups inside the worker.
Every operation is bounded by the group's ``timeout``.

Protocol of one update (``TrainerBroadcaster.send`` / ``receive_update``):

1. metadata: a JSON list of ``[name, shape, dtype]`` plus total bytes and the
   chunk size, broadcast from the trainer;
2. verdict: every receiver validates the metadata against its model; the
   group agrees (all-reduce) and, if any receiver rejected it, broadcasts that
   receiver's error text, so the trainer raises the same clear error and no
   tensor data is sent;
3. data: the tensors' bytes, laid out back to back, are broadcast in chunks of
   at most ``chunk_bytes``; receivers write each chunk straight into one
   staging buffer of the update's total size. The trainer needs one chunk of
   extra memory; each receiver holds the whole update (its total bytes) until
   it has been applied or dropped;
4. done: a final all-reduce, so the trainer knows every receiver has all
   bytes.

A failure at any point (timeout, a peer that died) raises on every live side;
receivers drop their staging buffer and the model is untouched.
"""

from __future__ import annotations

import datetime
import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger("vllm.rl_compat")

PROTOCOL_VERSION = 1
DEFAULT_CHUNK_BYTES = 64 << 20
DEFAULT_TIMEOUT = 60.0
_STORE_PREFIX = "vllm_rl_compat/weights"


class BroadcastError(RuntimeError):
    """The broadcast failed or was rejected; nothing was applied."""


@dataclass
class Group:
    """A private process group: the store that built it and the group itself."""

    store: Any
    pg: Any
    rank: int
    world_size: int
    device: torch.device
    timeout: float

    def broadcast(self, tensor: torch.Tensor, root: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        self.pg.broadcast([tensor], opts).wait()

    def allreduce_min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self.pg.allreduce([t], opts).wait()
        return int(t.item())

    def broadcast_bytes(self, data: bytes | None, root: int) -> bytes:
        size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64,
                            device=self.device)
        self.broadcast(size, root)
        if self.rank == root:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(int(size.item()), dtype=torch.uint8, device=self.device)
        self.broadcast(buf, root)
        return bytes(buf.cpu().numpy()) if self.rank != root else data

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


def join_group(host: str, port: int, *, rank: int, world_size: int,
               timeout: float = DEFAULT_TIMEOUT, backend: str = "gloo") -> Group:
    """Join (rank 0: host) the trainer <-> workers group; blocks until all joined.

    ``backend="nccl"`` puts the group and staging buffers on the current CUDA
    device (engine on GPU); it is written for CUDA but untested here.
    """
    td = datetime.timedelta(seconds=timeout)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=td,
                          wait_for_workers=False)
    prefixed = dist.PrefixStore(_STORE_PREFIX, store)
    if backend == "gloo":
        pg = dist.ProcessGroupGloo(prefixed, rank, world_size, td)
        device = torch.device("cpu")
    elif backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = td
        pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    group = Group(store, pg, rank, world_size, device, timeout)
    # Make the join itself a rendezvous: everyone is in before anyone returns.
    group.allreduce_min(0)
    return group


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise BroadcastError(f"unknown dtype {name!r} in broadcast metadata")
    return dtype


class TrainerBroadcaster:
    """Trainer side: host the group and send state dicts to the engine.

    Example (trainer process)::

        from vllm_rl_compat.broadcast import TrainerBroadcaster

        bc = TrainerBroadcaster("127.0.0.1", 29555, num_receivers=2)  # TP=2
        bc.send({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
        bc.close()

    The engine side must call ``WeightSync.connect_trainer(host, port)`` at
    the same time as the constructor (each blocks until the other joined),
    and ``update_from_trainer()`` at the same time as each ``send``.
    """

    def __init__(self, host: str, port: int, num_receivers: int, *,
                 timeout: float = DEFAULT_TIMEOUT, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 backend: str = "gloo") -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.chunk_bytes = int(chunk_bytes)
        self.group = join_group(host, port, rank=0, world_size=1 + num_receivers,
                                timeout=timeout, backend=backend)

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
    text = group.broadcast_bytes(error.encode() if group.rank == first_bad else None,
                                 root=first_bad).decode()
    raise BroadcastError(f"weight update rejected by receiver rank {first_bad}: {text}")


def receive_update(group: Group, validate: Callable[[Iterable], None]
                   ) -> list[tuple[str, torch.Tensor]]:
    """Receiver side of one update: metadata, verdict, data into staging.

    Returns ``(name, tensor)`` views into one staging buffer. Raises
    ``BroadcastError`` (rejected, or the transfer broke); nothing is kept then.
    """
    received = 0
    total = 0
    try:
        header = json.loads(group.broadcast_bytes(None, root=0))
        error = None
        try:
            if header.get("protocol") != PROTOCOL_VERSION:
                raise BroadcastError(f"trainer speaks protocol {header.get('protocol')}, "
                                     f"this engine {PROTOCOL_VERSION}")
            entries = [(n, tuple(s), _dtype_from_name(d)) for n, s, d in header["tensors"]]
            validate(entries)
        except Exception as exc:  # noqa: BLE001 - sent to the group as text
            error = str(exc)
        _agree(group, error)
        total = int(header["total_bytes"])
        chunk = int(header["chunk_bytes"])
        staging = torch.empty(total, dtype=torch.uint8, device=group.device)
        while received < total:
            n = min(chunk, total - received)
            group.broadcast(staging[received:received + n], 0)
            received += n
        if group.allreduce_min(1) != 1:
            raise BroadcastError("another receiver failed")
    except BroadcastError:
        raise
    except Exception as exc:
        raise BroadcastError(
            f"weight broadcast from the trainer failed after {received} of {total} "
            f"bytes (timeout {group.timeout:g} s): {type(exc).__name__}: {exc}") from exc
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
