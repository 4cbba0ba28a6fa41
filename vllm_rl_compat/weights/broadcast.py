"""Kept import path: the broadcast lives in ``weights/protocol/broadcast.py``."""

from vllm_rl_compat.weights.protocol.broadcast import (
    BroadcastError,
    TrainerBroadcaster,
    join_group,
    new_secret,
    receive_update,
)

__all__ = ["BroadcastError", "TrainerBroadcaster", "join_group", "new_secret", "receive_update"]
