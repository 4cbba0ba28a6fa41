"""Proof that a worker-side weight step comes from the front end's transaction.

Why: vLLM's dev mode exposes ``/collective_rpc``, which calls any worker
method by name. Without a proof, a caller could stage or apply weights with no
pause, no lock and no version bump. The front end and its workers share a
random secret through the environment (``VLLM_RL_COMPAT_TXN_SECRET``: set in
the front-end process by the plugin before the engine core and workers are
spawned, which inherit it); every step carries ``HMAC(secret, txn:step)``,
which a caller without the secret cannot compute. The secret never leaves
the processes of one engine (it is not in ``VllmConfig``, which dev mode's
``/server_info`` prints).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

SECRET_ENV = "VLLM_RL_COMPAT_TXN_SECRET"


def ensure_secret() -> None:
    """Front end: make a secret for the engines this process will spawn."""
    os.environ.setdefault(SECRET_ENV, secrets.token_hex(32))


def _secret() -> bytes:
    value = os.environ.get(SECRET_ENV)
    if not value:
        raise PermissionError(
            f"{SECRET_ENV} is not set in this process: weight updates must be started "
            f"by a front end that loaded the vllm-rl-compat plugin (VLLM_RL_COMPAT=1)")
    return value.encode()


def new_txn_id() -> str:
    return secrets.token_hex(16)


def sign(txn: str, step: str) -> str:
    """The proof the front end attaches to one step of transaction ``txn``."""
    return hmac.new(_secret(), f"{txn}:{step}".encode(), hashlib.sha256).hexdigest()


def verify(txn: str, step: str, proof: str) -> None:
    """Worker side: raise ``PermissionError`` unless ``proof`` signs ``txn:step``."""
    if not (isinstance(proof, str) and hmac.compare_digest(sign(txn, step), proof)):
        raise PermissionError(
            f"weight step {step!r} refused: it does not come from a weight-update "
            f"transaction opened by the front end (calls through /collective_rpc "
            f"cannot change weights)")
