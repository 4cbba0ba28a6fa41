"""Prompt-KV versions onto vLLM's ``CompletionOutput`` (front-end process).

Why: ``kv_versions`` (engine core) sends each finished request's prompt spans
in its ``kv_transfer_params``, the only per-request dict vLLM carries to the
front end. Here they move to ``CompletionOutput.prompt_weight_versions`` (a
list of vLLM's ``WeightVersionSpan`` over prompt positions, beside
``weight_versions``) and leave ``kv_transfer_params``, which stays ``None``
when no KV connector set it. Wrapped: ``RequestState.make_request_output``
(takes the key out), ``RequestState._new_completion_output`` (sets the field
on the finished completion, ``n > 1`` children each their own), and
``RequestOutput.add`` (keeps it when a slow consumer's outputs are merged).
"""

from __future__ import annotations

from typing import Any

from vllm_rl_compat.weights.protocol.names import PROMPT_KV_KEY
from vllm_rl_compat.weights.protocol.versions import PROMPT_FIELD

_PENDING = "_rl_compat_prompt_spans"  # RequestState.__dict__: spans until the completion


def _wrap_make_request_output(original: Any) -> Any:
    def make_request_output(self: Any, new_token_ids: Any, pooling_output: Any,
                            finish_reason: Any, stop_reason: Any,
                            kv_transfer_params: Any = None, *args: Any, **kwargs: Any) -> Any:
        if kv_transfer_params and PROMPT_KV_KEY in kv_transfer_params:
            kv_transfer_params = dict(kv_transfer_params)
            self.__dict__[_PENDING] = kv_transfer_params.pop(PROMPT_KV_KEY)
            kv_transfer_params = kv_transfer_params or None
        return original(self, new_token_ids, pooling_output, finish_reason, stop_reason,
                        kv_transfer_params, *args, **kwargs)
    return make_request_output


def _wrap_new_completion_output(original: Any) -> Any:
    def _new_completion_output(self: Any, *args: Any, **kwargs: Any) -> Any:
        completion = original(self, *args, **kwargs)
        spans = self.__dict__.get(_PENDING)
        if spans is not None and completion.finish_reason is not None:
            from vllm.outputs import WeightVersionSpan

            setattr(completion, PROMPT_FIELD,
                    [WeightVersionSpan(label, start, end) for label, start, end in spans])
        return completion
    return _new_completion_output


def _wrap_add(original: Any) -> Any:
    def add(self: Any, next_output: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, next_output, *args, **kwargs)
        for new in getattr(next_output, "outputs", ()):
            spans = getattr(new, PROMPT_FIELD, None)
            if spans is not None:
                for completion in self.outputs:
                    if completion.index == new.index:
                        setattr(completion, PROMPT_FIELD, spans)
        return result
    return add


def install() -> None:
    """Wrap the output processor and ``RequestOutput`` when the front end imports them."""
    from vllm_rl_compat.patching import patch_method, when_imported

    def apply_processor(module: Any) -> None:
        patch_method(module.RequestState, "make_request_output", _wrap_make_request_output)
        patch_method(module.RequestState, "_new_completion_output",
                     _wrap_new_completion_output)

    def apply_outputs(module: Any) -> None:
        patch_method(module.RequestOutput, "add", _wrap_add)

    when_imported("vllm.v1.engine.output_processor", apply_processor)
    when_imported("vllm.outputs", apply_outputs)
