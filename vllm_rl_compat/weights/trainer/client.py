"""Clients for vLLM's trainer API (``VLLMWeightSyncClient``), trainer process.

vLLM ships an HTTP client without credentials and a Ray client; these add
the two a trainer here needs:

* ``TokenHTTPClient``: vLLM's ``HTTPVLLMWeightSyncClient`` plus the bearer
  token RL mode requires on the control routes, the server's JSON error
  text in the raised exception, and the update's id (from the start) sent
  with every later step, so a step can only reach the update it belongs to;
* ``LLMClient``: an in-process offline ``LLM`` (tests, single-process jobs).
"""

from __future__ import annotations

import os
from typing import Any

from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

TOKEN_ENV = "VLLM_RL_COMPAT_CONTROL_TOKEN"


class ControlRouteError(RuntimeError):
    """A control route answered with an error (status and the server's reason)."""

    def __init__(self, status: int, path: str, reason: str) -> None:
        super().__init__(f"{path}: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class TokenHTTPClient(HTTPVLLMWeightSyncClient):
    """``HTTPVLLMWeightSyncClient`` with ``Authorization: Bearer <token>``."""

    _STEPS = ("update_weights", "finish_weight_update", "abort_weight_update")

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 300) -> None:
        super().__init__(base_url, timeout)
        self.update_id: str | None = None  # of the update this client started
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise ValueError(f"TokenHTTPClient needs the control token (argument `token` "
                             f"or {TOKEN_ENV})")
        self._headers = {"Authorization": f"Bearer {token}"}

    def _post(self, path: str, json: dict[str, Any] | None = None) -> None:
        import requests

        if path in self._STEPS and self.update_id is not None:
            json = {**(json or {}), "update_id": self.update_id}
        response = requests.post(f"{self.base_url}/{path}", json=json,
                                 headers=self._headers, timeout=self.timeout)
        if path == "start_weight_update" and response.ok:
            self.update_id = response.json().get("update_id")
        elif path in ("finish_weight_update", "abort_weight_update"):
            self.update_id = None
        if response.status_code >= 400:
            try:
                reason = response.json().get("error", response.text)
            except ValueError:
                reason = response.text
            raise ControlRouteError(response.status_code, path, str(reason))

    def abort_weight_update(self) -> None:
        """Drop the update this client started (RL mode's route; vLLM's client
        has none): e.g. after a step timed out, before starting again."""
        self._post("abort_weight_update")


class LLMClient:
    """An offline ``LLM`` as a ``VLLMWeightSyncClient``."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info: Any) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
