"""Weight-version spans on vLLM's OpenAI completion choices (API-server process).

Why: vLLM 0.32 reports, for every finished request, which weights sampled
which output tokens (``CompletionOutput.weight_versions``: spans
``[start, end)`` over output-token indexes, labelled with the engine's weight
version), but returns them only on its token-in/token-out route
(``/inference/v1/generate``). An RL client that samples through
``/v1/completions`` needs them too, to tell which tokens of a request that ran
across a weight update were sampled by the old weights.

What it changes, in RL mode and only in a process that imports vLLM's OpenAI
serving modules (the API server; engine cores and workers never do):

* ``/v1/completions``: every choice of a non-streaming response gets
  ``"weight_versions": [{"version": "1", "start": 0, "end": 37}, ...]``
  (``OpenAIServingCompletion.request_output_to_completion_response``); in a
  stream, the chunk that finishes a choice (``finish_reason`` set) gets it
  (``OpenAIServingCompletion.completion_stream_generator``).
* ``/v1/chat/completions``: the same
  (``OpenAIServingChat.chat_completion_full_generator`` /
  ``chat_completion_stream_generator``).
* beside it, ``"prompt_weight_versions"``: the same spans over prompt
  positions, the weights that computed the prompt KV the choice attended to
  (``kv_versions``; ``"version": null`` where unknown).

The spans are vLLM's own, as on the token-in/token-out route: they index the
choice's output tokens (never echoed prompt tokens) and cover all of them;
labels are strings. When vLLM reports none (``weight_versions is None``) the
key is absent and the response is byte-identical to stock vLLM.

How: vLLM's OpenAI response models allow extra fields (``OpenAIBaseModel``,
``extra="allow"``), so the spans are set as an extra attribute on the choice
vLLM built, and no model class is changed. (A field declared on a choice
class after creation is silently dropped when an enclosing model --
``CompletionResponse``, the stream chunk, the batch API's wrappers -- is
serialized, unless each of them is rebuilt too.) Streaming: the
``RequestOutput`` objects are observed on their way into vLLM's generator, and
only a chunk that finishes a choice with spans is parsed and re-serialized
with the key added.

What it does not change: no other field, route, request parameter or
generation; not the batch chat route
(``OpenAIServingChatBatch.chat_completion_full_generator_batch``), the
Responses API, or the Anthropic/Cohere routes' own formats. With RL mode off
``install`` is never called. If a later vLLM declares ``weight_versions`` on
these choices itself, drop this module.

If vLLM's internals moved: ``install`` raises ``RuntimeError`` naming a
serving module that no longer exists; when a serving module is imported, a
missing method (``patching.patch_method``) or class, or a choice class that
no longer allows extra fields, raises ``RuntimeError`` naming it, so the API
server fails to start instead of silently serving without spans.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Callable

from vllm_rl_compat.patching import patch_method, when_imported
from vllm_rl_compat.weights.protocol.versions import PROMPT_FIELD

logger = logging.getLogger("vllm.rl_compat")

FIELD = "weight_versions"
FIELDS = (FIELD, PROMPT_FIELD)  # output tokens; prompt positions (``kv_versions``)
COMPLETION_MODULE = "vllm.entrypoints.openai.completion.serving"
CHAT_MODULE = "vllm.entrypoints.openai.chat_completion.serving"
_SSE_PREFIX = "data: "


def install() -> None:
    """Patch vLLM's OpenAI completion/chat serving when imported (idempotent).

    Only the API server imports those modules, so no other process pays for
    them; that the symbols exist is ``contract.ENTRIES``' job (checked when
    they are patched, and by ``vllm-rl-compat contract``).
    """
    when_imported(COMPLETION_MODULE, _patch_completion)
    when_imported(CHAT_MODULE, _patch_chat)


def spans_json(spans: Any) -> list[dict[str, Any]] | None:
    """vLLM's ``WeightVersionSpan`` list as JSON objects (``None`` stays ``None``)."""
    if spans is None:
        return None
    return [{"version": None if s.version is None else str(s.version),
             "start": int(s.start), "end": int(s.end)} for s in spans]


def _fields(output: Any) -> dict[str, list[dict[str, Any]]]:
    """The span fields of a vLLM ``CompletionOutput`` that are set, as JSON."""
    values = {name: spans_json(getattr(output, name, None)) for name in FIELDS}
    return {name: value for name, value in values.items() if value is not None}


def _stamp(choice: Any, output: Any) -> None:
    for name, value in _fields(output).items():
        setattr(choice, name, value)


def _require(module: Any, name: str) -> Any:
    value = getattr(module, name, None)
    if value is None:
        raise RuntimeError(f"vllm-rl-compat cannot add {FIELD} to OpenAI responses: "
                           f"{module.__name__}.{name} does not exist in this vLLM version")
    return value


def _require_extra_fields(module: Any, *names: str) -> None:
    for name in names:
        cls = _require(module, name)
        if cls.model_config.get("extra") != "allow":
            raise RuntimeError(f"vllm-rl-compat cannot add {FIELD} to OpenAI responses: "
                               f"{module.__name__}.{name} no longer allows extra fields "
                               f"in this vLLM version")


# -- /v1/completions ---------------------------------------------------------------


def _patch_completion(module: Any) -> None:
    _require_extra_fields(module, "CompletionResponseChoice", "CompletionResponseStreamChoice")
    cls = _require(module, "OpenAIServingCompletion")
    patch_method(cls, "request_output_to_completion_response", _wrap_completion_response)
    patch_method(cls, "completion_stream_generator", _wrap_completion_stream)


def _wrap_completion_response(original: Callable[..., Any]) -> Callable[..., Any]:
    def request_output_to_completion_response(self: Any, final_res_batch: Any,
                                              *args: Any, **kwargs: Any) -> Any:
        response = original(self, final_res_batch, *args, **kwargs)
        # vLLM appends one choice per output, prompt by prompt, in this order.
        outputs = [output for res in final_res_batch for output in res.outputs]
        if len(outputs) != len(response.choices):
            logger.warning("RL mode: %d choices for %d outputs; %s not added",
                           len(response.choices), len(outputs), FIELD)
            return response
        for choice, output in zip(response.choices, outputs):
            _stamp(choice, output)
        return response
    return request_output_to_completion_response


def _wrap_completion_stream(original: Callable[..., Any]) -> Callable[..., Any]:
    def completion_stream_generator(self: Any, request: Any, engine_inputs: Any,
                                    result_generator: Any, *args: Any,
                                    **kwargs: Any) -> AsyncIterator[str]:
        num_choices = 1 if request.n is None else request.n
        pending: dict[int, dict[str, Any]] = {}

        def record(item: tuple[int, Any]) -> None:
            prompt_idx, res = item
            for output in res.outputs:  # vLLM's choice index for this output:
                _pend(pending, output.index + prompt_idx * num_choices, output)

        stream = original(self, request, engine_inputs, _observe(result_generator, record),
                          *args, **kwargs)
        return _stamped(stream, pending)
    return completion_stream_generator


# -- /v1/chat/completions ----------------------------------------------------------


def _patch_chat(module: Any) -> None:
    _require_extra_fields(module, "ChatCompletionResponseChoice",
                          "ChatCompletionResponseStreamChoice")
    cls = _require(module, "OpenAIServingChat")
    patch_method(cls, "chat_completion_full_generator", _wrap_chat_full)
    patch_method(cls, "chat_completion_stream_generator", _wrap_chat_stream)


def _wrap_chat_full(original: Callable[..., Any]) -> Callable[..., Any]:
    async def chat_completion_full_generator(self: Any, request: Any, result_generator: Any,
                                             *args: Any, **kwargs: Any) -> Any:
        last: list[Any] = [None]

        def record(res: Any) -> None:
            last[0] = res

        response = await original(self, request, _observe(result_generator, record),
                                  *args, **kwargs)
        choices = getattr(response, "choices", None)  # None on an ErrorResponse
        if last[0] is not None and choices:
            # vLLM builds the choices from the last output, index = output.index.
            by_index = {output.index: output for output in last[0].outputs}
            for choice in choices:
                output = by_index.get(choice.index)
                if output is not None:
                    _stamp(choice, output)
        return response
    return chat_completion_full_generator


def _wrap_chat_stream(original: Callable[..., Any]) -> Callable[..., Any]:
    def chat_completion_stream_generator(self: Any, request: Any, result_generator: Any,
                                         *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        pending: dict[int, dict[str, Any]] = {}

        def record(res: Any) -> None:
            for output in res.outputs:  # the chat choice index is output.index
                _pend(pending, output.index, output)

        stream = original(self, request, _observe(result_generator, record), *args, **kwargs)
        return _stamped(stream, pending)
    return chat_completion_stream_generator


# -- streaming helpers -------------------------------------------------------------


def _pend(pending: dict[int, dict[str, Any]], index: int, output: Any) -> None:
    """Remember a finished output's spans until its final chunk goes out."""
    values = _fields(output)
    if values and output.finish_reason is not None:
        pending[index] = values


async def _observe(results: AsyncIterator[Any], record: Callable[[Any], None]
                   ) -> AsyncIterator[Any]:
    """``results`` unchanged, each item passed to ``record`` before vLLM sees it."""
    try:
        async for item in results:
            record(item)
            yield item
    finally:
        aclose = getattr(results, "aclose", None)
        if aclose is not None:
            await aclose()


async def _stamped(stream: Any, pending: dict[int, dict[str, Any]]
                   ) -> AsyncIterator[str]:
    """vLLM's SSE strings, the finishing chunk of each pending choice with its spans."""
    try:
        async for data in stream:
            yield _stamp_chunk(data, pending) if pending else data
    finally:
        await stream.aclose()


def _stamp_chunk(data: str, pending: dict[int, dict[str, Any]]) -> str:
    if not data.startswith(_SSE_PREFIX) or data.startswith(_SSE_PREFIX + "["):
        return data  # e.g. "data: [DONE]"
    try:
        chunk = json.loads(data[len(_SSE_PREFIX):])
    except ValueError:
        return data
    changed = False
    for choice in (chunk.get("choices") or []) if isinstance(chunk, dict) else []:
        if (isinstance(choice, dict) and choice.get("finish_reason") is not None
                and choice.get("index") in pending):
            choice.update(pending.pop(choice["index"]))
            changed = True
    if not changed:
        return data
    # The same compact form vLLM's ``model_dump_json`` writes.
    return (_SSE_PREFIX + json.dumps(chunk, ensure_ascii=False, separators=(",", ":"))
            + "\n\n")
