"""Kept import path: the clients live in ``weights/trainer/client.py``."""

from vllm_rl_compat.weights.trainer.client import ControlRouteError, LLMClient, TokenHTTPClient

__all__ = ["ControlRouteError", "LLMClient", "TokenHTTPClient"]
