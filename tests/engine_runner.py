"""Child-process engine runner for tests that need their own plugin state.

Reads one JSON request on stdin: ``frontend`` (``offline`` or ``async``),
``model``, ``engine_kwargs``, ``prompts``,
``sampling`` (SamplingParams kwargs); prints one JSON line: the effective
engine settings and, per prompt, the sampled token ids and their logprobs.
With ``inspect`` (offline only) it also reports what RL mode would have
changed inside the engine: the head (``head_probe.stock_check``), the
reference raw and processed logprobs of the sampled tokens from the engine's
own logits, and whether ``WeightSync`` can attach.
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
        "weight_transfer_backend": getattr(vllm_config.weight_transfer_config, "backend", None),
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
    if request.get("inspect"):
        import head_probe

        llm.collective_rpc(head_probe.probe_install)
    outputs = llm.generate(request.get("prompts", []),
                           SamplingParams(**request.get("sampling", {})), use_tqdm=False)
    result = summarize(llm.llm_engine.vllm_config, outputs)
    if request.get("inspect"):
        result["inspect"] = inspect(llm, result["outputs"], request["sampling"]["temperature"])
    return result


def inspect(llm, outputs: list[dict], temperature: float) -> dict:
    """Head state, reference logprobs and the weight-sync extension (see the docstring)."""
    import head_probe
    from logprob_checks import expected_logprobs, raw_rows

    (head,) = llm.collective_rpc(head_probe.stock_check)
    refs = [expected_logprobs(raw_rows(llm, o["prompt_token_ids"], o["token_ids"]),
                              o["token_ids"], temperature) for o in outputs]
    try:
        from vllm_rl_compat.weight_sync import WeightSync

        WeightSync(llm)
        weight_sync_error = None
    except RuntimeError as exc:
        weight_sync_error = str(exc)
    return {"head": head, "weight_sync_error": weight_sync_error,
            "patched_here": patched_front_end(),
            "reference": [{k: v.tolist() for k, v in r.items()} for r in refs]}


def patched_front_end() -> list[str]:
    """vLLM attributes listed as wrapped in ``contract.ENTRIES`` that are wrapped
    here (``vllm_rl_compat.patching`` marks every wrapper), after importing the
    front-end modules RL mode wraps."""
    import vllm.entrypoints.llm  # noqa: F401
    import vllm.plugins  # noqa: F401
    import vllm.v1.engine.async_llm  # noqa: F401
    from vllm.engine.arg_utils import EngineArgs  # noqa: F401

    from vllm_rl_compat.contract import wrapped_now

    _serving_completion()
    return wrapped_now()


def _serving_completion() -> type:
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    return OpenAIServingCompletion


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
    if request.get("inspect"):  # the probes travel to the workers by value
        import cloudpickle

        import head_probe

        cloudpickle.register_pickle_by_value(head_probe)
    if request.get("frontend", "offline") == "async":
        import asyncio

        result = asyncio.run(run_async(request))
    else:
        result = run_offline(request)
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
