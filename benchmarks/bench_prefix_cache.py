"""Benchmark: GRPO-shaped rollouts with the versioned prefix cache, on CPU.

SmolLM2-135M bf16, RL mode. 16 prompts of 512 random tokens, n = 8 samples
each, 64 new tokens (``ignore_eos``), seeded; the first 8 prompts, one weight
update (the model's own files through ``WeightSync``, so every config pays
the same update), the other 8. Three engines in one run, one after another:
``rl_compat.prefix_cache="versioned"``, RL mode's default (caching off) and
plain prefix caching (``disable_prefix_caching: false``, unsafe across
updates). Reported per config: generation throughput (new tokens / seconds
inside ``generate``, the update excluded), its ratio to caching off and to
plain caching, prompt tokens served from the cache (vLLM's
``vllm:prefix_cache_hits`` counter), and parity against the
caching-off run on the same seeds: completions with identical tokens, and the
mean |delta logprob| over each pair's common token prefix.

Run: ``python benchmarks/bench_prefix_cache.py``; writes
``benchmarks/results/prefix_cache_<cpu kind>.md`` with the machine header
(``benchmarks/machine.py``). Not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_RL_COMPAT", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import machine  # noqa: E402  (benchmarks/machine.py: the results-file header)

CONFIGS = {"versioned": {"prefix_cache": "versioned"}, "off": {},
           "plain": {"disable_prefix_caching": False}}


def prompts(count: int, length: int) -> list[list[int]]:
    import torch

    gen = torch.Generator().manual_seed(0)
    return torch.randint(1000, 40000, (count, length), generator=gen).tolist()


def run_config(model: str, options: dict, batches: list[list[list[int]]], args) -> dict:
    """One engine: generate batch 1, update, generate batch 2; tokens and times."""
    from vllm import LLM, SamplingParams

    from vllm_rl_compat.weight_sync import WeightSync

    llm = LLM(model=model, dtype="bfloat16", max_model_len=1024, seed=0,
              enforce_eager=True, disable_log_stats=False,
              additional_config={"rl_compat": options})
    sync = WeightSync(llm)
    gen_s, outputs = 0.0, []
    try:
        for i, batch in enumerate(batches):
            if i:
                sync.update_from_files(model)
            params = [SamplingParams(n=args.n, max_tokens=args.new_tokens, temperature=1.0,
                                     seed=1000 * i + j, logprobs=0, ignore_eos=True)
                      for j in range(len(batch))]
            t0 = time.perf_counter()
            outs = llm.generate([{"prompt_token_ids": p} for p in batch], params,
                                use_tqdm=False)
            gen_s += time.perf_counter() - t0
            outputs += outs
        hits = sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")
    finally:
        llm.llm_engine.engine_core.shutdown()
    samples = [[(t, lp[t].logprob) for t, lp in zip(c.token_ids, c.logprobs)]
               for o in outputs for c in o.outputs]
    new_tokens = sum(len(s) for s in samples)
    return {"tok_s": new_tokens / gen_s, "gen_s": gen_s, "samples": samples,
            "cached": int(hits)}


def parity(samples: list, reference: list) -> tuple[int, float]:
    """Completions identical to the reference's; mean |dlogp| on common prefixes."""
    same, diffs = 0, []
    for a, b in zip(samples, reference):
        same += a == b
        for (ta, la), (tb, lb) in zip(a, b):
            if ta != tb:
                break
            diffs.append(abs(la - lb))
    return same, (sum(diffs) / len(diffs) if diffs else 0.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()

    from vllm_rl_compat.models import default_model_dir

    model = str(default_model_dir())
    ps = prompts(args.prompts, args.prompt_len)
    batches = [ps[: len(ps) // 2], ps[len(ps) // 2:]]
    load_before = machine.load()
    runs = {name: run_config(model, opts, batches, args) for name, opts in CONFIGS.items()}
    off, plain = runs["off"], runs["plain"]
    lines = [machine.header("GRPO-shaped rollouts with the versioned prefix cache, CPU",
                            load_before),
             f"SmolLM2-135M bf16, RL mode; {args.prompts} prompts x {args.prompt_len} random "
             f"tokens, n = {args.n}, {args.new_tokens} new tokens (ignore_eos), seeded; "
             f"half the prompts, one weight update (the model's own files), the other half. "
             f"Throughput = new tokens / seconds inside generate (the update excluded). "
             f"Parity: against the caching-off run on the same seeds.", "",
             "| config | tok/s | vs caching off | vs plain caching | prompt tokens from cache "
             "| identical completions | mean abs dlogp (common prefix) |",
             "|---|---|---|---|---|---|---|"]
    total = args.prompts * args.n
    for name, run in runs.items():
        same, mean = parity(run["samples"], off["samples"])
        lines.append(f"| {name} | {run['tok_s']:.1f} | {run['tok_s'] / off['tok_s']:.2f}x | "
                     f"{run['tok_s'] / plain['tok_s']:.2f}x | {run['cached']} | "
                     f"{same}/{total} | {mean:.2e} |")
    machine.write_results("prefix_cache", lines)


if __name__ == "__main__":
    main()
