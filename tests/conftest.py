"""Shared test set-up: RL mode on in this process, tiny models, shared engines.

vLLM loads plugins once per process, so the switch is set here, before any
test imports vLLM: engines built in the pytest process run in RL mode.
Engines that must run with the switch off (or the plugin disabled) run in a
child process through ``run_engine_subprocess`` with their own environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ["VLLM_RL_COMPAT"] = "1"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

TESTS = Path(__file__).parent
ENGINE_KWARGS: dict[str, Any] = {"dtype": "bfloat16", "max_model_len": 512, "seed": 0}


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., str]:
    """``tiny_model(kind, seed=0)`` -> path of a seeded tiny model (built once, cached)."""
    from vllm_rl_compat.models import tiny_model_dir

    return lambda kind, seed=0: str(tiny_model_dir(kind, seed=seed))


def run_engine_subprocess(request: dict[str, Any], env: dict[str, str],
                          timeout: float = 600) -> dict[str, Any]:
    """Run ``tests/engine_runner.py`` with ``request`` in a fresh interpreter.

    A fresh process is the only honest way to start an engine with a different
    plugin state: vLLM loads plugins once per process.
    """
    full_env = {**os.environ, **env}
    proc = subprocess.run(
        [sys.executable, str(TESTS / "engine_runner.py")],
        input=json.dumps(request), capture_output=True, text=True,
        env=full_env, timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"engine_runner failed:\n{proc.stderr[-4000:]}")
    from engine_runner import MARKER

    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    assert lines, f"engine_runner printed no result:\n{proc.stdout[-4000:]}"
    return json.loads(lines[-1][len(MARKER):])


@pytest.fixture(scope="module")
def llm_factory() -> Iterator[Callable[..., Any]]:
    """Build ``LLM`` engines for a module; all are shut down when it ends."""
    from vllm import LLM

    made: list[Any] = []

    def make(model: str, **kwargs: Any) -> Any:
        llm = LLM(model=model, **{**ENGINE_KWARGS, **kwargs})
        made.append(llm)
        return llm

    yield make
    for llm in made:
        shutdown_engine(llm)


_STOPPED: "weakref.WeakSet[Any]" = weakref.WeakSet()


def shutdown_engine(llm: Any) -> None:
    """Stop an offline ``LLM`` once (a test and its module's factory may both
    ask). Synchronously: an engine built with the in-process executor shares
    vLLM's global distributed state with the next one, so a stop running
    beside the next start can tear that state down under it (seen: "pipeline
    model parallel group is not initialized")."""
    if llm in _STOPPED:
        return
    _STOPPED.add(llm)
    llm.llm_engine.engine_core.shutdown()
