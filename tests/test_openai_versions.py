"""RL mode's OpenAI completion choices carry weight-version spans (no engine).

vLLM's own serving code builds the responses here from hand-built
``RequestOutput`` / ``CompletionOutput`` objects (what the engine client
yields), on a serving object made without an engine: the non-streaming
``request_output_to_completion_response`` and the streaming
``completion_stream_generator`` / chat generators fed by a fake result stream.
Stock vLLM (the unpatched methods, ``patching.original_of``) gives no spans,
so these checks fail without ``openai_versions.install()``. The end-to-end
check through ``vllm serve`` is ``test_rl_http.test_completions_carry_weight_versions``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.outputs import CompletionOutput, RequestOutput, WeightVersionSpan

from vllm_rl_compat.patching import original_of
from vllm_rl_compat.weights.frontend import openai_versions

SPANS = [WeightVersionSpan("1", 0, 2), WeightVersionSpan("2", 2, 3)]
SPANS_JSON = [{"version": "1", "start": 0, "end": 2}, {"version": "2", "start": 2, "end": 3}]


@pytest.fixture(scope="module", autouse=True)
def installed() -> None:
    openai_versions.install()  # what RL mode's plugin registration does (idempotent)


def _out(index: int, token_ids: list[int], finish: str | None = None,
         spans: list[WeightVersionSpan] | None = None) -> CompletionOutput:
    return CompletionOutput(index=index, text="x" * len(token_ids), token_ids=token_ids,
                            cumulative_logprob=None, logprobs=None, finish_reason=finish,
                            weight_versions=spans)


def _res(outputs: list[CompletionOutput], finished: bool) -> RequestOutput:
    return RequestOutput(request_id="r", prompt="p", prompt_token_ids=[1, 2, 3],
                         prompt_logprobs=None, outputs=outputs, finished=finished)


def _serving(cls: type) -> Any:
    """vLLM's serving class without an engine: only what response building reads."""
    serving = object.__new__(cls)
    vars(serving).update(enable_prompt_tokens_details=False, enable_per_request_metrics=False,
                         enable_force_include_usage=False, system_fingerprint=None,
                         parser_cls=None, enable_auto_tools=False, enable_log_outputs=False,
                         request_logger=None, response_role="assistant",
                         _include_reasoning_tokens_details=False)
    return serving


def _completion_response(method: Any, batch: list[RequestOutput], n: int = 1) -> dict:
    from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata

    request = CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=3, n=n)
    response = method(_serving(OpenAIServingCompletion), batch, request, "cmpl-r", 0, "m",
                      None, RequestResponseMetadata(request_id="cmpl-r"))
    return json.loads(json.dumps(response.model_dump()))  # as the API router sends it


async def _aiter(items: list[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


def _sse(stream: AsyncIterator[str]) -> list[dict]:
    async def collect() -> list[str]:
        return [data async for data in stream]

    lines = asyncio.run(collect())
    assert lines[-1] == "data: [DONE]\n\n"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_non_streaming_choices_carry_spans() -> None:
    batch = [_res([_out(0, [5, 6, 7], "length", SPANS), _out(1, [8], "stop", SPANS[:1])],
                  True),
             _res([_out(0, [9, 9, 9], "length", None)], True)]
    body = _completion_response(OpenAIServingCompletion.request_output_to_completion_response,
                                batch, n=2)
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert choices[0]["weight_versions"] == SPANS_JSON
    assert choices[1]["weight_versions"] == SPANS_JSON[:1]
    assert "weight_versions" not in choices[2]  # vLLM reported none: key absent
    # Stock vLLM has no such key: this test fails without install().
    stock = _completion_response(
        original_of(OpenAIServingCompletion, "request_output_to_completion_response"), batch,
        n=2)
    assert all("weight_versions" not in c for c in stock["choices"])
    for choice, plain in zip(choices, stock["choices"]):
        assert {k: v for k, v in choice.items() if k != "weight_versions"} == plain


def test_prompt_spans_ride_beside_the_token_spans() -> None:
    """``prompt_weight_versions`` (``kv_versions_output`` sets it on the
    completion) is stamped the same way; an unknown version is ``null``."""
    out = _out(0, [5, 6, 7], "length", SPANS)
    out.prompt_weight_versions = [WeightVersionSpan(None, 0, 1), WeightVersionSpan("2", 1, 3)]
    body = _completion_response(OpenAIServingCompletion.request_output_to_completion_response,
                                [_res([out], True)])
    assert body["choices"][0]["prompt_weight_versions"] == [
        {"version": None, "start": 0, "end": 1}, {"version": "2", "start": 1, "end": 3}]
    assert body["choices"][0]["weight_versions"] == SPANS_JSON


def _completion_stream(method: Any, results: list[tuple[int, RequestOutput]],
                       n: int = 1) -> list[dict]:
    from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata

    request = CompletionRequest(model="m", prompt=[[1, 2, 3], [4, 5]], max_tokens=3, n=n,
                                stream=True, return_token_ids=True)
    stream = method(_serving(OpenAIServingCompletion), request, [], _aiter(results), "cmpl-r",
                    0, "m", num_prompts=2, tokenizer=None,
                    request_metadata=RequestResponseMetadata(request_id="cmpl-r"))
    return _sse(stream)


def test_streaming_final_chunk_carries_spans() -> None:
    # Two prompts, n=2: vLLM's choice index is output.index + prompt_idx * n.
    results = [(0, _res([_out(0, [5, 6]), _out(1, [8])], False)),
               (1, _res([_out(1, [4, 4], "length", [WeightVersionSpan("1", 0, 2)])], False)),
               (0, _res([_out(0, [7], "length", SPANS), _out(1, [8], "stop", SPANS[:1])],
                        True)),
               (1, _res([_out(0, [3], "stop", None)], True))]
    chunks = _completion_stream(OpenAIServingCompletion.completion_stream_generator, results,
                                n=2)
    finals = {}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        if choice["finish_reason"] is None:
            assert "weight_versions" not in choice  # only the final chunk has it
        else:
            finals[choice["index"]] = choice.get("weight_versions")
    assert finals == {3: [{"version": "1", "start": 0, "end": 2}], 0: SPANS_JSON,
                      1: SPANS_JSON[:1], 2: None}
    stock = _completion_stream(
        original_of(OpenAIServingCompletion, "completion_stream_generator"), results, n=2)
    assert all("weight_versions" not in c["choices"][0] for c in stock)
    for chunk, plain in zip(chunks, stock):
        chunk["choices"][0].pop("weight_versions", None)
        assert chunk == plain  # nothing else changed


def test_chat_choices_carry_spans() -> None:
    from vllm.entrypoints.generate.base.protocol import RequestResponseMetadata

    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=3)
    final = _res([_out(0, [5, 6, 7], "length", SPANS)], True)
    response = asyncio.run(OpenAIServingChat.chat_completion_full_generator(
        _serving(OpenAIServingChat), request, _aiter([final]), "chatcmpl-r", "m", [], None,
        RequestResponseMetadata(request_id="chatcmpl-r")))
    body = json.loads(json.dumps(response.model_dump()))
    assert body["choices"][0]["weight_versions"] == SPANS_JSON

    request = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}],
                                    max_tokens=3, stream=True)
    results = [_res([_out(0, [5, 6])], False), _res([_out(0, [7], "length", SPANS)], True)]
    chunks = _sse(OpenAIServingChat.chat_completion_stream_generator(
        _serving(OpenAIServingChat), request, _aiter(results), "chatcmpl-r", "m", [], None,
        RequestResponseMetadata(request_id="chatcmpl-r")))
    choices = [c["choices"][0] for c in chunks]
    assert choices[-1]["finish_reason"] == "length"
    assert choices[-1]["weight_versions"] == SPANS_JSON
    assert all("weight_versions" not in c for c in choices[:-1])
