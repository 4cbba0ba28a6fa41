"""vllm-rl-compat: make vLLM V1 safe for online reinforcement learning.

Install it next to vLLM and set ``VLLM_RL_COMPAT=1``. See README.md.
"""

from vllm_rl_compat.plugin import register

__all__ = ["register"]
