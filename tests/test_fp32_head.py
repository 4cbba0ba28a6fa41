"""fp32 lm_head (issue 3): exactness inside the running engine, fp32 weights, switch off.

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
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from kernel_support import expected_cpu_route

from vllm_rl_compat import fp32_head

U = 2.0 ** -24
PROMPTS = ["The quick brown fox", "Hello, my name is", "1 2 3 4 5", "Once upon a time"]
ENGINE = {"enforce_eager": True, "max_model_len": 256}


# ------------------------------------------------------------ worker-side probe


def _pack(t: torch.Tensor) -> tuple[str, list[int], bytes]:
    t = t.detach().cpu().contiguous()
    return str(t.dtype).removeprefix("torch."), list(t.shape), t.view(torch.uint8).numpy().tobytes()


def _unpack(p: Any) -> torch.Tensor:
    dtype, shape, raw = p
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def _probe_install(self: Any) -> str:
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
        "hidden": _pack(hidden),
        "logits": _pack(torch.cat([o for _, o in records])),
        "weight": _pack(weight),
        "param_dtype": str(head.weight.dtype),
        "bias": None if bias is None else _pack(bias),
        "soft_cap": lp.soft_cap, "scale": lp.scale, "org_vocab": lp.org_vocab_size,
        "top1": top1.tolist(),
        "topk_ids": None if topk_ids is None else topk_ids.tolist(),
        "topk_vals": None if topk_vals is None else _pack(topk_vals),
        "raw_dtype": str(raw.dtype),
    }


def _run_probe(llm: Any, prompts: list[str] = PROMPTS, max_tokens: int = 3) -> list[dict]:
    from vllm import SamplingParams

    llm.collective_rpc(_probe_install)
    llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=0),
                 use_tqdm=False)
    return llm.collective_rpc(_probe_collect)


# ------------------------------------------------------------ reference and bound


def _full_head(ranks: list[dict]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the vocab shards of every TP rank (each padded to its shard size)."""
    weight = torch.cat([_unpack(r["weight"]) for r in ranks])
    bias = None if ranks[0]["bias"] is None else torch.cat([_unpack(r["bias"]) for r in ranks])
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
    h, logits = _unpack(r0["hidden"]), _unpack(r0["logits"])
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
    h = _unpack(r0["hidden"])
    w, b = _full_head(ranks)
    ref, bound = reference(h, w, b, r0["soft_cap"], r0["scale"])
    ref, bound = ref[:, : r0["org_vocab"]], bound[:, : r0["org_vocab"]]
    assert r0["raw_dtype"] == "torch.float32"
    assert r0["top1"] == ref.argmax(-1).tolist()
    if r0["topk_ids"] is None:
        return
    vals, ids = _unpack(r0["topk_vals"]).double(), torch.tensor(r0["topk_ids"])
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
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    if old is None:
        os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    else:
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = old


def _one_engine(llm_factory: Callable[..., Any], model: str, **kwargs: Any) -> list[dict]:
    llm = llm_factory(model, **{**ENGINE, **kwargs})
    try:
        return _run_probe(llm)
    finally:
        llm.llm_engine.engine_core.shutdown()


@pytest.mark.engine
@pytest.mark.parametrize("kind,impl", [("llama-tied", "auto"), ("gptj-bias", "auto"),
                                       ("gemma2-softcap", "auto"), ("llama-untied", "torch")])
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
    used = _unpack(ranks[0]["weight"])
    assert used.dtype == torch.float32 and torch.equal(used[: new.shape[0]], new.float())
    assert_exact(ranks)
    return sync.last_apply


def _embed_sync(self: Any, new: Any) -> dict[str, Any]:
    """Worker: load a new fp32 embedding through vLLM's loader, then refresh."""
    model = self.model_runner.get_model()
    value = _unpack(new)
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
@pytest.mark.parametrize("kind,name,fast_reload", [
    ("llama-untied", "lm_head.weight", "1"),
    ("llama-tied", "model.embed_tokens.weight", "1"),
    # vLLM's layerwise reload replays the embedding's (wrapped) loader by
    # signature: the shadow wrapper must keep working there too.
    ("llama-tied", "model.embed_tokens.weight", "0")])
def test_fp32_weights_mode(kind: str, name: str, fast_reload: str, tmp_path: Path,
                           tiny_model: Callable[..., str], llm_factory: Callable[..., Any],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_RL_COMPAT_FAST_RELOAD", fast_reload)  # read by the workers
    exact = _fp32_checkpoint(tiny_model(kind), tmp_path / kind, name)
    llm = llm_factory(str(tmp_path / kind), **ENGINE,
                      additional_config={"rl_compat": {"fp32_head": "weights"}})
    try:
        ranks = _run_probe(llm)
        r0 = ranks[0]
        used = _unpack(r0["weight"])
        assert used.dtype == torch.float32 and torch.equal(used[: exact.shape[0]], exact)
        assert r0["param_dtype"] == ("torch.bfloat16" if "embed" in name else "torch.float32")
        assert_exact(ranks)
        # A bf16-rounded head must fail: the reference from the rounded weight
        # is further from the engine's logits than the bound allows.
        rounded = [{**r0, "weight": _pack(used.bfloat16())}]
        with pytest.raises(AssertionError, match="max err/bound"):
            assert_exact(rounded)
        if "embed" in name:
            new = exact * (1 + 2.0 ** -10)
            (res,) = llm.collective_rpc(_embed_sync, args=(_pack(new),))
            assert res == {"loader_synced": True, "embed_rounded": True,
                           "refresh_rebuilt": True}
            # Through WeightSync (layerwise reload) the embedding arrives in its
            # own dtype; the head's fp32 copy must follow it.
            new = (exact * (1 - 2.0 ** -8)).bfloat16()
        else:
            new = exact * (1 + 2.0 ** -10)
            assert not torch.equal(new.bfloat16().float(), new)
        applied = _update_keeps_fp32_head(llm, tmp_path / kind, name, new)
        assert [r["fast"] for r in applied] == [fast_reload == "1"]
    finally:
        llm.llm_engine.engine_core.shutdown()


# ------------------------------------------------------------ switch off


def _switch_off_main(model: str) -> None:
    """Child process (switch off): stock class, bf16 logits equal the stock projection."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", seed=0, **ENGINE)
    llm.collective_rpc(_probe_install)
    llm.generate(PROMPTS, SamplingParams(max_tokens=3, seed=0), use_tqdm=False)
    (res,) = llm.collective_rpc(_stock_check)
    print(json.dumps(res))


def _stock_check(self: Any) -> dict[str, Any]:
    from vllm.model_executor.custom_op import op_registry_oot
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    lp = self.model_runner.get_model().logits_processor
    head, _ = lp.__dict__["_probe_head"]
    recs = lp.__dict__["_probe_records"]
    same = all(torch.equal(o, head.quant_method.apply(head, h)[..., : lp.org_vocab_size])
               for h, o in recs)
    return {"cls": type(lp).__name__, "dtypes": sorted({str(o.dtype) for _, o in recs}),
            "stock_equal": same,
            # (spawned workers re-import this script, so the module itself may be loaded)
            "patched": "LogitsProcessor" in op_registry_oot
            or getattr(ParallelLMHead, "_rl_compat_fp32_head", False)}


@pytest.mark.engine
def test_switch_off_head_untouched(tiny_model: Callable[..., str]) -> None:
    env = {**os.environ, "VLLM_RL_COMPAT": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    proc = subprocess.run([sys.executable, __file__, tiny_model("llama-untied")],
                          capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    assert res == {"cls": "LogitsProcessor", "dtypes": ["torch.bfloat16"], "stock_equal": True,
                   "patched": False}


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

    assert fp32_head.select_impl("cuda", "auto") == "triton"
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


if __name__ == "__main__":
    _switch_off_main(sys.argv[1])
