"""One engine run ("row") in its own process: sample, keep each token's logprob.

RL mode is chosen per process (vLLM loads general plugins once per process,
from ``VLLM_RL_COMPAT``), so every row runs ``python -m
vllm_rl_compat.parity.rollout SPEC.json OUT.json`` in a fresh interpreter with
its own environment.  The spec and the result are JSON files; the child's
console output goes to a log file the parent can show on failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RolloutSpec:
    """Everything one engine run needs; serialised to JSON for the child."""

    model: str
    prompts: list[list[int]]
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 64
    seed: int = 0
    dtype: str = "bfloat16"
    max_model_len: int = 1024
    enforce_eager: bool = True
    env: dict[str, str] = field(default_factory=dict)
    engine_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutResult:
    """Sampled tokens with the engine's logprob for each, plus timings."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str | None]
    engine_start_s: float
    generate_s: float
    engine_settings: dict[str, Any]

    @property
    def output_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.generate_s if self.generate_s > 0 else 0.0


class RolloutError(RuntimeError):
    """The engine subprocess failed; the message carries the end of its log."""


def run_rollout(spec: RolloutSpec, workdir: Path, name: str,
                timeout_s: float = 900.0) -> RolloutResult:
    """Run ``spec`` in a child process and return its result.

    ``workdir`` receives ``NAME.spec.json``, ``NAME.result.json`` and
    ``NAME.log``.  The child's environment is ours plus ``spec.env``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path = workdir / f"{name}.spec.json"
    out_path = workdir / f"{name}.result.json"
    log_path = workdir / f"{name}.log"
    spec_path.write_text(json.dumps(asdict(spec)))
    out_path.unlink(missing_ok=True)
    env = {**os.environ, **spec.env}
    cmd = [sys.executable, "-m", "vllm_rl_compat.parity.rollout",
           str(spec_path), str(out_path)]
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RolloutError(f"row {name!r} timed out after {timeout_s:.0f} s; "
                               f"log: {log_path}") from exc
    if proc.returncode != 0 or not out_path.is_file():
        raise RolloutError(f"row {name!r} failed (exit {proc.returncode}); "
                           f"log {log_path} ends with:\n{_tail(log_path)}")
    return RolloutResult(**json.loads(out_path.read_text()))


def _tail(path: Path, lines: int = 25) -> str:
    """Last lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _engine_settings(llm: Any) -> dict[str, Any]:
    """The settings that matter for the mismatch, as the engine resolved them."""
    cfg = llm.llm_engine.vllm_config
    return {
        "logprobs_mode": str(cfg.model_config.logprobs_mode),
        "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
        "async_scheduling": cfg.scheduler_config.async_scheduling,
        "head_dtype": str(getattr(cfg.model_config, "head_dtype", None)),
        "worker_extension_cls": cfg.parallel_config.worker_extension_cls,
        "additional_config": cfg.additional_config,
    }


def _child_main(spec_path: str, out_path: str) -> None:
    """Child side: build the engine, generate, write the result JSON."""
    spec = RolloutSpec(**json.loads(Path(spec_path).read_text()))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len,
              enforce_eager=spec.enforce_eager, seed=spec.seed, **spec.engine_kwargs)
    started = time.perf_counter()
    params = [SamplingParams(temperature=spec.temperature, top_p=spec.top_p,
                             top_k=spec.top_k, max_tokens=spec.max_tokens,
                             logprobs=0, seed=spec.seed + i)
              for i in range(len(spec.prompts))]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec.prompts]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    result = RolloutResult(
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        logprobs=[_sampled_logprobs(o.outputs[0]) for o in outputs],
        finish_reasons=[o.outputs[0].finish_reason for o in outputs],
        engine_start_s=started - t0, generate_s=done - started,
        engine_settings=_engine_settings(llm),
    )
    Path(out_path).write_text(json.dumps(asdict(result), default=str))


def _sampled_logprobs(completion: Any) -> list[float]:
    """The engine's logprob of each sampled token (``logprobs=0`` keeps just it)."""
    return [float(step[token].logprob)
            for token, step in zip(completion.token_ids, completion.logprobs)]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m vllm_rl_compat.parity.rollout SPEC.json OUT.json")
    _child_main(sys.argv[1], sys.argv[2])
