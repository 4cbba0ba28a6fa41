"""Weight updates through ``vllm serve``'s RL routes (issue 12), real servers.

One RL-mode server (``python -m vllm.entrypoints.openai.api_server``, what
``vllm serve`` runs) with a control token, driven by a separate trainer
process that uses only vLLM's trainer API with our ``rl_compat_gloo``
backend; a second server in vLLM's dev mode shows that ``/collective_rpc``
cannot change weights and that vLLM's open RL routes are replaced by guarded
ones. Exactness: forced-token prompt logprobs served after A -> B -> A equal
the server's own start-up values on A bit for bit, and B's differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from test_frontends import _free_port, _wait_ready

pytestmark = pytest.mark.engine

TESTS = Path(__file__).parent
TOKEN = "control-" + os.urandom(8).hex()
PROMPTS = [list(range(200, 232)), [17, 4005, 923, 31000, 77, 5, 1234, 9999, 42, 300] * 3]
ROUTES = [("POST", "/pause"), ("POST", "/resume"), ("GET", "/is_paused"),
          ("POST", "/init_weight_transfer_engine"), ("POST", "/start_weight_update"),
          ("POST", "/update_weights"), ("POST", "/finish_weight_update"),
          ("POST", "/update_weight_version"), ("GET", "/weight_info"),
          ("POST", "/abort_weight_update")]


def _server(model: str, log: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "512",
           "--enforce-eager", "--max-logprobs", "-1", "--enable-scale-out"]
    env = {**os.environ, "VLLM_RL_COMPAT": "1", **extra_env}
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _wait_ready(port, proc)
    return proc, port


@pytest.fixture(scope="module")
def servers(tiny_model, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Both servers on model A, started concurrently (one engine each)."""
    logs = tmp_path_factory.mktemp("serve")
    a = tiny_model("llama-untied", 0)
    envs = {"rl": {"VLLM_RL_COMPAT_CONTROL_TOKEN": TOKEN},
            "dev": {"VLLM_RL_COMPAT_CONTROL_TOKEN": TOKEN, "VLLM_SERVER_DEV_MODE": "1"}}
    with ThreadPoolExecutor(2) as pool:
        started = {k: pool.submit(_server, a, logs / f"{k}.log", e) for k, e in envs.items()}
        procs = {k: f.result() for k, f in started.items()}
    yield {"dir_a": a, "dir_b": tiny_model("llama-untied", 1), "logs": logs,
           **{k: port for k, (_, port) in procs.items()}}
    for proc, _ in procs.values():
        proc.terminate()
        proc.wait(timeout=60)


def call(port: int, method: str, path: str, body: Any = None,
         token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else (b"{}" if method == "POST"
                                                               else None)
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def forced_logprobs(port: int) -> list[list[float]]:
    """Prompt logprob of every forced token, as served."""
    rows = []
    for prompt in PROMPTS:
        status, body = call(port, "POST", "/v1/completions",
                            {"prompt": prompt, "max_tokens": 1, "prompt_logprobs": 0},
                            token=None)
        assert status == 200, body
        plp = body["choices"][0]["prompt_logprobs"]
        rows.append([plp[i][str(tok)]["logprob"] for i, tok in enumerate(prompt) if i > 0])
    return rows


def version(port: int) -> str:
    status, body = call(port, "GET", "/weight_info")
    assert status == 200, body
    return body["weight_version"]


def test_routes_need_the_token(servers) -> None:
    port = servers["rl"]
    before = forced_logprobs(port)
    for token in (None, "wrong-token"):
        for method, path in ROUTES:
            status, body = call(port, method, path, token=token)
            assert status == 401, (path, token, status, body)
    assert call(port, "GET", "/is_paused")[1] == {"is_paused": False}
    assert forced_logprobs(port) == before and version(port) == "0"
    # The rest of dev mode stays off.
    assert call(port, "POST", "/collective_rpc", {"method": "rl_compat_ping"})[0] == 404


def test_trainer_process_updates_server_exactly(servers) -> None:
    """A -> B -> A from a trainer process through vLLM's trainer API."""
    port = servers["rl"]
    start_a = forced_logprobs(port)
    for target, n in ((servers["dir_b"], 1), (servers["dir_a"], 2)):
        trainer = subprocess.run(
            [sys.executable, str(TESTS / "http_trainer.py"), f"http://127.0.0.1:{port}",
             str(_free_port()), "2", target],
            env={**os.environ, "VLLM_RL_COMPAT_CONTROL_TOKEN": TOKEN},
            capture_output=True, text=True, timeout=300)
        assert "TRAINER-SENT" in trainer.stdout, trainer.stderr[-3000:]
        assert version(port) == str(n)
        got = forced_logprobs(port)
        if n == 1:
            assert max(abs(x - y) for r, s in zip(got, start_a) for x, y in zip(r, s)) > 1.0
    assert got == start_a  # back on A: bit-identical to the server's start-up


def test_rejected_update_over_http(servers, tmp_path) -> None:
    """Wrong shape, truncated file, calls out of order: JSON 4xx, model and
    version unchanged, engine serving and not paused."""
    from safetensors.torch import load_file, save_file

    port = servers["rl"]
    before, v = forced_logprobs(port), version(port)
    state = load_file(str(Path(servers["dir_b"]) / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"][:3].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    truncated = tmp_path / "cut"
    truncated.mkdir()
    raw = (Path(servers["dir_b"]) / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    for path, needle in ((tmp_path, "model.norm.weight: got shape [3]"),
                         (truncated, "model unchanged")):
        assert call(port, "POST", "/start_weight_update")[0] == 200
        # staged beside the live weights (auto, CPU): the engine keeps serving
        assert call(port, "GET", "/is_paused")[1] == {"is_paused": False}
        status, body = call(port, "POST", "/update_weights",
                            {"update_info": {"source": "files", "path": str(path)}})
        assert status == 400 and needle in body["error"], body
        assert call(port, "GET", "/is_paused")[1] == {"is_paused": False}
    status, body = call(port, "POST", "/finish_weight_update")
    assert status == 409 and "no weight update is in progress" in body["error"]
    assert forced_logprobs(port) == before and version(port) == v


def test_dev_mode_collective_rpc_cannot_apply_weights(servers) -> None:
    port = servers["dev"]
    before = forced_logprobs(port)
    info = {"source": "files", "path": servers["dir_b"]}
    for method, kwargs in (("start_weight_update", {}),
                           ("update_weights", {"update_info": info}),
                           ("rl_compat_txn", {"txn": "t", "step": "start", "proof": "0"})):
        status, body = call(port, "POST", "/collective_rpc",
                            {"method": method, "kwargs": kwargs}, token=None)
        assert status >= 400, (method, body)
    # vLLM's open dev-mode copies of the RL routes are replaced by guarded ones.
    assert call(port, "POST", "/start_weight_update", token=None)[0] == 401
    assert call(port, "GET", "/is_paused")[1] == {"is_paused": False}
    assert forced_logprobs(port) == before and version(port) == "0"


def test_control_calls_refused_while_an_update_is_open(servers) -> None:
    """/pause, /resume and /update_weight_version are 409 (naming the update)
    while one is open; /abort_weight_update says what it dropped."""
    port = servers["rl"]
    v = version(port)
    assert call(port, "POST", "/start_weight_update")[0] == 200
    for path, body in (("/pause", None), ("/resume", None),
                       ("/update_weight_version", {"new_version": "forged"})):
        status, resp = call(port, "POST", path, body)
        assert status == 409 and "weight update" in resp["error"], (path, status, resp)
        assert "in progress" in resp["error"], resp
    assert call(port, "GET", "/is_paused")[1] == {"is_paused": False}
    status, resp = call(port, "POST", "/abort_weight_update")
    assert status == 200 and resp["message"].endswith("aborted; model unchanged"), resp
    assert call(port, "POST", "/abort_weight_update")[1] == {
        "message": "No weight update was open"}
    assert call(port, "POST", "/pause")[0] == 200 and call(port, "POST", "/resume")[0] == 200
    assert version(port) == v


def test_dev_mode_cannot_reset_or_reload_weights(servers) -> None:
    """vLLM's worker methods that change weights outside the transaction are
    refused in RL mode, from /collective_rpc and /weight_checker alike."""
    port = servers["dev"]
    before = forced_logprobs(port)
    status, sums = call(port, "POST", "/weight_checker", {"action": "checksum"}, token=None)
    assert status == 200 and sums["checksums"], sums
    for method in ("reset_weights", "reload_weights"):
        status, body = call(port, "POST", "/collective_rpc", {"method": method}, token=None)
        assert status >= 400, (method, status, body)
    status, body = call(port, "POST", "/weight_checker", {"action": "reset"}, token=None)
    assert status >= 400, body
    assert call(port, "POST", "/weight_checker", {"action": "checksum"}, token=None)[1] == sums
    assert forced_logprobs(port) == before


def _stream(port: int, i: int, max_tokens: int, progress: list[int],
            finals: list[Any]) -> None:
    """One streaming token-in/token-out request; counts tokens as they arrive
    (an error is kept in ``finals[i]`` for the test to report)."""
    try:
        _stream_once(port, i, max_tokens, progress, finals)
    except Exception as exc:  # noqa: BLE001 - reported by the test
        finals[i] = exc


def _stream_once(port: int, i: int, max_tokens: int, progress: list[int],
                 finals: list[Any]) -> None:
    body = {"token_ids": PROMPTS[i % 2][:8] + [i + 1], "stream": True,
            "sampling_params": {"max_tokens": max_tokens, "ignore_eos": True,
                                "temperature": 1.0, "seed": i}}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/inference/v1/generate",
                                 data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[5:])["choices"][0]
            progress[i] += len(choice.get("token_ids") or [])
            if choice.get("weight_versions") is not None:
                finals[i] = choice["weight_versions"]


def test_streams_across_an_update_report_the_split(servers) -> None:
    """N streaming requests in, N out, each with its full token budget; the
    final chunk's weight-version spans split where the update happened as
    the client saw it (tokens received before the update started are old)."""
    import threading
    import time

    port, n, max_tokens = servers["rl"], 4, 200
    forced_logprobs(port)  # one step: the label is an integer from then on
    old = int(version(port))
    progress, finals = [0] * n, [None] * n
    threads = [threading.Thread(target=_stream, args=(port, i, max_tokens, progress, finals))
               for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 300
    while min(progress) < 8:
        errors = [f for f in finals if isinstance(f, Exception)]
        assert not errors and time.monotonic() < deadline, (errors, progress)
        time.sleep(0.01)
    before = list(progress)
    for path, body in (("/start_weight_update", None),
                       ("/update_weights", {"update_info": {"source": "files",
                                                            "path": servers["dir_b"]}}),
                       ("/finish_weight_update", None)):
        assert call(port, "POST", path, body)[0] == 200, path
    after = list(progress)
    for t in threads:
        t.join(600)
    splits = []
    for i in range(n):
        spans = [(int(s["version"]), s["start"], s["end"]) for s in finals[i]]
        assert progress[i] == max_tokens and spans[0][1] == 0 and spans[-1][2] == max_tokens
        assert all(a[2] == b[1] and a[0] < b[0] for a, b in zip(spans, spans[1:]))
        assert spans[0][0] == old and spans[-1][0] in (old, old + 1)
        split = spans[0][2]
        assert before[i] <= split <= after[i] or spans[-1][0] == old and split == max_tokens
        splits.append(split)
    assert any(s < max_tokens for s in splits)  # some request spans both versions
    assert version(port) == str(old + 1)
    assert call(port, "POST", "/start_weight_update")[0] == 200  # back to A for the next test
    assert call(port, "POST", "/update_weights",
                {"update_info": {"source": "files", "path": servers["dir_a"]}})[0] == 200
    assert call(port, "POST", "/finish_weight_update")[0] == 200


def _completion_stream_choices(port: int, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every choice of a streaming ``/v1/completions`` request, chunk by chunk."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions",
                                 data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    choices = []
    with urllib.request.urlopen(req, timeout=300) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choices.extend(json.loads(line[5:])["choices"])
    return choices


def _assert_spans_cover(spans: Any, num_tokens: int, label: str) -> None:
    assert isinstance(spans, list) and spans, spans
    assert spans[0]["start"] == 0 and spans[-1]["end"] == num_tokens, spans
    assert all(a["end"] == b["start"] for a, b in zip(spans, spans[1:])), spans
    assert all(s["version"] == label for s in spans), (spans, label)


def test_completions_carry_weight_versions(servers) -> None:
    """RL mode puts each choice's weight-version spans on ``/v1/completions``
    (``weights.openai_versions``): on every choice without streaming, on the
    choice's final chunk when streaming; they cover all output tokens, with
    the server's current label; the prompt KV's spans cover the prompt."""
    port = servers["rl"]
    body = {"prompt": PROMPTS[0], "max_tokens": 5, "ignore_eos": True}
    status, resp = call(port, "POST", "/v1/completions", body, token=None)
    assert status == 200, resp
    choices = _completion_stream_choices(port, {**body, "return_token_ids": True})
    label = version(port)  # after generating: no integer label before the first step
    _assert_spans_cover(resp["choices"][0]["weight_versions"], 5, label)
    finals = [c for c in choices if c.get("finish_reason") is not None]
    assert len(finals) == 1 and finals[0] is choices[-1], choices
    assert all("weight_versions" not in c for c in choices[:-1]), choices
    streamed = sum(len(c.get("token_ids") or []) for c in choices)
    assert streamed == 5, choices
    _assert_spans_cover(finals[0]["weight_versions"], streamed, label)
    # The prompt KV's version beside them (``kv_versions``), over prompt positions.
    prompt_len = resp["usage"]["prompt_tokens"]
    _assert_spans_cover(resp["choices"][0]["prompt_weight_versions"], prompt_len, label)
    _assert_spans_cover(finals[0]["prompt_weight_versions"], prompt_len, label)
    assert all("prompt_weight_versions" not in c for c in choices[:-1]), choices
