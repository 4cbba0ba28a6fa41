"""One row of ``check --online``: its own process, trainer and engine together.

``python -m vllm_rl_compat.online.row SPEC.json`` runs the row described by
SPEC (written by ``command``), appends one JSON line per step to
``spec.steps_path`` as the step ends (the parent shows them as progress),
and writes ``spec.result_path`` at the end. A process per row because RL
mode is a per-process switch (``VLLM_RL_COMPAT``), as in the static report.

Pipelined like an asynchronous RL system: half of the next step's groups are
submitted when a step begins, so the engine samples them while the trainer
scores and steps (in a thread, so the event loop keeps collecting outputs);
the other half just before the step's weights are pushed, so requests are in
flight across every update (on this CPU the trainer, not the engine, is the
slower side, so without this the engine would finish first and no request
would span two versions).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from vllm_rl_compat.online.stats import Sample, step_metrics
from vllm_rl_compat.online.task import reward

REFERENCE_ROW = "reference"


@dataclass
class RowSpec:
    """Everything one row's process needs (JSON between parent and child)."""

    key: str
    model: str
    prompts: list[list[int]]  # the pool; group k samples prompts[k % len(prompts)]
    steps: int
    groups: int  # groups (prompts) per step
    samples: int  # samples per group (``n``)
    lr: float
    epsilon: float
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    seed: int
    dtype: str
    reference: str
    steps_path: str
    result_path: str
    engine: bool = True  # False: the reference row (the trainer samples)
    weight_fix: bool = True  # our transaction, else the stock route (``push``)
    max_model_len: int = 1024
    enforce_eager: bool = True
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


def _spans_to_tokens(spans: list[tuple[Any, int, int]], n: int) -> list[int | None]:
    out: list[int | None] = [None] * n
    for version, start, end in spans:
        for i in range(start, min(end, n)):
            out[i] = version if isinstance(version, int) else None
    return out


def samples_of(output: Any, prompt: list[int], max_tokens: int) -> list[Sample]:
    """The finished request's completions as trainer samples, each token with
    the version that sampled it and the prompt KV's oldest version."""
    from vllm_rl_compat.weights.protocol.versions import prompt_versions, token_versions

    out = []
    for c in output.outputs:
        tokens = list(c.token_ids)
        behaviour = [float(step[t].logprob) for t, step in zip(tokens, c.logprobs)]
        try:
            versions = _spans_to_tokens(token_versions(c), len(tokens))
        except ValueError:
            versions = [None] * len(tokens)
        try:
            known = [v for v, _, _ in prompt_versions(c) if isinstance(v, int)]
            prompt_version = min(known) if known else None
        except ValueError:
            prompt_version = None
        finished = c.finish_reason == "stop"
        out.append(Sample(prompt, tokens, behaviour, versions, prompt_version,
                          reward(len(tokens), finished, max_tokens), finished))
    return out


def _train(trainer: Any, samples: list[Sample], spec: RowSpec) -> dict[str, Any]:
    """Score (the step's metrics), then one optimizer step."""
    t0 = time.perf_counter()
    scores = trainer.score(samples)
    if not spec.engine:  # the reference row: its behaviour policy is the trainer itself
        for s, sc in zip(samples, scores):
            s.behaviour = list(sc.train)
    record = step_metrics(samples, scores, trainer.version, spec.epsilon)
    if all(s.prompt_version is None for s in samples):
        for key in ("stale_prefix_tokens", "mismatch_kl_stale_prefix",
                    "mismatch_kl_fresh_prefix"):
            record[key] = None  # this engine does not report prompt-KV versions
    t1 = time.perf_counter()
    record["loss"] = trainer.step(samples)
    record.update(score_s=round(t1 - t0, 2), train_s=round(time.perf_counter() - t1, 2))
    return record


async def _rollout(engine: Any, spec: RowSpec, k: int) -> list[Sample]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    prompt = spec.prompts[k % len(spec.prompts)]
    params = SamplingParams(n=spec.samples, temperature=spec.temperature, top_p=spec.top_p,
                            top_k=spec.top_k, max_tokens=spec.max_tokens, logprobs=0,
                            seed=spec.seed + k, output_kind=RequestOutputKind.FINAL_ONLY)
    final = None
    async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params,
                                     request_id=f"{spec.key}-g{k}"):
        final = out
    return samples_of(final, prompt, spec.max_tokens)


Emit = Callable[[dict, list[Sample]], None]


async def _engine_row(spec: RowSpec, trainer: Any, emit: Emit) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_rl_compat.online.push import StockPush, TransactionPush
    from vllm_rl_compat.parity.rollout import engine_settings

    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
        model=spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len,
        enforce_eager=spec.enforce_eager, seed=spec.seed, **spec.engine_kwargs))
    push: Any = None
    try:
        settings = engine_settings(engine.vllm_config)
        push = (await TransactionPush.create(engine) if spec.weight_fix
                else StockPush(engine, spec.model))
        if not spec.weight_fix:
            await engine.update_weight_version("0")
        start_s = time.perf_counter() - t0
        tasks: dict[int, asyncio.Task] = {}

        def submit(step: int, part: slice) -> None:
            for k in list(range(step * spec.groups, (step + 1) * spec.groups))[part]:
                if step < spec.steps and k not in tasks:
                    tasks[k] = asyncio.create_task(_rollout(engine, spec, k))

        half = slice(0, (spec.groups + 1) // 2)
        submit(0, slice(None))
        for step in range(spec.steps):
            t1 = time.perf_counter()
            batch = [s for k in range(step * spec.groups, (step + 1) * spec.groups)
                     for s in await tasks.pop(k)]
            wait_s = time.perf_counter() - t1
            submit(step + 1, half)  # sampled while the trainer steps
            version = trainer.version
            record = await asyncio.to_thread(_train, trainer, batch, spec)
            t2 = time.perf_counter()
            if step + 1 < spec.steps:
                weights = await asyncio.to_thread(trainer.engine_weights)
                submit(step + 1, slice(None))  # in flight across the update
                await push(weights, trainer.version)
            emit({"step": step, "weight_version": version, **record,
                  "wait_s": round(wait_s, 2), "push_s": round(time.perf_counter() - t2, 2)},
                 batch)
        return {"engine_settings": settings, "engine_start_s": round(start_s, 1),
                "weight_route": push.route}
    finally:
        if push is not None:
            push.close()
        engine.shutdown()
        del engine


def _eos_ids(model_dir: str) -> set[int]:
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _reference_row(spec: RowSpec, trainer: Any, emit: Emit) -> dict[str, Any]:
    """No engine: the trainer samples each step's batch with its current weights."""
    eos = _eos_ids(spec.model)
    for step in range(spec.steps):
        batch = []
        for k in range(step * spec.groups, (step + 1) * spec.groups):
            prompt = spec.prompts[k % len(spec.prompts)]
            for tokens, ended in trainer.generate(prompt, spec.samples, spec.max_tokens, eos,
                                                  spec.seed + k):
                batch.append(Sample(prompt, tokens, [], [trainer.version] * len(tokens),
                                    trainer.version, reward(len(tokens), ended, spec.max_tokens),
                                    ended))
        version = trainer.version
        emit({"step": step, "weight_version": version, **_train(trainer, batch, spec)}, batch)
    return {"engine_settings": None, "engine_start_s": None,
            "weight_route": "none (the trainer samples with its own weights)"}


def samples_path(spec: RowSpec) -> str:
    """Where the row writes every step's samples (tokens, engine logprobs,
    versions), one JSON line per step: the data behind its metrics."""
    return spec.steps_path.replace(".steps.jsonl", ".samples.jsonl")


def run_row(spec: RowSpec) -> None:
    """Run the row; steps go to ``steps_path`` as they end, then the result."""
    import torch

    from vllm_rl_compat.online.trainer import OnlineTrainer
    from vllm_rl_compat.parity.reference import SamplingSpec

    torch.manual_seed(spec.seed)
    trainer = OnlineTrainer(spec.model, spec.reference, spec.dtype,
                            SamplingSpec(spec.temperature, spec.top_p, spec.top_k),
                            spec.lr, spec.epsilon, spec.samples)
    steps_file = open(spec.steps_path, "w")
    samples_file = open(samples_path(spec), "w")

    def emit(record: dict[str, Any], batch: list[Sample]) -> None:
        samples_file.write(json.dumps({"step": record["step"],
                                       "samples": [asdict(s) for s in batch]}) + "\n")
        samples_file.flush()
        steps_file.write(json.dumps(record) + "\n")
        steps_file.flush()

    t0 = time.perf_counter()
    with steps_file, samples_file:
        result = (asyncio.run(_engine_row(spec, trainer, emit)) if spec.engine
                  else _reference_row(spec, trainer, emit))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    Path(spec.result_path).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m vllm_rl_compat.online.row SPEC.json")
    run_row(RowSpec(**json.loads(Path(sys.argv[1]).read_text())))
