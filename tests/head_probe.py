"""Worker-side probes of the lm_head, sent to engine workers with ``collective_rpc``.

Shared by the fp32 head tests (RL mode) and the switch-off runner (stock
vLLM). The callables travel by value (cloudpickle, with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, a test-only setting), so workers
need not import this module.
"""

from __future__ import annotations

from typing import Any

import torch


def pack(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    t = t.detach().cpu().contiguous()
    return str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()


def unpack(p: Any) -> torch.Tensor:
    dtype, shape, raw = p
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def probe_install(self: Any) -> str:
    """Worker: record (hidden, logits) of every LogitsProcessor.forward call."""
    lp = self.model_runner.get_model().logits_processor
    lp.__dict__.pop("forward", None)
    original = lp.forward
    records: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(lm_head: Any, hidden: torch.Tensor, bias: Any = None, skip_gather: bool = False):
        out = original(lm_head, hidden, bias, skip_gather)
        lp.__dict__["_probe_head"] = (lm_head, bias)
        if out is not None:
            records.append((hidden.detach().clone(), out.detach().clone()))
        return out

    lp.forward = forward
    lp.__dict__["_probe_records"] = records
    return type(lp).__name__


def stock_check(self: Any) -> dict[str, Any]:
    """Worker: is the head stock vLLM? Class, logits dtypes, logits equal to the
    stock projection of the recorded hidden states, and no RL-mode patch in place."""
    from vllm.model_executor.custom_op import op_registry_oot

    from vllm_rl_compat.contract import wrapped_now

    lp = self.model_runner.get_model().logits_processor
    head, _ = lp.__dict__["_probe_head"]
    recs = lp.__dict__["_probe_records"]
    same = all(torch.equal(o, head.quant_method.apply(head, h)[..., : lp.org_vocab_size])
               for h, o in recs)
    return {"cls": type(lp).__name__, "dtypes": sorted({str(o.dtype) for _, o in recs}),
            "stock_equal": same,
            "patched": "LogitsProcessor" in op_registry_oot or bool(wrapped_now())}
