"""Child-process engine runner for tests that need their own plugin state.

Reads one JSON request on stdin: ``model``, ``engine_kwargs``, ``prompts``,
``sampling`` (SamplingParams kwargs); prints one JSON line: the effective
engine settings and, per prompt, the sampled token ids and their logprobs.
"""

from __future__ import annotations

import json
import sys


def effective_settings(vllm_config) -> dict:
    return {
        "logprobs_mode": vllm_config.model_config.logprobs_mode,
        "enable_prefix_caching": vllm_config.cache_config.enable_prefix_caching,
        "async_scheduling": vllm_config.scheduler_config.async_scheduling,
        "worker_extension_cls": vllm_config.parallel_config.worker_extension_cls,
        "additional_config": vllm_config.additional_config,
    }


def sampled_logprobs(output) -> list[float]:
    """The logprob the engine reported for each sampled token."""
    return [step[tok].logprob for tok, step in zip(output.token_ids, output.logprobs)]


def main() -> None:
    from vllm import LLM, SamplingParams

    request = json.loads(sys.stdin.read())
    llm = LLM(model=request["model"], **request.get("engine_kwargs", {}))
    outputs = llm.generate(request.get("prompts", []),
                           SamplingParams(**request.get("sampling", {})), use_tqdm=False)
    result = {
        "settings": effective_settings(llm.llm_engine.vllm_config),
        "outputs": [{"token_ids": list(o.outputs[0].token_ids),
                     "logprobs": sampled_logprobs(o.outputs[0])} for o in outputs],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
