"""One engine run ("row") in its own process: sample, keep each token's logprob.

RL mode is chosen per process (vLLM loads general plugins once per process,
from ``VLLM_RL_COMPAT``), so every row runs ``python -m
vllm_rl_compat.parity.rollout SPEC.json OUT.json`` in a fresh interpreter with
its own environment.  The spec and the result are JSON files; the child's
console output goes to a log file the parent can show on failure.  Rows run
strictly one engine at a time; only the next row's Python start-up overlaps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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
    # Reload the model's own weights through the RL weight-sync path before
    # sampling: logprobs must still match the trainer after an update.
    weight_roundtrip: bool = False
    # ``check --layers``: record the engine's hidden states while it samples
    # (``parity.capture``) into this file.
    capture_path: str | None = None


@dataclass
class RolloutResult:
    """Sampled tokens with the engine's logprob for each, plus timings."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str | None]
    engine_start_s: float
    generate_s: float
    engine_settings: dict[str, Any]
    request_ids: list[str] = field(default_factory=list)  # one per prompt

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
    return run_rollouts([(name, spec)], workdir, timeout_s=timeout_s)[0]


def run_rollouts(items: Sequence[tuple[str, RolloutSpec]], workdir: Path,
                 on_start: Callable[[int, str], None] = lambda i, name: None,
                 timeout_s: float = 900.0) -> list[RolloutResult]:
    """Run the rows one engine at a time, each in its own process.

    The next row's interpreter is started while the current row runs, so its
    ``import vllm`` (10-20 s here) overlaps with work instead of adding to the
    wall time; it waits for a "go" file before building its engine, so two
    engines never run at once and each row's timings stay its own.
    """
    children = [_Child(name, spec, workdir) for name, spec in items[:1]]
    results = []
    try:
        for i, (name, _) in enumerate(items):
            if i + 1 < len(items):
                children.append(_Child(*items[i + 1], workdir))
            on_start(i, name)
            results.append(children[i].go_and_wait(timeout_s))
    finally:
        for child in children:
            child.kill()
    return results


class _Child:
    """One row's process: launched early, released by creating its go file."""

    def __init__(self, name: str, spec: RolloutSpec, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.spec_path = workdir / f"{name}.spec.json"
        self.out_path = workdir / f"{name}.result.json"
        self.go_path = workdir / f"{name}.go"
        self.log_path = workdir / f"{name}.log"
        for path in (self.out_path, self.go_path):
            path.unlink(missing_ok=True)
        self.spec_path.write_text(json.dumps(asdict(spec)))
        cmd = [sys.executable, "-m", "vllm_rl_compat.parity.rollout",
               str(self.spec_path), str(self.out_path), str(self.go_path)]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env={**os.environ, **spec.env}, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def go_and_wait(self, timeout_s: float) -> RolloutResult:
        """Release the child, wait for it, and read its result."""
        self.go_path.touch()
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise RolloutError(f"row {self.name!r} timed out after {timeout_s:.0f} s; "
                               f"log: {self.log_path}") from exc
        if code != 0 or not self.out_path.is_file():
            raise RolloutError(f"row {self.name!r} failed (exit {code}); log "
                               f"{self.log_path} ends with:\n{_tail(self.log_path)}")
        return RolloutResult(**json.loads(self.out_path.read_text()))

    def kill(self) -> None:
        """Stop this child if it still runs (a failed or interrupted check)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _wait_for_go(go_path: Path, parent_pid: int) -> None:
    """Block until the parent creates ``go_path``; exit if the parent is gone."""
    while not go_path.exists():
        if os.getppid() != parent_pid:
            sys.exit("parent exited before releasing this row")
        time.sleep(0.1)


def _tail(path: Path, lines: int = 25) -> str:
    """Last lines of a log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def engine_settings(cfg: Any) -> dict[str, Any]:
    """The settings that matter for the mismatch, as the engine resolved them
    (``cfg``: its ``VllmConfig``)."""
    return {
        "logprobs_mode": str(cfg.model_config.logprobs_mode),
        "enable_prefix_caching": cfg.cache_config.enable_prefix_caching,
        "async_scheduling": cfg.scheduler_config.async_scheduling,
        "head_dtype": str(getattr(cfg.model_config, "head_dtype", None)),
        "worker_extension_cls": cfg.parallel_config.worker_extension_cls,
        "additional_config": cfg.additional_config,
    }


def _child_main(spec_path: str, out_path: str, go_path: str | None) -> None:
    """Child side: import vLLM, wait for the go file, build, generate, write JSON."""
    parent = os.getppid()
    spec = RolloutSpec(**json.loads(Path(spec_path).read_text()))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if go_path:
        _wait_for_go(Path(go_path), parent)

    t0 = time.perf_counter()
    llm = LLM(model=spec.model, dtype=spec.dtype, max_model_len=spec.max_model_len,
              enforce_eager=spec.enforce_eager, seed=spec.seed, **spec.engine_kwargs)
    started = time.perf_counter()
    settings = engine_settings(llm.llm_engine.vllm_config)
    if spec.weight_roundtrip:
        settings.update(_reload_same_weights(llm, spec.model))
        started = time.perf_counter()
    params = [SamplingParams(temperature=spec.temperature, top_p=spec.top_p,
                             top_k=spec.top_k, max_tokens=spec.max_tokens,
                             logprobs=0, seed=spec.seed + i)
              for i in range(len(spec.prompts))]
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec.prompts]
    if spec.capture_path:
        from vllm_rl_compat.parity import capture

        llm.collective_rpc(capture.install, args=(spec.max_tokens,))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    done = time.perf_counter()
    if spec.capture_path:
        llm.collective_rpc(capture.dump, args=(spec.capture_path,))
    result = RolloutResult(
        token_ids=[list(o.outputs[0].token_ids) for o in outputs],
        logprobs=[_sampled_logprobs(o.outputs[0]) for o in outputs],
        finish_reasons=[o.outputs[0].finish_reason for o in outputs],
        engine_start_s=started - t0, generate_s=done - started,
        engine_settings=settings, request_ids=[o.request_id for o in outputs],
    )
    Path(out_path).write_text(json.dumps(asdict(result), default=str))


def _reload_same_weights(llm: Any, model: str) -> dict[str, Any]:
    """One weight update with the checkpoint already loaded (version +1)."""
    from vllm_rl_compat.weight_sync import WeightSync

    sync = WeightSync(llm)
    t0 = time.perf_counter()
    version = sync.update_from_files(model)
    return {"weight_update": {"version": version,
                              "seconds": round(time.perf_counter() - t0, 2)}}


def _sampled_logprobs(completion: Any) -> list[float]:
    """The engine's logprob of each sampled token (``logprobs=0`` keeps just it)."""
    return [float(step[token].logprob)
            for token, step in zip(completion.token_ids, completion.logprobs)]


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: python -m vllm_rl_compat.parity.rollout SPEC.json OUT.json [GO]")
    _child_main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) == 4 else None)
