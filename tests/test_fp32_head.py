"""fp32 lm_head (issue 3): exactness inside the running engine, fp32 weights
(the switch-off check is in ``test_switch_off``).

Engines run in RL mode in this process (``conftest`` sets the switch). A
worker-side probe (a callable sent through ``LLM.collective_rpc``) wraps the
live ``LogitsProcessor.forward`` to record the hidden states entering the head
and the logits it returns during one ``generate``; the test recomputes the
logits in fp64 from the engine's own head weight and checks the bound

    |logit - ref| <= gamma(H + 2) * (|h| @ |W|^T + |b|) + 4u * |ref|,
    u = 2**-24, gamma(n) = n*u / (1 - n*u)

(fp32 accumulation of H exact bf16 x bf16 products -- or H rounded fp32
products in ``weights`` mode -- plus the bias add; the 4u*|ref| term covers
soft-cap and scale evaluated in fp32). Each case also asserts that the same
logits rounded to bf16 violate the bound, so the test can tell the heads apart.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import head_probe
from head_probe import pack, probe_install, unpack
from conftest import shutdown_engine
from kernel_support import expected_cpu_route

from vllm_rl_compat import fp32_head

U = 2.0 ** -24
PROMPTS = ["The quick brown fox", "Hello, my name is", "1 2 3 4 5", "Once upon a time"]
ENGINE = {"enforce_eager": True, "max_model_len": 256}


# ------------------------------------------------------------ worker-side probe


def _probe_collect(self: Any, k: int = 5) -> dict[str, Any]:
    """Worker: the records, the head's weight shard / bias, greedy-path results."""
    model = self.model_runner.get_model()
    lp = model.logits_processor
    head, bias = lp.__dict__["_probe_head"]
    records = lp.__dict__["_probe_records"]
    hidden = torch.cat([h for h, _ in records])
    with torch.inference_mode():
        top1 = lp.get_top_tokens(head, hidden, bias)
        # Stock vLLM's TP>1 top-k all-gathers int64 ids, which the CPU shared-
        # memory all-gather does not implement: only run it at TP=1.
        if head.tp_size == 1:
            topk_ids, topk_vals = lp.get_top_k_tokens(head, hidden, k, bias)
        else:
            topk_ids, topk_vals = None, None
        raw = lp._apply_head(head, hidden, bias)
    from vllm_rl_compat.ops.fp32_linear import resolve_impl

    weight = fp32_head.head_weight(head)
    return {
        "cls": type(lp).__name__,
        "impl": resolve_impl(lp.rl_impl, hidden, weight),
        "hidden": pack(hidden),
        "logits": pack(torch.cat([o for _, o in records])),
        "weight": pack(weight),
        "param_dtype": str(head.weight.dtype),
        "bias": None if bias is None else pack(bias),
        "soft_cap": lp.soft_cap, "scale": lp.scale, "org_vocab": lp.org_vocab_size,
        "top1": top1.tolist(),
        "topk_ids": None if topk_ids is None else topk_ids.tolist(),
        "topk_vals": None if topk_vals is None else pack(topk_vals),
        "raw_dtype": str(raw.dtype),
    }


def _run_probe(llm: Any, prompts: list[str] = PROMPTS, max_tokens: int = 3) -> list[dict]:
    from vllm import SamplingParams

    llm.collective_rpc(probe_install)
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0),
                 use_tqdm=False)
    return llm.collective_rpc(_probe_collect)


# ------------------------------------------------------------ reference and bound


def _full_head(ranks: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the vocab shards of every TP rank (each padded to its shard size)."""
    weight = torch.cat([unpack(r["weight"]) for r in ranks])
    bias = None if ranks[0]["bias"] is None else torch.cat([unpack(r["bias"]) for r in ranks])
    return weight, bias


def reference(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, soft_cap: float | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 logits and the fp32 error bound for each of them."""
    h64, w64 = h.double(), w.double()
    ref = h64 @ w64.T
    mag = h64.abs() @ w64.abs().T
    if b is not None:
        ref, mag = ref + b.double(), mag + b.double().abs()
    n = h.shape[-1] + 2
    bound = (n * U / (1 - n * U)) * mag
    if soft_cap is not None:
        ref = torch.tanh(ref / soft_cap) * soft_cap  # derivative <= 1: bound carries over
    ref = ref * scale
    return ref, bound * abs(scale) + 4 * U * ref.abs()


def assert_exact(ranks: list[dict]) -> dict[str, float]:
    """Captured logits equal the fp64 reference within the bound; bf16 would not."""
    r0 = ranks[0]
    h, logits = unpack(r0["hidden"]), unpack(r0["logits"])
    w, b = _full_head(ranks)
    ref, bound = reference(h, w, b, r0["soft_cap"], r0["scale"])
    ref, bound = ref[:, : r0["org_vocab"]], bound[:, : r0["org_vocab"]]
    assert logits.dtype == torch.float32 and logits.shape == ref.shape
    err = (logits.double() - ref).abs()
    assert bool((err <= bound).all()), f"max err/bound {float((err / bound).max()):.3g}"
    bf16_err = (logits.bfloat16().double() - ref).abs()
    assert bool((bf16_err > bound).any()), "a bf16 head would pass this bound: test too weak"
    ratio = err / bound.clamp_min(torch.finfo(torch.float64).tiny)
    return {"max_err": float(err.max()), "max_err_over_bound": float(ratio.max()),
            "bf16_max_err": float(bf16_err.max())}


def assert_greedy_paths(ranks: list[dict], k: int = 5) -> None:
    """get_top_tokens / get_top_k_tokens agree with the fp64 reference."""
    r0 = ranks[0]
    h = unpack(r0["hidden"])
    w, b = _full_head(ranks)
    ref, bound = reference(h, w, b, r0["soft_cap"], r0["scale"])
    ref, bound = ref[:, : r0["org_vocab"]], bound[:, : r0["org_vocab"]]
    assert r0["raw_dtype"] == "torch.float32"
    assert r0["top1"] == ref.argmax(-1).tolist()
    if r0["topk_ids"] is None:
        return
    vals, ids = unpack(r0["topk_vals"]).double(), torch.tensor(r0["topk_ids"])
    assert ids[:, 0].tolist() == r0["top1"]
    assert ids.tolist() == ref.topk(k, dim=-1).indices.tolist()
    assert bool(((vals - ref.gather(-1, ids)).abs() <= bound.gather(-1, ids)).all())


# ------------------------------------------------------------ engines


@pytest.fixture(scope="module", autouse=True)
def _pickle_callables() -> Any:
    """collective_rpc sends the probe callables with pickle (test-only setting)."""
    import cloudpickle

    old = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    for module in (sys.modules[__name__], head_probe):
        cloudpickle.register_pickle_by_value(module)
    yield
    for module in (sys.modules[__name__], head_probe):
        cloudpickle.unregister_pickle_by_value(module)
    if old is None:
        os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    else:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = old


def _one_engine(llm_factory: Callable[..., Any], model: str, **kwargs: Any) -> list[dict]:
    llm = llm_factory(model, **{**ENGINE, **kwargs})
    try:
        return _run_probe(llm)
    finally:
        shutdown_engine(llm)


@pytest.mark.engine
# An untied head on ``auto`` is the TP = 2 case below; the forced torch path
# (also what fp32 weights take) runs with a bias here.
@pytest.mark.parametrize("kind,impl", [("llama-tied", "auto"), ("gptj-bias", "torch"),
                                       ("gemma2-softcap", "auto")])
def test_head_exact(kind: str, impl: str, tiny_model: Callable[..., str],
                    llm_factory: Callable[..., Any]) -> None:
    ranks = _one_engine(llm_factory, tiny_model(kind),
                        additional_config={"rl_compat": {"fp32_head_impl": impl}})
    assert ranks[0]["cls"] == "FP32HeadLogitsProcessor"
    assert ranks[0]["impl"] == (expected_cpu_route() if impl == "auto" else impl)
    if kind == "gptj-bias":
        assert ranks[0]["bias"] is not None
    if kind == "gemma2-softcap":
        assert ranks[0]["soft_cap"]
    stats = assert_exact(ranks)
    assert_greedy_paths(ranks)
    print(kind, json.dumps(stats))


@pytest.mark.engine
@pytest.mark.tp2
def test_head_exact_tp2_padded_vocab(tiny_model: Callable[..., str],
                                     llm_factory: Callable[..., Any]) -> None:
    """Untied vocab-parallel head, vocab not a multiple of 64: gathered logits stay fp32."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    ranks = _one_engine(llm_factory, tiny_model("llama-oddvocab"), tensor_parallel_size=2,
                        distributed_executor_backend="mp")
    assert len(ranks) == 2 and ranks[0]["org_vocab"] % 64 != 0
    assert ranks[0]["impl"] == expected_cpu_route()
    assert _full_head(ranks)[0].shape[0] > ranks[0]["org_vocab"]  # padding present
    stats = assert_exact(ranks)
    assert_greedy_paths(ranks)
    print("tp2", json.dumps(stats))


# ------------------------------------------------------------ fp32 weights mode


def _fp32_checkpoint(src: str, dst: Path, name: str) -> torch.Tensor:
    """Copy ``src`` with tensor ``name`` stored in fp32 with bits below bf16 precision."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (path,) = dst.glob("*.safetensors")
    tensors = load_file(path)
    base = tensors[name].float()
    gen = torch.Generator().manual_seed(1)
    tensors[name] = base * (1 + torch.rand(base.shape, generator=gen) * 2.0 ** -9)
    assert not torch.equal(tensors[name].bfloat16().float(), tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors[name]


def _update_keeps_fp32_head(llm: Any, model_dir: Path, name: str,
                            new: torch.Tensor) -> list[dict[str, Any]]:
    """A weight update through WeightSync (vLLM's layerwise reload) reaches the
    head unrounded: an fp32 head keeps its bits below bf16 precision, a tied
    head's fp32 copy follows the new embedding."""
    from safetensors.torch import load_file

    from vllm_rl_compat.weight_sync import WeightSync

    (path,) = model_dir.glob("*.safetensors")
    state = {**load_file(path), name: new}
    sync = WeightSync(llm)
    sync.update_from_tensors(state)
    ranks = _run_probe(llm)
    used = unpack(ranks[0]["weight"])
    assert used.dtype == torch.float32 and torch.equal(used[: new.shape[0]], new.float())
    assert_exact(ranks)
    return sync.last_apply


def _embed_sync(self: Any, new: Any) -> dict[str, Any]:
    """Worker: load a new fp32 embedding through vLLM's loader, then refresh
    (inside a step, where our apply runs the loaders: elsewhere RL mode
    refuses ``load_weights``)."""
    from vllm_rl_compat.weights.worker.extension import in_step

    model = self.model_runner.get_model()
    value = unpack(new)
    with in_step(self):
        model.load_weights([("model.embed_tokens.weight", value)])
    fp32_head.refresh_head(model)
    head = model.lm_head
    shadow = fp32_head.head_weight(head)
    out = {"loader_synced": torch.equal(shadow[: value.shape[0]], value),
           "embed_rounded": torch.equal(head.weight[: value.shape[0]], value.bfloat16())}
    with torch.no_grad():  # change the embedding behind the loader's back
        head.weight[0].add_(1.0)
    fp32_head.refresh_head(model)
    out["refresh_rebuilt"] = torch.equal(shadow, head.weight.float())
    return out


@pytest.mark.engine
@pytest.mark.parametrize("kind,name", [("llama-untied", "lm_head.weight"),
                                       ("llama-tied", "model.embed_tokens.weight")])
def test_fp32_weights_mode(kind: str, name: str, tmp_path: Path,
                           tiny_model: Callable[..., str], llm_factory: Callable[..., Any],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    exact = _fp32_checkpoint(tiny_model(kind), tmp_path / kind, name)
    llm = llm_factory(str(tmp_path / kind), **ENGINE,
                      additional_config={"rl_compat": {"fp32_head": "weights"}})
    try:
        ranks = _run_probe(llm)
        r0 = ranks[0]
        used = unpack(r0["weight"])
        assert used.dtype == torch.float32 and torch.equal(used[: exact.shape[0]], exact)
        assert r0["param_dtype"] == ("torch.bfloat16" if "embed" in name else "torch.float32")
        assert_exact(ranks)
        # A bf16-rounded head must fail: the reference from the rounded weight
        # is further from the engine's logits than the bound allows.
        rounded = [{**r0, "weight": pack(used.bfloat16())}]
        with pytest.raises(AssertionError, match="max err/bound"):
            assert_exact(rounded)
        if "embed" in name:
            new = exact * (1 + 2.0 ** -10)
            (res,) = llm.collective_rpc(_embed_sync, args=(pack(new),))
            assert res == {"loader_synced": True, "embed_rounded": True,
                           "refresh_rebuilt": True}
            # Through WeightSync the embedding arrives in its own dtype; the
            # head's fp32 copy must follow it.
            updates = [(exact * (1 - 2.0 ** -8)).bfloat16(), (exact * (1 + 2.0 ** -8)).bfloat16()]
        else:
            updates = [exact * (1 + 2.0 ** -10), exact * (1 - 2.0 ** -10)]
            assert not any(torch.equal(u.bfloat16().float(), u) for u in updates)
        # Both apply paths on this engine (the choice is read at each update).
        # vLLM's layerwise reload replays the embedding's (wrapped) loader by
        # signature: the shadow wrapper must keep working there too.
        # Overlapped twice with the staging copy kept: the second loads into
        # the first's kept stage, the fp32 copy exchanged with the live one.
        monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP", "1")
        for fast_reload, new in zip(("1", "1", "0"), (*updates, updates[0])):
            monkeypatch.setenv("VLLM_RL_COMPAT_FAST_RELOAD", fast_reload)
            applied = _update_keeps_fp32_head(llm, tmp_path / kind, name, new)
            assert [r["fast"] for r in applied] == [fast_reload == "1"]
            # the fast path stages beside the live weights (a tied head's fp32 copy too)
            assert [r["overlapped"] for r in applied] == [fast_reload == "1"]
    finally:
        shutdown_engine(llm)


# ------------------------------------------------------------ decisions (no engine)


def test_quantized_head_is_a_startup_error() -> None:
    """Decision on real vLLM quant-method objects (no quantized tiny model offline)."""
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.quantization.fbgemm_fp8 import FBGEMMFp8LinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    fp32_head.check_head_supported(UnquantizedEmbeddingMethod(), "compute")
    fp32_head.check_head_supported(UnquantizedLinearMethod(), "weights")
    # Its __init__ reads a CUDA model config; the decision only looks at the type.
    fp8 = object.__new__(FBGEMMFp8LinearMethod)
    with pytest.raises(fp32_head.QuantizedHeadError,
                       match="fp32_head='compute'.*lm_head uses FBGEMMFp8LinearMethod"):
        fp32_head.check_head_supported(fp8, "compute", "lm_head")


def test_dispatch_and_head_dtype_rules() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_rl_compat.config import RLCompatConfig

    assert fp32_head.select_impl("cuda", "auto") == "auto"  # per call: cuBLAS or Triton
    assert fp32_head.select_impl("cuda", "triton") == "triton"
    assert fp32_head.select_impl("cuda", "torch") == "torch"
    assert fp32_head.select_impl("cpu", "auto") == "auto"  # per call: brgemm, blocked or torch
    assert fp32_head.select_impl("cpu", "torch") == "torch"
    with pytest.raises(ValueError, match="fp32_head_impl='triton'"):
        fp32_head.select_impl("cpu", "triton")
    for route in ("brgemm", "blocked"):
        with pytest.raises(ValueError, match=f"fp32_head_impl='{route}' is a CPU kernel"):
            fp32_head.select_impl("cuda", route)
        with pytest.raises(ValueError, match=f"fp32_head_impl='{route}' takes bf16 weights"):
            fp32_head.select_impl("cpu", route, "weights")
    fp32_head.check_head_dtype(torch.float32, torch.bfloat16, "compute")
    with pytest.raises(ValueError, match="head_dtype"):
        fp32_head.check_head_dtype(torch.float16, torch.bfloat16, "weights")
    cfg = RLCompatConfig()
    args = EngineArgs(model="m", hf_overrides={"head_dtype": "float32"})
    assert "serves head_dtype" in fp32_head.head_dtype_hook(args, cfg)
    with pytest.raises(ValueError, match="head_dtype='bfloat16' conflicts"):
        fp32_head.head_dtype_hook(EngineArgs(model="m", hf_overrides={"head_dtype": "bfloat16"}),
                                  cfg)
    off = RLCompatConfig(fp32_head="off")
    assert "vLLM head_dtype" in fp32_head.head_dtype_hook(
        EngineArgs(model="m", hf_overrides={"head_dtype": "bfloat16"}), off)

