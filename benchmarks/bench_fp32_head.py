"""fp32 lm_head on CPU: decode throughput, head memory, and rollout logprob parity.

One run measures four heads on SmolLM2-135M-Instruct (bf16 body), each engine
in its own child process with RL mode on (same engine settings otherwise):

* ``bf16``   -- ``rl_compat.fp32_head="off"``: vLLM's model-dtype head;
* ``native`` -- ``fp32_head="off"`` + ``hf_overrides={"head_dtype": "float32"}``:
  vLLM's own fp32 head (casts the V x H weight to fp32 every step on CPU);
* ``ours``   -- ``fp32_head="compute"`` (the default, ``fp32_head_impl="auto"``:
  oneDNN bf16 brgemm on CPUs with AMX, the blocked kernel on other CPUs);
* ``ours_torch`` -- the same with ``fp32_head_impl="torch"`` (the chunked
  fallback used where no CPU kernel can be built).

Throughput: ``--prompts`` prompts x ``--tokens`` new tokens, ``ignore_eos``,
after one warm-up batch; best of ``--repeats`` timed batches (the machine is
shared, so the best run is the least disturbed one).

Parity: the sampled tokens' processed logprobs (temperature ``--temperature``)
against a trainer reference computed with HF transformers on the same tokens
(bf16 body, fp32 head: ``h.float() @ W.float().T``), summarised with
``vllm_rl_compat.parity.metrics.compute_metrics`` (mean/max |dlogprob|, k3 KL,
clip rate at eps=0.2).

Head memory: peak bytes allocated beyond inputs and output by one head call
(SmolLM2 head shape, ``--prompts`` rows), from torch's CPU memory profiler.

Head calls alone (``--head-calls``): the four head computations on the
SmolLM2 head (49152 x 576) and a 262k-vocabulary head (262144 x 640), at 1, 32,
256 and 2048 rows, all in one run (each head shape and path in a fresh process;
time = best of repeated calls, memory = resident-set growth over the first call
minus the output). Written to ``benchmarks/results/fp32_head_calls_<cpu kind>.md``
with a header naming the machine (``benchmarks/machine.py``).

Decode (``--decode``): tok/s of the bf16, native and ours heads at 1, 32 and
256 concurrent sequences on SmolLM2-135M-Instruct and on a seeded random
Llama with the 262k-vocabulary head (2 layers, hidden 640); per model the
three engines stay up in child processes and the measurements alternate
between them (``--repeats`` rounds, best kept), so drift on a shared machine
hits every head alike. Written to ``benchmarks/results/fp32_head_decode_<cpu
kind>.md`` with the machine header.

Usage: ``python benchmarks/bench_fp32_head.py [--out benchmarks/results/fp32_head_cpu.md]``
       ``python benchmarks/bench_fp32_head.py --head-calls``
       ``python benchmarks/bench_fp32_head.py --decode [--batches 1,32,256] [--tokens 16]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py: the results-file header)

VARIANTS: dict[str, dict[str, Any]] = {
    "bf16": {"rl_compat": {"fp32_head": "off"}},
    "native": {"rl_compat": {"fp32_head": "off"}, "hf_overrides": {"head_dtype": "float32"}},
    "ours": {"rl_compat": {"fp32_head": "compute"}},
    "ours_torch": {"rl_compat": {"fp32_head": "compute", "fp32_head_impl": "torch"}},
}
PROMPT_SEEDS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "List some uses of a paperclip.",
    "What is the capital of France and why is it famous?",
    "Describe the water cycle to a child.",
    "Give me advice on learning to play the guitar.",
    "Summarize the plot of a heist movie.",
    "Why is the sky blue?",
]


def prompts(n: int) -> list[str]:
    return [f"{PROMPT_SEEDS[i % len(PROMPT_SEEDS)]} (variant {i})" for i in range(n)]


# ------------------------------------------------------------------ child


def child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one engine: timed decode batches, then the sampled tokens and logprobs."""
    from vllm import LLM, SamplingParams

    spec = VARIANTS[variant]
    llm = LLM(model=args.model, dtype="bfloat16", seed=0, max_model_len=512,
              additional_config={"rl_compat": spec["rl_compat"]},
              hf_overrides=spec.get("hf_overrides"), enforce_eager=args.enforce_eager)
    texts = prompts(args.prompts)
    timed = SamplingParams(max_tokens=args.tokens, ignore_eos=True, temperature=1.0, seed=0)
    llm.generate(texts, SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        outs = llm.generate(texts, timed, use_tqdm=False)
        times.append(time.perf_counter() - start)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    sample = SamplingParams(max_tokens=args.parity_tokens, temperature=args.temperature,
                            seed=1, logprobs=0)
    outs = llm.generate(texts, sample, use_tqdm=False)
    return {
        "variant": variant, "tokens": tokens, "times_s": times,
        "tok_per_s": tokens / min(times),
        "rollouts": [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids),
                      "logprobs": [step[t].logprob for t, step in
                                   zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]}
                     for o in outs],
    }


def run_child(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model,
           "--prompts", str(args.prompts), "--tokens", str(args.tokens),
           "--repeats", str(args.repeats), "--parity-tokens", str(args.parity_tokens),
           "--temperature", str(args.temperature)]
    if args.enforce_eager:
        cmd.append("--enforce-eager")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "VLLM_RL_COMPAT": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(_last_json_line(proc.stdout))


def _last_json_line(text: str) -> str:
    return [line for line in text.splitlines() if line.startswith("{")][-1]


# ------------------------------------------------------------------ reference


def trainer_logprobs(model_dir: str, rollouts: list[dict], temperature: float) -> list[list[float]]:
    """HF transformers, bf16 body, fp32 head; processed logprobs of the given tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    w = model.get_output_embeddings().weight.float()
    out = []
    with torch.inference_mode():
        for r in rollouts:
            ids = torch.tensor([r["prompt"] + r["tokens"]])
            hidden = model.model(input_ids=ids).last_hidden_state[0]
            n = len(r["prompt"])
            h = hidden[n - 1: n - 1 + len(r["tokens"])].float()
            logp = torch.log_softmax((h @ w.T) / temperature, dim=-1)
            out.append(logp.gather(-1, torch.tensor(r["tokens"])[:, None])[:, 0].tolist())
    return out


# ------------------------------------------------------------------ head memory


HEAD_SHAPES = {"smollm2": (49152, 576), "vocab262k": (262144, 640)}  # V x H
HEAD_ROWS = (1, 32, 256, 2048)


def _head_paths(rows: int, V: int = 49152, H: int = 576) -> dict[str, Any]:
    """The head computations on a V x H bf16 head (default: the SmolLM2 shape)."""
    import torch
    import torch.nn.functional as F

    from vllm_rl_compat.ops import fp32_linear

    torch.manual_seed(0)
    w = torch.randn(V, H, dtype=torch.bfloat16) * 0.05  # no fp32 temporary
    h = torch.randn(rows, H, dtype=torch.bfloat16)
    return {
        "bf16": _vllm_bf16_head(w, h),
        "native": lambda: F.linear(h.float(), w.float()),
        "ours": lambda: fp32_linear(h, w, None),
        "ours_torch": lambda: fp32_linear(h, w, None, impl="torch"),
    }


def _vllm_bf16_head(w: Any, h: Any) -> Any:
    """What vLLM's CPU head runs (``dispatch_cpu_unquantized_gemm``): a pre-packed
    oneDNN handle, or ``F.linear`` where oneDNN cannot build a bf16 matmul (AVX2)."""
    import torch.nn.functional as F
    from vllm import _custom_ops as ops

    try:
        handle = ops.create_onednn_mm(w.t(), 32)
    except RuntimeError:
        return lambda: F.linear(h, w)
    return lambda: ops.onednn_mm(handle, h, None)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _first_call_extra_mb(fn: Any) -> float:
    """Peak RSS growth of one call of ``fn``, minus its output, in MB.

    The high-water mark is reset first (Linux ``clear_refs`` 5), so set-up
    allocations freed earlier do not hide the call's own peak.
    """
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    out = fn()
    extra = (_status_kib("VmHWM") - before) * 1024 - out.numel() * out.element_size()
    return max(extra, 0) / 2**20


def mem_child(path: str, rows: int) -> dict[str, float]:
    """Child: peak extra memory of the first head call, and its best time."""
    fn = _head_paths(rows)[path]
    return {"extra_MB": _first_call_extra_mb(fn), "ms": _best_ms(fn)}


def head_memory(rows: int) -> dict[str, dict[str, float]]:
    """Per path (fresh process each): peak transient MB (RSS) and best call time."""
    res = {}
    for path in VARIANTS:
        proc = subprocess.run([sys.executable, __file__, "--mem-child", path,
                               "--prompts", str(rows), "--model", "unused"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        res[path] = json.loads(_last_json_line(proc.stdout))
    return res


def _best_ms(fn: Any, n: int = 15, budget_s: float = 4.0) -> float:
    """Best of up to ``n`` timed calls after a warm-up; at least two, and no more
    once ``budget_s`` is spent (slow paths at 2048 rows take seconds per call)."""
    fn()
    best, spent = float("inf"), 0.0
    for i in range(n):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if i >= 1 and spent > budget_s:
            break
    return best * 1e3


def calls_child(path: str, V: int, H: int) -> dict[str, dict[str, Any]]:
    """Child: every row count of ``HEAD_ROWS`` for one head shape and path."""
    import torch

    from vllm_rl_compat.ops.fp32_linear import resolve_impl

    res = {}
    for rows in HEAD_ROWS:
        fn = _head_paths(rows, V, H)[path]
        extra = _first_call_extra_mb(fn)
        impl = resolve_impl("auto", torch.empty(rows, H, dtype=torch.bfloat16),
                            torch.empty(V, H, dtype=torch.bfloat16)) if path == "ours" else path
        res[str(rows)] = {"ms": _best_ms(fn), "extra_MB": extra, "impl": impl}
    return res


def head_calls(out_dir: Path) -> Path:
    """All head shapes x paths x rows in one run; writes the results file."""
    load_before = machine.load()
    res: dict[str, dict[str, Any]] = {}
    for shape, (V, H) in HEAD_SHAPES.items():
        for path in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, "--calls-child", path,
                                   "--calls-shape", shape, "--model", "unused"],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            res.setdefault(shape, {})[path] = json.loads(_last_json_line(proc.stdout))
    text = machine.header("fp32 lm_head on CPU: the head call alone", load_before)
    text += "\n" + render_calls(res) + "\n"
    out = out_dir / f"fp32_head_calls_{machine.cpu_kind()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    machine.write_json(out.with_suffix(".json"), res, load_before)
    print(text)
    return out


def render_calls(res: dict[str, dict[str, Any]]) -> str:
    lines = ["| head (V x H) | rows | bf16 ms | native ms | ours ms | ours route | ours / bf16 "
             "| ours_torch ms | extra MB (bf16 / native / ours / ours_torch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for shape, paths in res.items():
        V, H = HEAD_SHAPES[shape]
        for rows in map(str, HEAD_ROWS):
            r = {p: paths[p][rows] for p in VARIANTS}
            mem = " / ".join(f"{r[p]['extra_MB']:.1f}" for p in VARIANTS)
            lines.append(f"| {shape} ({V} x {H}) | {rows} | {r['bf16']['ms']:.2f} "
                         f"| {r['native']['ms']:.2f} | {r['ours']['ms']:.2f} "
                         f"| {r['ours']['impl']} | {r['ours']['ms'] / r['bf16']['ms']:.2f}x "
                         f"| {r['ours_torch']['ms']:.2f} | {mem} |")
    return "\n".join(lines + ["", CALLS_NOTE])


CALLS_NOTE = """Each head shape and path runs in a fresh process; times are the best of
repeated calls (at least two, up to 15 or about 4 s) after one warm-up call.
"bf16" is what vLLM's CPU head runs for a bf16 weight: its pre-packed oneDNN
handle, or `F.linear` where oneDNN cannot build a bf16 matmul (AVX2-only CPUs).
"native" is vLLM's `head_dtype=float32` path (`F.linear(h.float(), W.float())`);
"ours" is `fp32_linear` with `impl="auto"` (the route it took is named);
"ours_torch" the chunked torch fallback. Extra MB: resident-set growth over
the first call (high-water mark reset just before it) minus the fp32 output."""


# ------------------------------------------------------------------ decode

DECODE_VARIANTS = ("bf16", "native", "ours")
VOCAB262K = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
             "vocab_size": 262144, "tie_word_embeddings": False, "hidden_size": 640,
             "intermediate_size": 1728, "num_hidden_layers": 2, "num_attention_heads": 10,
             "num_key_value_heads": 5, "head_dim": 64, "max_position_embeddings": 512,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
MARKER = "BENCH_DECODE "  # vLLM logs to stdout too


def decode_models() -> dict[str, str]:
    from vllm_rl_compat.models import default_model_dir, random_model_dir

    return {"smollm2": str(default_model_dir()),
            "vocab262k": str(random_model_dir("bench-llama-vocab262k", VOCAB262K))}


def decode_child(variant: str, model: str) -> None:
    """Child: one engine; answers ``{"batch", "tokens"}`` lines with decode tok/s."""
    from vllm import LLM, SamplingParams

    spec = VARIANTS[variant]
    llm = LLM(model=model, dtype="bfloat16", seed=0, max_model_len=512, max_num_seqs=256,
              enforce_eager=True, additional_config={"rl_compat": spec["rl_compat"]},
              hf_overrides=spec.get("hf_overrides"))
    print(MARKER + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        prompts = [{"prompt_token_ids": [(i * 7 + j * 13) % 40000 + 100 for j in range(16)]}
                   for i in range(req["batch"])]
        params = SamplingParams(max_tokens=req["tokens"], ignore_eos=True, temperature=1.0,
                                seed=0, detokenize=False)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        took = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(MARKER + json.dumps({"tok_per_s": tokens / took}), flush=True)


def _ask(proc: subprocess.Popen, request: dict | None = None) -> dict:
    if request is not None:
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
    for line in proc.stdout:
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    raise RuntimeError(f"decode child exited (code {proc.wait()})")


def decode(args: argparse.Namespace) -> Path:
    """Every model x batch size, the heads alternating; writes the results file."""
    load_before = machine.load()
    # Three engines at once: each gets 2 GiB of KV cache, not vLLM's CPU default
    # (most of the machine's memory).
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    batches = [int(b) for b in args.batches.split(",")]
    res: dict[str, dict[str, dict[str, float]]] = {}
    for name, model in decode_models().items():
        procs = {v: subprocess.Popen([sys.executable, __file__, "--decode-child", v,
                                      "--model", model], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
                 for v in DECODE_VARIANTS}
        try:
            for proc in procs.values():
                _ask(proc)  # engine up
            for batch in batches:
                best = dict.fromkeys(DECODE_VARIANTS, 0.0)
                for v in DECODE_VARIANTS:  # warm-up at this batch size
                    _ask(procs[v], {"batch": batch, "tokens": 4})
                for r in range(args.repeats):
                    order = DECODE_VARIANTS if r % 2 == 0 else DECODE_VARIANTS[::-1]
                    for v in order:
                        got = _ask(procs[v], {"batch": batch, "tokens": args.tokens})
                        best[v] = max(best[v], got["tok_per_s"])
                res.setdefault(name, {})[str(batch)] = best
                print(name, batch, best, flush=True)
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(timeout=120)
    text = machine.header("fp32 lm_head on CPU: decode throughput", load_before)
    text += "\n" + render_decode(res, args) + "\n"
    out = args.results_dir / f"fp32_head_decode_{machine.cpu_kind()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    machine.write_json(out.with_suffix(".json"), res, load_before)
    print(text)
    return out


def render_decode(res: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> str:
    lines = ["| model | sequences | bf16 tok/s | native tok/s | ours tok/s | ours / bf16 "
             "| native / bf16 |", "|---|---|---|---|---|---|---|"]
    for name, by_batch in res.items():
        for batch, r in by_batch.items():
            lines.append(f"| {name} | {batch} | {r['bf16']:.1f} | {r['native']:.1f} "
                         f"| {r['ours']:.1f} | {r['ours'] / r['bf16']:.3f}x "
                         f"| {r['native'] / r['bf16']:.3f}x |")
    note = (f"Each cell: best of {args.repeats} alternating rounds of `sequences` prompts of "
            f"16 tokens, {args.tokens} new tokens each (ignore_eos, T = 1, seeded), generated "
            "tokens over wall time (prefill included), enforce_eager on every engine. "
            "\"bf16\": RL mode with `fp32_head: off` (vLLM's bf16 head); \"native\": "
            "`fp32_head: off` + `head_dtype=float32`; \"ours\": `fp32_head: compute` "
            "(`auto`). vocab262k: a seeded random Llama (2 layers, hidden 640, untied "
            "262144 x 640 head), so its head dominates each step.")
    return "\n".join(lines + ["", note])


# ------------------------------------------------------------------ report


def render(results: dict[str, dict], metrics: dict[str, Any], memory: dict[str, dict],
           args: argparse.Namespace) -> str:
    base = results["bf16"]["tok_per_s"]
    lines = [
        f"{args.prompts} prompts x {args.tokens} tokens (ignore_eos), best of {args.repeats}; "
        f"enforce_eager={args.enforce_eager}.", "",
        "| head | decode tok/s | vs bf16 | head call ms | head peak extra MB |",
        "|---|---|---|---|---|"]
    for name in VARIANTS:
        r, m = results[name], memory[name]
        lines.append(f"| {name} | {r['tok_per_s']:.1f} | {r['tok_per_s'] / base:.3f}x "
                     f"| {m['ms']:.2f} | {m['extra_MB']:.1f} |")
    lines += ["", f"Parity vs trainer reference (HF bf16 body, fp32 head), processed logprobs "
              f"at T={args.temperature}, {args.prompts} x {args.parity_tokens} sampled tokens "
              f"(each engine samples its own tokens; the reference scores those tokens):", "",
              "| head | mean abs dlogp | max abs dlogp | KL k3 | clip rate (eps=0.2) |",
              "|---|---|---|---|---|"]
    for name in VARIANTS:
        m = metrics[name]
        lines.append(f"| {name} | {m['mean_abs_dlogp']:.3e} | {m['max_abs_dlogp']:.3e} "
                     f"| {m['kl_k3']:.3e} | {m['clip_rate']:.4f} |")
    return "\n".join(lines + ["", FOOTNOTE]) + "\n"


FOOTNOTE = """Head call ms and peak extra MB: the head computation alone on the SmolLM2 head
shape (49152 x 576, bf16) for the same number of rows as prompts, each path in a
fresh process; peak extra memory is the growth of the process's resident set over
the call (high-water mark reset just before it), minus the output. "bf16" is
vLLM's pre-packed oneDNN handle (``F.linear`` where oneDNN cannot build one);
"ours" is `fp32_head_impl: auto` (the CPU brgemm kernel where oneDNN has it,
else the blocked kernel), "ours_torch" the chunked fallback."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: converted SmolLM2)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--parity-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--mem-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help="only the head-call table")
    p.add_argument("--head-calls", action="store_true",
                   help="head calls alone: both head shapes, 1-2048 rows (results file)")
    p.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--decode", action="store_true",
                   help="decode tok/s at --batches concurrent sequences, both models (results file)")
    p.add_argument("--batches", default="1,32,256")
    p.add_argument("--decode-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--calls-child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--calls-shape", choices=list(HEAD_SHAPES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.calls_child:
        print(json.dumps(calls_child(args.calls_child, *HEAD_SHAPES[args.calls_shape])))
        return 0
    if args.head_calls:
        head_calls(args.results_dir)
        return 0
    if args.decode_child:
        decode_child(args.decode_child, args.model)
        return 0
    if args.decode:
        decode(args)
        return 0
    if args.model is None:
        from vllm_rl_compat.models import default_model_dir

        args.model = str(default_model_dir())
    if args.mem_child:
        print(json.dumps(mem_child(args.mem_child, args.prompts)))
        return 0
    if args.memory_only:
        print(json.dumps(head_memory(args.prompts), indent=1))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    from vllm_rl_compat.parity.metrics import compute_metrics

    load_before = machine.load()
    memory = head_memory(args.prompts)  # quick: fails before the long runs, not after
    results = {v: run_child(v, args) for v in args.variants.split(",")}
    metrics = {}
    for name, r in results.items():
        ref = trainer_logprobs(args.model, r["rollouts"], args.temperature)
        metrics[name] = vars(compute_metrics(ref, [x["logprobs"] for x in r["rollouts"]]))
    text = machine.header("fp32 lm_head on CPU: decode throughput and parity "
                          "(SmolLM2-135M-Instruct, bf16 body)", load_before)
    text += "\n" + render(results, metrics, memory, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        machine.write_json(args.out.with_suffix(".json"), {
            "throughput": {k: {x: v[x] for x in ("tok_per_s", "times_s", "tokens")}
                           for k, v in results.items()},
            "parity": metrics, "memory": memory}, load_before)
    return 0


if __name__ == "__main__":
    if "--child" not in sys.argv:
        os.environ["VLLM_RL_COMPAT"] = "1"
    sys.exit(main())
