"""Child-process engine runner for tests that need their own plugin state.

Reads one JSON request on stdin: ``frontend`` (``offline`` or ``async``),
``model``, ``engine_kwargs``, ``prompts``,
``sampling`` (SamplingParams kwargs); prints one JSON line: the effective
engine settings and, per prompt, the sampled token ids and their logprobs.
"""

from __future__ import annotations

import json
import sys

# vLLM logs to stdout too (also after we print): the result line is marked.
MARKER = "ENGINE_RUNNER_RESULT "


def effective_settings(vllm_config) -> dict:
    return {
        "logprobs_mode": vllm_config.model_config.logprobs_mode,
        "enable_prefix_caching": vllm_config.cache_config.enable_prefix_caching,
        "async_scheduling": vllm_config.scheduler_config.async_scheduling,
        "worker_extension_cls": vllm_config.parallel_config.worker_extension_cls,
        "additional_config": vllm_config.additional_config,
    }


def sampled_logprobs(output) -> list[float]:
    """The logprob the engine reported for each sampled token (if requested)."""
    if output.logprobs is None:
        return []
    return [step[tok].logprob for tok, step in zip(output.token_ids, output.logprobs)]


def summarize(vllm_config, outputs) -> dict:
    return {
        "settings": effective_settings(vllm_config),
        "outputs": [{"prompt_token_ids": list(o.prompt_token_ids),
                     "token_ids": list(o.outputs[0].token_ids),
                     "logprobs": sampled_logprobs(o.outputs[0])} for o in outputs],
    }


def run_offline(request: dict) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=request["model"], **request.get("engine_kwargs", {}))
    outputs = llm.generate(request.get("prompts", []),
                           SamplingParams(**request.get("sampling", {})), use_tqdm=False)
    return summarize(llm.llm_engine.vllm_config, outputs)


async def run_async(request: dict) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    args = AsyncEngineArgs(model=request["model"], **request.get("engine_kwargs", {}))
    engine = AsyncLLM.from_engine_args(args)
    try:
        params = SamplingParams(**request.get("sampling", {}))
        outputs = []
        for i, prompt in enumerate(request.get("prompts", [])):
            async for out in engine.generate(prompt, params, request_id=f"r{i}"):
                final = out
            outputs.append(final)
        return summarize(engine.vllm_config, outputs)
    finally:
        engine.shutdown()


def main() -> None:
    request = json.loads(sys.stdin.read())
    if request.get("frontend", "offline") == "async":
        import asyncio

        result = asyncio.run(run_async(request))
    else:
        result = run_offline(request)
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
