"""The README's code blocks, run as written (issue 31).

Every Python block of README.md carries a marker line ``<!-- example: NAME -->``
and is run here from the README itself, so a README change that breaks an
example fails the suite. What a user must fill in is bound, never rewritten:
placeholders a block leaves undefined (``policy``, ``train_step``,
``trainer_model``) are defined in the namespace it runs in, and the few
strings that name the user's machine (``path/to/model``, ``engine-host:8000``,
``trainer-host``, a port) are replaced; each replacement must be found, so a
changed block fails here rather than run something else. Engines run eager
(``EAGER``), as everywhere in the suite.

The server + trainer pair runs on SmolLM2-135M (bf16, the README's model), for
three updates, each checked by the version the next rollout reports, and the
logprobs after the last against a fresh engine on the trainer's weights.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import shutdown_engine
from test_frontends import _free_port, _wait_ready

README = Path(__file__).parent.parent / "README.md"
_MARKED = re.compile(r"<!-- example: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)\n```",
                     re.S)
# Each marked block and the test that runs it.
TESTED = {"offline": "test_offline_weight_sync_and_broadcast_examples",
          "async-engine": "test_async_examples",
          "async-weight-sync": "test_async_examples",
          "weight-sync": "test_offline_weight_sync_and_broadcast_examples",
          "broadcast": "test_offline_weight_sync_and_broadcast_examples",
          "serve-rl": "test_server_and_trainer_examples",
          "trainer-http": "test_server_and_trainer_examples"}


def examples() -> dict[str, str]:
    text = README.read_text()
    return {m["name"]: m["code"] for m in _MARKED.finditer(text)}


# The suite's one change to how the examples run: engines skip torch.compile
# (2.5 minutes for SmolLM2 on 2 cores; what they show does not depend on it).
EAGER = {"LLM(model=": "LLM(enforce_eager=True, model=",
         "AsyncEngineArgs(model=": "AsyncEngineArgs(enforce_eager=True, model=",
         "--enable-scale-out": "--enable-scale-out --enforce-eager"}


def example(name: str, replace: dict[str, str] | None = None) -> str:
    """Block ``name`` with each ``old -> new`` of ``replace`` applied (each must
    occur), engines made eager (``EAGER``)."""
    code = examples()[name]
    for old, new in (replace or {}).items():
        assert old in code, f"README example {name!r} no longer contains {old!r}"
        code = code.replace(old, new)
    for old, new in EAGER.items():
        code = code.replace(old, new)
    return code


def run(name: str, namespace: dict[str, Any], replace: dict[str, str] | None = None
        ) -> dict[str, Any]:
    """Execute a Python block as a script (``__name__ == "__main__"``) in ``namespace``."""
    namespace.setdefault("__name__", "__main__")
    exec(compile(example(name, replace), f"README.md:{name}", "exec"), namespace)
    return namespace


def test_every_python_block_is_a_tested_example():
    text = README.read_text()
    python_blocks = len(re.findall(r"^```python$", text, re.M))
    marked = [m for m in _MARKED.finditer(text) if m["lang"] == "python"]
    assert len(marked) == python_blocks, "a ```python block of README.md has no example marker"
    assert set(examples()) == set(TESTED)
    assert all(TESTED[name] in globals() for name in TESTED)


# ---------------------------------------------------------- offline engine
class _TrainerModel:
    """``trainer_model`` / ``model`` of the examples: a state dict of a checkpoint."""

    def __init__(self, model_dir: str) -> None:
        from test_weight_sync import state_dict

        self.state = state_dict(model_dir)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)


@pytest.mark.engine
def test_offline_weight_sync_and_broadcast_examples(tiny_model, capsys):
    """Offline: each sampled token's logprob is log_softmax(fp32 logits / 0.7),
    as the comment says: close to a trainer's at T = 0.7, far from raw
    (``test_frontends`` checks it exactly against the engine's own logits).
    ``WeightSync``: tensors (B) then files (A), the printed version and spans
    as the comment says, and the model equals the offline example's engine on
    A. Broadcast (trainer half in a thread, engine half here, on the same
    ``sync``): version 3, and the model changed."""
    import torch

    from test_weight_sync import forced_logprobs, max_diff
    from vllm_rl_compat.parity.reference import ReferenceScorer, SamplingSpec

    a, b = tiny_model("llama-untied", 0), tiny_model("llama-untied", 1)
    ns = run("offline", {}, {"path/to/model": a})
    llm, out = ns["llm"], ns["out"]
    try:
        comp = out[0].outputs[0]
        tokens = list(comp.token_ids)
        assert len(tokens) == len(comp.logprobs) > 0
        got = [step[tok].logprob for tok, step in zip(tokens, comp.logprobs)]
        prompt = list(out[0].prompt_token_ids)
        # The trainer (HF, fp32 head) at the sampling temperature, and raw (T = 1).
        at_t, raw = (ReferenceScorer(a, spec=SamplingSpec(temperature=t)).score(prompt, tokens)
                     for t in (0.7, 1.0))
        err_t, err_raw = (sum(abs(g - w) for g, w in zip(got, want)) / len(got)
                          for want in (at_t, raw))
        assert err_t < 0.05 and err_t < err_raw / 4, (err_t, err_raw)
        ref_a = forced_logprobs(llm)
    finally:
        shutdown_engine(llm)

    ns = run("weight-sync", {"trainer_model": _TrainerModel(b)},
             {"path/to/model": a, "/ckpt/step-100": a})
    llm, sync = ns["llm"], ns["sync"]
    try:
        assert capsys.readouterr().out.splitlines()[-1] == "2 [(2, 0, 8)]"
        assert forced_logprobs(llm) == ref_a
        code = example("broadcast", {"trainer-host": "127.0.0.1", "29555": str(_free_port()),
                                     "num_receivers=2": "num_receivers=1"})
        trainer_half, engine_half = code.split("# engine process, at the same time")
        shared = {"__name__": "__main__", "torch": torch, "model": _TrainerModel(b),
                  "sync": sync}
        errors: list[BaseException] = []

        def trainer() -> None:
            try:
                exec(compile(trainer_half, "README.md:broadcast (trainer)", "exec"), shared)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=trainer)
        thread.start()
        while "secret" not in shared and thread.is_alive():  # the out-of-band hand-over
            thread.join(0.05)
        exec(compile(engine_half, "README.md:broadcast (engine)", "exec"), shared)
        thread.join(120)
        assert not errors, errors
        assert sync.version == 3
        # B arrived (the model changed); exactness of the broadcast itself is
        # test_weight_sync's and test_weight_layouts' (bit for bit, fresh engines)
        assert max_diff(forced_logprobs(llm), ref_a) > 1.0
    finally:
        shutdown_engine(llm)


# ------------------------------------------------------------- async engine
@pytest.mark.engine
def test_async_examples(tiny_model):
    """``AsyncLLM.from_engine_args`` as written, then the ``AsyncWeightSync``
    block on it (top-level ``await``, as in a notebook or an async main)."""
    a, b = tiny_model("llama-untied", 0), tiny_model("llama-untied", 1)
    ns = run("async-engine", {}, {"path/to/model": a})
    engine = ns["engine"]
    code = example("async-weight-sync")
    body = "async def _example():\n" + "".join(f"    {line}\n" for line in code.splitlines())
    body += "    return sync\n"
    scope = {"engine": engine, "state_dict": _TrainerModel(b).state_dict()}
    try:
        exec(compile(body, "README.md:async-weight-sync", "exec"), scope)
        sync = asyncio.run(scope["_example"]())
        assert sync.version == 1
        assert [r["overlapped"] for r in sync.last_apply] == [True]
    finally:
        engine.shutdown()


# --------------------------------------------------- server + trainer (HTTP)
@pytest.mark.engine
def test_server_and_trainer_examples(tmp_path, monkeypatch):
    """``vllm serve`` (as the README's python -m form) and the trainer loop,
    three updates on SmolLM2-135M: each rollout reports the version it was
    sampled with, and after the last update the served logprobs equal a fresh
    engine's on the trainer's weights, bit for bit."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from test_rl_http import call
    from vllm_rl_compat.models import default_model_dir

    model = str(default_model_dir(progress=False))
    port = _free_port()
    script = example("serve-rl", {
        "vllm serve MODEL": f"exec python -m vllm.entrypoints.openai.api_server --model {model}",
        "--port 8000": f"--port {port}"})
    token_file = tmp_path / "token"
    script = script.replace("\n", f'\necho "$VLLM_RL_COMPAT_CONTROL_TOKEN" > {token_file}\n', 1)
    log = open(tmp_path / "serve.log", "w")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    server = subprocess.Popen(["bash", "-c", script], env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        _wait_ready(port, server)
        monkeypatch.setenv("VLLM_RL_COMPAT_CONTROL_TOKEN", token_file.read_text().strip())
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
        prompt_ids = AutoTokenizer.from_pretrained(model).encode("Write a haiku about rain.")
        rollouts: list[list[dict]] = []
        gen = torch.Generator().manual_seed(0)

        def train_step(policy: Any, choices: list[dict]) -> None:
            """A stand-in optimizer step: a small seeded change of every weight."""
            rollouts.append(choices)
            with torch.no_grad():
                for param in policy.parameters():
                    param.add_(torch.randn(param.shape, generator=gen).to(param.dtype)
                               * 1e-2 * param.float().std().to(param.dtype))

        run("trainer-http", {"policy": policy, "num_steps": 3, "prompt_ids": prompt_ids,
                             "train_step": train_step},
            {"http://engine-host:8000": f"http://127.0.0.1:{port}",
             "trainer-host": "127.0.0.1", "29555": str(_free_port())})
        versions = [[span["version"] for c in choices for span in c["weight_versions"]]
                    for choices in rollouts]
        assert versions == [["0"], ["1"], ["2"]]
        assert call(port, "GET", "/weight_info", token=os.environ[
            "VLLM_RL_COMPAT_CONTROL_TOKEN"])[1]["weight_version"] == "3"
        served = _prompt_logprobs_served(port, prompt_ids)
        trained = tmp_path / "trained"
        policy.save_pretrained(trained)
        AutoTokenizer.from_pretrained(model).save_pretrained(trained)
        assert served == _prompt_logprobs_fresh(str(trained), prompt_ids)
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def _prompt_logprobs_served(port: int, ids: list[int]) -> list[float]:
    from test_rl_http import call

    status, body = call(port, "POST", "/v1/completions",
                        {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0}, token=None)
    assert status == 200, body
    rows = body["choices"][0]["prompt_logprobs"]
    return [rows[i][str(tok)]["logprob"] for i, tok in enumerate(ids) if i > 0]


def _prompt_logprobs_fresh(model: str, ids: list[int]) -> list[float]:
    """The same request on a fresh offline engine with the server's settings."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, enforce_eager=True)
    try:
        out = llm.generate({"prompt_token_ids": ids},
                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        return [row[tok].logprob for tok, row in zip(ids[1:], out[0].prompt_logprobs[1:])]
    finally:
        shutdown_engine(llm)
