"""Public import path of the weight-update conveniences (kept for users' code).

The implementation lives in ``vllm_rl_compat.weights``; see
``weights.frontend.sync`` (``WeightSync`` / ``AsyncWeightSync``),
``weights.frontend.transaction`` (what every update does) and
``weights.trainer`` (vLLM's trainer API with our backends).
"""

from vllm_rl_compat.weights.frontend.sync import AsyncWeightSync, WeightSync
from vllm_rl_compat.weights.frontend.transaction import TransactionStateError
from vllm_rl_compat.weights.protocol.spec import WeightSyncCorruptedError, WeightUpdateError
from vllm_rl_compat.weights.protocol.versions import prompt_versions, token_versions

__all__ = ["AsyncWeightSync", "TransactionStateError", "WeightSync",
           "WeightSyncCorruptedError", "WeightUpdateError", "prompt_versions",
           "token_versions"]
