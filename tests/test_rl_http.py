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
import tempfile
import threading
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


# --- two clients, random interleavings and races, checked against a model ----

State = tuple  # (live weights "a"/"b", version, open, staged chunk or None, paused)


def _serial(state: State, action: tuple[str, str]) -> tuple[tuple[int, str], State]:
    """What one call must answer (status, a substring of its message) and the
    state after it, when it runs alone: the model the server must match."""
    live, ver, is_open, chunk, paused = state
    kind, arg = action
    closed = (live, ver, False, None, paused)
    if kind == "abort":
        return ((200, "aborted; model unchanged") if is_open
                else (200, "No weight update was open")), closed
    if kind == "start":
        return ((409, "in progress"), state) if is_open else ((200, ""), (*state[:2], True,
                                                                          None, paused))
    if not is_open:
        return (409, "no weight update is in progress"), state
    if kind == "update":
        if chunk is not None:  # every name a second time: refused before its shapes
            return (400, "model unchanged"), closed
        if arg == "bad":
            return (400, "got shape [3]"), closed
        return (200, ""), (live, ver, True, arg, paused)
    if chunk is None:  # finish with nothing sent
        return (400, "model unchanged"), closed
    return (200, ""), (chunk, ver + 1, False, None, paused)


def _race_outcomes(state: State, first: tuple[str, str], second: tuple[str, str]
                   ) -> list[tuple[tuple[tuple[int, str], tuple[int, str]], State]]:
    """Every answer pair two concurrent calls may give, with the state each
    leaves: either serial order, or (an abort racing a step that waits) the
    step stopped by the abort, which says so, with the model unchanged."""
    out = []
    for a, b, flip in ((first, second, False), (second, first, True)):
        ans_a, mid = _serial(state, a)
        ans_b, end = _serial(mid, b)
        out.append((((ans_b, ans_a) if flip else (ans_a, ans_b)), end))
    live, ver, is_open, _, paused = state
    kinds = {first[0], second[0]}
    if is_open and "abort" in kinds and kinds & {"update", "finish"}:
        stopped, aborted = (400, "aborted by abort_weight_update"), (200, "aborted")
        pair = (stopped, aborted) if first[0] != "abort" else (aborted, stopped)
        out.append((pair, (live, ver, False, None, paused)))
    return out


def _answer(status: int, body: Any) -> tuple[int, str]:
    body = body if isinstance(body, dict) else {}
    return status, str(body.get("error") or body.get("message") or "")


def _matches(got: tuple[int, str], want: tuple[int, str]) -> bool:
    return got[0] == want[0] and want[1] in got[1]


def _open_writer(fifo: Path) -> int | None:
    """The write end of ``fifo`` once a reader has opened it (a non-blocking
    open for writing succeeds only then), else ``None``."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return None


def _until(what: Any, timeout: float = 120.0) -> Any:
    """Poll a condition the server reports until it holds (the bound only
    turns a hang into a failure); returns its value."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := what()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)
    return value


def _header_bytes(file: Path) -> bytes:
    raw = file.read_bytes()
    return raw[:8 + int.from_bytes(raw[:8], "little")]


def test_two_clients_model_based_over_http(servers, tmp_path_factory) -> None:
    """Two clients fire random sequences of start / update (A, B or a bad
    tensor) / finish / abort / pause / resume / version label over
    the RL routes, and races: two control calls sent at once from the two
    clients. After every step, against a model: each answer is the model's
    (for a race, one of its serial orders, or a waiting step stopped by an
    abort that says so); served logprobs are exactly the last committed
    weights'; ``/weight_info`` names that commit; ``/is_paused`` is the
    callers' pause and nothing else. A race first brings the update to a
    state worth racing in (as is, open, open with A sent). A step that carries the id of an ended
    update (a request delivered after its client timed out, aborted and
    started again) is refused and leaves the open update alone. Sender
    faults: a sender that stalls (an abort ends the waiting update; the next
    one stages only after the stalled read stops) or dies mid-header (the
    update fails by itself, model unchanged). Bounded and derandomised (8 sequences of
    up to 10 steps; a failing one is printed as the steps to replay)."""

    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
    from safetensors.torch import load_file, save_file

    port = servers["rl"]
    bad = tmp_path_factory.mktemp("bad-http")
    state = load_file(str(Path(servers["dir_b"]) / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"][:3].clone()
    save_file(state, str(bad / "model.safetensors"))
    paths = {"a": servers["dir_a"], "b": servers["dir_b"], "bad": str(bad)}

    def send(action: tuple[str, str], update_id: str | None = None) -> tuple[int, str]:
        kind, arg = action
        body = ({"update_info": {"source": "files", "path": paths[arg]}}
                if kind == "update" else {})
        if update_id is not None:
            body["update_id"] = update_id
        status, answer = call(port, "POST", f"/{kind}_weight_update" if kind != "update"
                              else "/update_weights", body)
        if kind == "start" and status == 200:
            started.append(answer["update_id"])
        return _answer(status, answer)

    def load(which: str) -> None:
        for action in (("start", ""), ("update", which), ("finish", "")):
            assert send(action)[0] == 200, action

    started: list[str] = []  # ids /start_weight_update answered
    load("b")
    refs = {"b": forced_logprobs(port)}
    load("a")
    refs["a"] = forced_logprobs(port)
    steps = (st.sampled_from(["start", "finish", "abort"]).map(lambda k: (k, ""))
             | st.sampled_from(["a", "b", "bad"]).map(lambda w: ("update", w)))

    class TwoClients(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.state: State = ("a", int(version(port)), False, None, False)

        @rule(action=steps)
        def one_call(self, action: tuple[str, str]) -> None:
            want, after = _serial(self.state, action)
            got = send(action)
            assert _matches(got, want), (action, got, want, self.state)
            self.state = after

        @rule(prep=st.sampled_from(["as is", "open", "open, A sent"]), first=steps,
              second=steps)
        def race(self, prep: str, first: tuple[str, str], second: tuple[str, str]) -> None:
            if self.state[4]:  # paused by a caller: resume first (checked)
                self.pause_or_resume()
            if prep != "as is" and not self.state[2]:
                self.one_call(("start", ""))
            if prep == "open, A sent" and self.state[2] and self.state[3] is None:
                self.one_call(("update", "a"))
            barrier, got = threading.Barrier(2), [None, None]

            def client(i: int, action: tuple[str, str]) -> None:
                barrier.wait()
                got[i] = send(action)

            threads = [threading.Thread(target=client, args=(i, a))
                       for i, a in enumerate((first, second))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
            options = _race_outcomes(self.state, first, second)
            fits = [end for (wa, wb), end in options
                    if _matches(got[0], wa) and _matches(got[1], wb)]
            assert fits, (first, second, got, options)
            if len(set(fits)) > 1 and not self.state[4]:  # the answers leave it open:
                served = forced_logprobs(port)  # which weights serve tells
                fits = [end for end in fits if refs[end[0]] == served]
            assert len(set(fits)) == 1, (first, second, got, fits)
            self.state = fits[0]

        @rule(kind=st.sampled_from(["update", "finish", "abort"]))
        def late_step_of_an_ended_update(self, kind: str) -> None:
            """A step carrying the id of an update that has ended (its client
            timed out, aborted and started again, and the request arrives
            now): refused, nothing done, whatever is open now untouched."""
            live, ver, is_open, chunk, paused = self.state
            old = next(i for i in reversed(started) if not (is_open and i == started[-1]))
            status, text = send((kind, "b"), update_id=old)
            if kind == "abort":
                assert (status, text) == (200, f"Weight update {old[:8]} is not open; "
                                               f"nothing dropped"), text
            elif is_open:
                assert status == 409 and "is not the open one" in text, text
            else:
                assert status == 409 and "no weight update is in progress" in text, text

        @rule(kind=st.sampled_from(["stalled", "killed"]))
        def sender_fault(self, kind: str) -> None:
            """The update's bytes come from a sender that connects and then
            stalls (a client's abort must end the waiting update, and the next
            update may stage only once the stalled read is over) or dies halfway
            through the header (the update fails by itself, model unchanged).
            The sender is a FIFO the staging thread reads."""
            live, ver, is_open, _, paused = self.state
            if is_open or paused:
                return
            fifo_dir = Path(tempfile.mkdtemp(dir=bad))
            fifo = fifo_dir / "model.safetensors"
            os.mkfifo(fifo)
            assert send(("start", ""))[0] == 200
            uid, answer = started[-1], []
            paths["fifo"] = str(fifo_dir)
            waiting = threading.Thread(target=lambda: answer.append(
                send(("update", "fifo"), update_id=uid)))
            waiting.start()
            writer = _until(lambda: _open_writer(fifo))  # the staging thread reads it
            try:
                if kind == "killed":  # mid-header: the first read of the file
                    header = _header_bytes(Path(paths["b"]) / "model.safetensors")
                    os.write(writer, header[:len(header) // 2])
                    os.close(writer)
                    writer = None
                    waiting.join(300)
                    assert answer and answer[0][0] == 400, answer
                    assert "header cut short" in answer[0][1], answer
                    assert "model unchanged" in answer[0][1], answer
                else:
                    assert answer == []  # still waiting on the sender
                    assert send(("abort", "")) == (200, f"Weight update {uid[:8]} "
                                                        f"aborted; model unchanged")
                    waiting.join(300)  # ended before the abort answered
                    assert answer[0][0] == 400 and "aborted by abort_weight_update" in answer[0][1], answer
                    os.write(writer, _header_bytes(Path(paths["b"]) / "model.safetensors"))
            finally:
                if writer is not None:
                    os.close(writer)
            _until(lambda: self.idle())  # the aborted read has stopped
            self.state = (live, ver, False, None, paused)

        def idle(self) -> bool:
            """Whether a new update may stage: a start succeeds (then dropped)
            instead of being refused while an aborted read still runs."""
            status, text = send(("start", ""))
            if status == 200:
                assert send(("abort", ""))[0] == 200
                return True
            assert status == 400 and "still runs an aborted update" in text, text
            return False

        @rule()
        def pause_or_resume(self) -> None:
            live, ver, is_open, chunk, paused = self.state
            status, body = call(port, "POST", "/resume" if paused else "/pause")
            if is_open:
                assert status == 409 and "in progress" in body["error"], body
            else:
                assert status == 200, body
                self.state = (live, ver, is_open, chunk, not paused)

        @rule()
        def relabel(self) -> None:
            status, body = call(port, "POST", "/update_weight_version",
                                {"new_version": str(self.state[1])})
            assert status == (409 if self.state[2] else 200), body

        @invariant()
        def holds(self) -> None:
            live, ver, is_open, _, paused = self.state
            assert call(port, "GET", "/is_paused")[1] == {"is_paused": paused}
            assert version(port) == str(ver)
            if not paused:
                assert forced_logprobs(port) == refs[live]

        def teardown(self) -> None:
            call(port, "POST", "/abort_weight_update")
            if self.state[4]:
                call(port, "POST", "/resume")
            if self.state[0] != "a":
                load("a")

    run_state_machine_as_test(TwoClients, settings=settings(
        max_examples=8, stateful_step_count=10, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))
