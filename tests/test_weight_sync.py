"""Pause-boundary weight loading (issue 5) on real CPU engines.

Correctness criterion: after an update to model X, the prompt logprobs of
fixed (forced) token sequences equal those of a fresh engine started on X,
bit for bit (same dtype, same kernels, same shapes: the in-place reload
re-runs vLLM's weight processing, so the packed weights are identical). Only
the TP=2 engine is compared with the TP=1 reference within a tolerance (a
different split of the matmuls rounds differently); there the round trip back
to the engine's own start-up model is again exact.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_rl_compat.weight_sync import WeightSync, WeightUpdateError, token_versions
from vllm_rl_compat.weights.protocol.spec import WeightSpec, safetensors_files, safetensors_header_spec

TESTS = Path(__file__).parent
EAGER = {"enforce_eager": True}  # no compile/warm-up: quicker start for extra engines
PROMPTS = [list(range(200, 232)), [17, 4005, 923, 31000, 77, 5, 1234, 9999, 42, 300] * 3]


# ----------------------------------------------------------------- helpers
def make_llm(model: str, **kwargs: Any):
    from vllm import LLM

    from conftest import ENGINE_KWARGS

    return LLM(model=model, **{**ENGINE_KWARGS, **kwargs})


def shutdown(llm) -> None:
    from conftest import shutdown_engine

    shutdown_engine(llm)


_FRESH: dict[str, list[list[float]]] = {}


def fresh_logprobs(model: str, **kwargs: Any) -> list[list[float]]:
    """``forced_logprobs`` of a fresh engine on ``model``, stopped afterwards;
    one engine per (model, arguments) for the whole module."""
    key = json.dumps([model, kwargs], sort_keys=True)
    if key not in _FRESH:
        eng = make_llm(model, **kwargs)
        try:
            _FRESH[key] = forced_logprobs(eng)
        finally:
            shutdown(eng)
    return _FRESH[key]


def forced_logprobs(llm) -> list[list[float]]:
    """Logprob of every forced prompt token (prompt_logprobs, raw)."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [[d[tok].logprob for tok, d in zip(p[1:], o.prompt_logprobs[1:])]
            for p, o in zip(PROMPTS, outs)]


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(model_dir):
        out.update(load_file(str(f)))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRET = "test-secret-" + os.urandom(8).hex()


def start_trainer(model_dir: str, port: int, receivers: int, mode: str = "ok",
                  timeout: float = 30.0, chunk: int = 1 << 20) -> subprocess.Popen:
    """The trainer script; it reads the group's secret from its environment.
    Returns once the trainer has started up and is about to join, so the
    group's ``timeout`` (3 s in the stall case) is not spent on its imports."""
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "weight_sync_trainer.py"), "127.0.0.1", str(port),
         str(receivers), model_dir, mode, str(timeout), str(chunk)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "TEST_TRAINER_SECRET": SECRET})
    line = proc.stdout.readline()  # the script prints READY first, or dies
    if line.strip() != "TRAINER-READY":
        proc.kill()
        raise RuntimeError(f"trainer did not start: {line!r} {proc.stderr.read()[-2000:]}")
    return proc


# ``auto`` stages beside the live weights on CPU when the fast apply qualifies.
OVERLAPPED = (os.environ.get("VLLM_RL_COMPAT_FAST_RELOAD", "1") != "0"
              and os.environ.get("VLLM_RL_COMPAT_WEIGHT_STAGING", "auto") != "in_pause")


def assert_never_paused(llm, sync) -> None:
    """A failed overlapped update: generation never stopped, staging freed."""
    if OVERLAPPED:
        assert sync.last_pause_seconds == 0.0
        # the update's shadow (a kept one too) dropped, the staging thread idle
        idle = {"held": False, "busy": False, "kept": False}
        assert llm.collective_rpc("rl_compat_staging") == [idle] * sync.num_workers


def fail_after_half(llm, sync, model_dir: str, tmp_path: Path) -> None:
    """vLLM's RL calls in chunks: half of ``model_dir`` loads (into the kept
    stage, if one is kept), then a chunk with a wrong shape fails the update;
    nothing paused or held afterwards."""
    from safetensors.torch import save_file

    b = state_dict(model_dir)
    for part, tensors in (("half", {n: b[n] for n in sorted(b)[: len(b) // 2]}),
                          ("bad", {"model.norm.weight": b["model.norm.weight"][:3]})):
        (tmp_path / part).mkdir()
        save_file(tensors, tmp_path / part / "m.safetensors")
    llm.start_weight_update()
    llm.update_weights({"update_info": {"source": "files", "path": str(tmp_path / "half")}})
    with pytest.raises(WeightUpdateError, match="wrong shapes"):
        llm.update_weights({"update_info": {"source": "files", "path": str(tmp_path / "bad")}})
        llm.finish_weight_update()
    assert_never_paused(llm, sync)


def assert_serves(llm) -> None:
    from vllm import SamplingParams

    out = llm.generate(["hello"], SamplingParams(max_tokens=4, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4


# --------------------------------------------------- spec (no engine needed)
def _spec() -> WeightSpec:
    return WeightSpec({"a.weight": ((4, 2), torch.bfloat16),
                       "b.weight": ((3,), torch.float32)}, tied_embeddings=True)


@pytest.mark.parametrize("items, expected", [
    ([("a.weight", (4, 2), torch.bfloat16)], "1 missing names: b.weight"),
    ([("a.weight", (4, 2), torch.bfloat16), ("b.weight", (3,), torch.float32),
      ("zz.weight", (1,), torch.float32)], "1 unknown names: zz.weight"),
    ([("a.weight", (2, 4), torch.bfloat16), ("b.weight", (3,), torch.float32)],
     "a.weight: got shape [2, 4], expected [4, 2]"),
    ([("a.weight", (4, 2), torch.float32), ("b.weight", (3,), torch.float32)],
     "a.weight: got dtype float32, expected bfloat16"),
    ([("a.weight", (4, 2), torch.bfloat16), ("a.weight", (4, 2), torch.bfloat16),
      ("b.weight", (3,), torch.float32)], "1 duplicate names: a.weight"),
    ([("a.weight", (4, 2), torch.bfloat16), ("b.weight", (3,), torch.float32),
      ("lm_head.weight", (4, 2), torch.bfloat16)], "send only the embedding"),
])
def test_spec_names_every_problem(items, expected):
    with pytest.raises(WeightUpdateError, match="model unchanged") as err:
        _spec().validate(items)
    assert expected in str(err.value)


def test_spec_accepts_exact_set():
    _spec().validate([("b.weight", (3,), torch.float32), ("a.weight", (4, 2), torch.bfloat16)])


def test_header_spec_reads_no_data(tmp_path, tiny_model):
    files, entries = safetensors_header_spec(tiny_model("llama-untied"))
    assert len(files) == 1 and len(entries) > 10
    assert ("lm_head.weight", (49152, 64), torch.bfloat16) in [
        (n, s, d) for n, s, d in entries if n == "lm_head.weight"]
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(WeightUpdateError, match="cannot read safetensors"):
        safetensors_header_spec(tmp_path)


# ----------------------------------------------------------------- engines
@pytest.fixture(scope="module")
def untied(tiny_model):
    """Two fresh engines: model A (seed 0) and model B (seed 1), with their
    start-up logprobs (the references) and WeightSync objects."""
    a, b = tiny_model("llama-untied", 0), tiny_model("llama-untied", 1)
    eng_a, eng_b = make_llm(a, **EAGER), make_llm(b, **EAGER)
    ctx = {"dir_a": a, "dir_b": b, "eng_a": eng_a, "eng_b": eng_b,
           "ref_a": forced_logprobs(eng_a), "ref_b": forced_logprobs(eng_b)}
    assert max_diff(ctx["ref_a"], ctx["ref_b"]) > 1.0  # the two models really differ
    ctx["sync_a"], ctx["sync_b"] = WeightSync(eng_a), WeightSync(eng_b)
    yield ctx
    shutdown(eng_a)
    shutdown(eng_b)


@pytest.mark.engine
def test_update_matches_fresh_engine_both_ways(untied):
    """A <- B's tensors (in process), B <- A's files: each equals the other fresh;
    then B <- B and B <- A staged in the pause, exact too."""
    sync_a, sync_b = untied["sync_a"], untied["sync_b"]
    assert sync_a.version == 0 and sync_b.version == 0  # weight_version_start default
    assert sync_a.update_from_tensors(state_dict(untied["dir_b"])) == 1
    fast = os.environ.get("VLLM_RL_COMPAT_FAST_RELOAD", "1") != "0"  # "0": fallback run
    assert [r["fast"] for r in sync_a.last_apply] == [fast]  # fast_reload's path
    assert [r["overlapped"] for r in sync_a.last_apply] == [OVERLAPPED]
    assert forced_logprobs(untied["eng_a"]) == untied["ref_b"]  # exact
    assert sync_b.update_from_files(untied["dir_a"]) == 1
    assert forced_logprobs(untied["eng_b"]) == untied["ref_a"]  # exact
    # The in-pause path (today's default off CPU) on the same engine: B, then A again.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING", "in_pause")  # read per update
        for version, model in ((2, "b"), (3, "a")):
            assert sync_b.update_from_files(untied[f"dir_{model}"]) == version
            assert [(r["fast"], r["overlapped"]) for r in sync_b.last_apply] == [(fast, False)]
            assert sync_b.last_steps == ["start", "update:1", "check", "finish"]
            assert forced_logprobs(untied["eng_b"]) == untied[f"ref_{model}"]  # exact
    # Versions of generated tokens: all from the weights now loaded.
    from vllm import SamplingParams

    out = untied["eng_a"].generate(["hi"], SamplingParams(max_tokens=6, ignore_eos=True),
                                   use_tqdm=False)[0].outputs[0]
    assert token_versions(out) == [(1, 0, 6)]


@pytest.mark.engine
def test_worker_gc_heap_frozen_after_warm_up(untied):
    """Each worker froze its start-up heap (``weights.gc_heap``), so a full
    collection does not scan it in the middle of a step (vLLM 0.32's CPU
    worker leaves it unfrozen: 0)."""
    for eng in (untied["eng_a"], untied["eng_b"]):
        assert all(n > 0 for n in eng.collective_rpc("rl_compat_gc_frozen"))


BAD_CASES = {
    "unknown name": (lambda sd: {**sd, "model.layers.0.mlp.bogus.weight": torch.zeros(2)},
                     "unknown names: model.layers.0.mlp.bogus.weight"),
    "missing name": (lambda sd: {k: v for k, v in sd.items()
                                 if k != "model.layers.1.self_attn.k_proj.weight"},
                     "missing names: model.layers.1.self_attn.k_proj.weight"),
    "wrong shape": (lambda sd: {**sd, "model.norm.weight": torch.ones(65, dtype=torch.bfloat16)},
                    "model.norm.weight: got shape [65], expected [64]"),
    "wrong dtype": (lambda sd: {**sd, "lm_head.weight": sd["lm_head.weight"].float()},
                    "lm_head.weight: got dtype float32, expected bfloat16"),
}


@pytest.mark.engine
@pytest.mark.parametrize("source", ["tensors", "files"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_rejected_update_leaves_model_unchanged(untied, tmp_path, case, source):
    from safetensors.torch import save_file

    eng, sync = untied["eng_a"], untied["sync_a"]
    before, version = forced_logprobs(eng), sync.version
    mutate, message = BAD_CASES[case]
    bad = mutate(state_dict(untied["dir_a"]))  # otherwise a real change (A != B)
    with pytest.raises(WeightUpdateError, match="model unchanged") as err:
        if source == "tensors":
            sync.update_from_tensors(bad)
        else:
            save_file(bad, str(tmp_path / "model.safetensors"))
            sync.update_from_files(tmp_path)
    assert message in str(err.value)
    assert sync.version == version
    if source == "files":  # tensors are checked in the front end, before any step
        assert_never_paused(eng, sync)
    assert forced_logprobs(eng) == before  # bit-identical
    assert_serves(eng)


@pytest.mark.engine
def test_overlapped_staging_faults_and_memory(untied, tmp_path, monkeypatch):
    """Overlapped staging: a truncated file fails in the staging thread without
    a pause; too little memory for the staging copy is refused before anything
    (``overlapped``) or the update goes through the pause (``auto``)."""
    eng, sync = untied["eng_a"], untied["sync_a"]
    before, version = forced_logprobs(eng), sync.version
    raw = next(Path(untied["dir_b"]).glob("*.safetensors")).read_bytes()
    (tmp_path / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightUpdateError, match="model unchanged"):
        sync.update_from_files(tmp_path)
    assert_never_paused(eng, sync)
    assert forced_logprobs(eng) == before and sync.version == version
    if not OVERLAPPED:
        return
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB", "0.0001")
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING", "overlapped")
    with pytest.raises(WeightUpdateError, match=r"weight_staging='overlapped' refused: "
                       r"overlapped weight staging needs \d+ MiB .* but "
                       r"weight_staging_max_gib is 0 MiB.*model unchanged"):
        sync.update_from_files(untied["dir_b"])
    assert_never_paused(eng, sync)
    assert forced_logprobs(eng) == before and sync.version == version
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING", "auto")  # falls back to the pause
    sync.update_from_files(untied["dir_a"])
    assert [r["overlapped"] for r in sync.last_apply] == [False]
    assert sync.last_pause_seconds > 0 and forced_logprobs(eng) == untied["ref_a"]
    monkeypatch.delenv("VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB")
    sync.update_from_files(untied["dir_b"])  # back to B, overlapped again
    assert [r["overlapped"] for r in sync.last_apply] == [True]
    assert forced_logprobs(eng) == untied["ref_b"]


@pytest.mark.engine
def test_overlapped_updates_replay_the_recorded_copy_plan(untied, monkeypatch):
    """With ``VLLM_RL_COMPAT_COPY_PLAN=1`` (opt-in), after the first overlapped
    update of a worker (vLLM's ``load_weights``, recorded) later ones replay the
    recorded writes (``weights.copy_plan``): exact, from files and tensors;
    ``0`` (the default) runs the loader."""
    if not OVERLAPPED:
        pytest.skip("this run stages every update in the pause")
    eng, sync = untied["eng_b"], untied["sync_b"]
    via = []
    for model, copy_plan, send in (("a", "1", "files"), ("b", "1", "tensors"),
                                   ("a", "1", "files"), ("b", "0", "files")):
        monkeypatch.setenv("VLLM_RL_COMPAT_COPY_PLAN", copy_plan)
        if send == "files":
            sync.update_from_files(untied[f"dir_{model}"])
        else:
            sync.update_from_tensors(state_dict(untied[f"dir_{model}"]))
        via.append([r["via"] for r in sync.last_apply])
        # The chunk completed the update: its staging job validated and
        # prepared it, so the finish made no "check" step.
        assert "check" not in sync.last_steps and sync.last_steps[:2] == ["start", "update:1"]
        assert forced_logprobs(eng) == untied[f"ref_{model}"]  # exact
    assert via[0] in (["recording"], ["plan"])  # recorded here or by an earlier test
    assert via[1:] == [["plan"], ["plan"], ["load_weights"]]


@pytest.mark.engine
def test_overlapped_updates_keep_their_staging_copy(untied, tmp_path, monkeypatch):
    """``weight_staging_keep``: the stage swapped out is kept and the next
    update loads into it (the storage live one update before): exact, and a
    chunked update that fails after its first chunk loaded into it leaves the
    live weights bit-identical; ``0`` frees it at the swap."""
    if not OVERLAPPED:
        pytest.skip("this run stages every update in the pause")
    eng, sync = untied["eng_a"], untied["sync_a"]
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP", "1")
    kept = lambda: [s["kept"] for s in eng.collective_rpc("rl_compat_staging")]  # noqa: E731
    for model, send in (("b", "files"), ("a", "tensors")):  # the second loads into the kept
        if send == "files":
            sync.update_from_files(untied[f"dir_{model}"])
        else:
            sync.update_from_tensors(state_dict(untied[f"dir_{model}"]))
        assert [r["kept"] for r in sync.last_apply] == [True] and kept() == [True]
        assert forced_logprobs(eng) == untied[f"ref_{model}"]  # exact
    # vLLM's RL calls, in chunks: half of B loads into the kept stage (the
    # storage the live weights left at the last swap), then a bad chunk.
    fail_after_half(eng, sync, untied["dir_b"], tmp_path)
    assert forced_logprobs(eng) == untied["ref_a"]  # live weights untouched
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP", "0")
    sync.update_from_files(untied["dir_b"])
    assert [r["kept"] for r in sync.last_apply] == [False] and kept() == [False]
    assert forced_logprobs(eng) == untied["ref_b"]


def _connect(sync, port: int, timeout: float) -> None:
    sync.connect_trainer("127.0.0.1", port, secret=SECRET, timeout=timeout)


@pytest.mark.engine
def test_broadcast_update_and_faults(untied):
    """Trainer process -> engine over gloo: success, then every fault kind."""
    eng, sync = untied["eng_b"], untied["sync_b"]  # holds A now
    # 1) a good broadcast: B's weights, compared with fresh B.
    port = free_port()
    trainer = start_trainer(untied["dir_b"], port, sync.num_workers, chunk=3 << 20)
    _connect(sync, port, timeout=30)
    v = sync.update_from_trainer()
    assert trainer.wait(30) == 0, trainer.stderr.read()[-2000:]
    assert forced_logprobs(eng) == untied["ref_b"] and sync.version == v
    # 2) faults, each sending A's weights (a real change if applied).
    before = forced_logprobs(eng)
    for mode, timeout, expect in [
            ("badname", 30, "unknown names: model.layers.0.mlp.bogus.weight"),
            ("die:3", 30, "weight broadcast from the trainer failed after"),
            ("stall:3", 3, "weight broadcast from the trainer failed after")]:
        port = free_port()
        trainer = start_trainer(untied["dir_a"], port, sync.num_workers, mode=mode,
                                timeout=timeout, chunk=1 << 20)
        try:
            _connect(sync, port, timeout=timeout)
            t0 = time.monotonic()
            with pytest.raises(WeightUpdateError, match="model unchanged") as err:
                sync.update_from_trainer()
            elapsed = time.monotonic() - t0
        finally:
            trainer.kill()
            trainer.wait()
        assert expect in str(err.value), (mode, str(err.value))
        assert elapsed < timeout + 15, (mode, elapsed)
        if mode == "badname":  # the trainer got the same verdict
            assert "unknown names" in trainer.stdout.read()
        assert_never_paused(eng, sync)
        assert sync.version == v
        assert forced_logprobs(eng) == before, mode
        assert_serves(eng)
    # After a failed transfer the group is gone: a clear error, nothing paused.
    with pytest.raises(WeightUpdateError, match="No trainer connected"):
        sync.update_from_trainer()


@pytest.mark.engine
def test_tied_model_dtype_head_follows_update(tiny_model, monkeypatch):
    """Tied embeddings. With the fp32 head off the logits come from vLLM's
    packed lm_head, which a tied model shares with the embedding: both apply
    paths must rebuild it (the fp32 head reads the embedding itself, so this
    is the case that can go stale). One engine on A: A -> B (fast), B -> A
    (layerwise, back to its own start-up logprobs), A -> B (layerwise); the
    apply path is chosen at each update. Then two overlapped updates with the
    staging copy kept (the tied parameter is exchanged once, not twice)."""
    off = {"additional_config": {"rl_compat": {"fp32_head": "off"}}, **EAGER}
    a, b = tiny_model("llama-tied", 0), tiny_model("llama-tied", 1)
    ref_b = fresh_logprobs(b, **off)
    eng = make_llm(a, **off)
    try:
        sync = WeightSync(eng)
        assert "lm_head.weight" not in sync.spec.entries  # the head is the embedding
        ref_a = forced_logprobs(eng)
        assert max_diff(ref_a, ref_b) > 1.0
        tensors = state_dict(b)
        # HF state dicts of tied models list the head too: rejected with a hint.
        with pytest.raises(WeightUpdateError, match="send only the embedding"):
            sync.update_from_tensors({**tensors, "lm_head.weight":
                                      tensors["model.embed_tokens.weight"]})
        assert forced_logprobs(eng) == ref_a
        monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP", "1")
        for fast, target, want in ((True, b, ref_b), (False, a, ref_a), (False, b, ref_b),
                                   (True, a, ref_a), (True, b, ref_b)):
            monkeypatch.setenv("VLLM_RL_COMPAT_FAST_RELOAD", "1" if fast else "0")
            sync.update_from_files(target)
            assert [r["fast"] for r in sync.last_apply] == [fast]
            assert [r["overlapped"] for r in sync.last_apply] == [fast and OVERLAPPED]
            assert forced_logprobs(eng) == want  # exact
    finally:
        shutdown(eng)


@pytest.mark.engine
@pytest.mark.tp2
def test_tp2_broadcast_and_files(untied, monkeypatch):
    """TP=2: broadcast to both ranks; compare with TP=1 references."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    eng = make_llm(untied["dir_b"], tensor_parallel_size=2, **EAGER)
    try:
        sync = WeightSync(eng)
        assert sync.num_workers == 2
        fresh_b = forced_logprobs(eng)
        tol = max(0.05, 2 * max_diff(fresh_b, untied["ref_b"]))  # TP split rounding
        port = free_port()
        trainer = start_trainer(untied["dir_a"], port, 2)
        _connect(sync, port, timeout=30)
        sync.update_from_trainer()
        assert trainer.wait(30) == 0
        assert [r["overlapped"] for r in sync.last_apply] == [OVERLAPPED] * 2
        got_a = forced_logprobs(eng)
        assert max_diff(got_a, untied["ref_a"]) <= tol < max_diff(got_a, fresh_b)
        # A rejected update on TP=2: both ranks refuse, nothing changes.
        with pytest.raises(WeightUpdateError, match="wrong shapes"):
            sync.update_from_tensors({**state_dict(untied["dir_b"]),
                                      "model.norm.weight": torch.ones(3, dtype=torch.bfloat16)})
        assert forced_logprobs(eng) == got_a
        sync.update_from_files(untied["dir_b"])
        assert forced_logprobs(eng) == fresh_b  # exact round trip
        sync.disconnect_trainer()
    finally:
        shutdown(eng)


# ------------------------------------------- vLLM's own RL API (issue 12)
from http_trainer import StateSource  # noqa: E402  (a WeightSource over a state dict)


@pytest.mark.engine
@pytest.mark.parametrize("backend", ["rl_compat_tensors", "rl_compat_files", "rl_compat_gloo"])
def test_vllm_trainer_api_with_each_backend(untied, backend):
    """A trainer written against vLLM's trainer API (factory + client + source),
    unchanged, drives our backends: B then A, each equal to a fresh engine."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from vllm_rl_compat.weights.trainer import senders as ours
    from vllm_rl_compat.weights.trainer.client import LLMClient

    eng, sync = untied["eng_a"], untied["sync_a"]
    client = LLMClient(eng)
    for target, ref in ((untied["dir_b"], untied["ref_b"]), (untied["dir_a"], untied["ref_a"])):
        source = StateSource(state_dict(target))
        if backend == "rl_compat_gloo":
            info = ours.RLCompatGlooTrainerInitInfo(
                master_address="127.0.0.1", master_port=free_port(),
                world_size=1 + sync.num_workers, rank=0, timeout=30)
        elif backend == "rl_compat_tensors":
            info = ours.RLCompatTensorsTrainerInitInfo(rank=0)
        else:
            info = ours.RLCompatFilesTrainerInitInfo(rank=0)
        sender = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
        version = sync.version
        try:
            sender.send_weights(*([target] if backend == "rl_compat_files" else []))
        finally:
            sender.shutdown()
        assert sync.version == version + 1
        assert forced_logprobs(eng) == ref  # exact
    eng.shutdown_weight_transfer_engine()


@pytest.mark.engine
def test_native_calls_out_of_order(untied):
    """The transaction refuses calls out of order and resumes the engine."""
    from vllm_rl_compat.weight_sync import TransactionStateError

    eng, sync = untied["eng_a"], untied["sync_a"]
    before, version = forced_logprobs(eng), sync.version
    with pytest.raises(TransactionStateError, match="no weight update is in progress"):
        eng.update_weights({"update_info": {"source": "files", "path": untied["dir_b"]}})
    with pytest.raises(TransactionStateError, match="no weight update is in progress"):
        eng.finish_weight_update()
    eng.start_weight_update()
    with pytest.raises(TransactionStateError, match="in progress"):
        eng.start_weight_update()
    with pytest.raises(WeightUpdateError, match="source='nope'"):
        eng.update_weights({"update_info": {"source": "nope"}})
    # The failed chunk closed the update and resumed the engine.
    with pytest.raises(TransactionStateError):
        eng.finish_weight_update()
    assert forced_logprobs(eng) == before and sync.version == version
    assert_serves(eng)


def fp32_copy(model_dir: str, dest: Path) -> str:
    """``model_dir`` as an fp32 checkpoint whose values bf16 cannot hold
    (the usual trainer output); config and tokenizer copied as they are."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(model_dir, dest)
    gen = torch.Generator().manual_seed(0)
    state = {n: t.float() * (1 + 1e-3 * torch.rand(t.shape, generator=gen))
             for n, t in state_dict(model_dir).items()}
    save_file(state, str(dest / "model.safetensors"))
    return str(dest)


@pytest.mark.engine
def test_fp32_checkpoint_served_in_bf16_reloads_exactly(untied, tmp_path):
    """An engine started in bf16 from an fp32 checkpoint accepts that folder as
    an update (rounded by the loaders exactly as at start-up) and bf16 ones."""
    fp32_dir = fp32_copy(untied["dir_a"], tmp_path / "fp32")
    eng = make_llm(fp32_dir, **EAGER)
    try:
        sync = WeightSync(eng)
        start = forced_logprobs(eng)
        sync.update_from_files(untied["dir_b"])  # parameter dtype (bf16)
        assert max_diff(forced_logprobs(eng), start) > 1.0
        sync.update_from_files(fp32_dir)  # the checkpoint's own dtype (fp32)
        assert forced_logprobs(eng) == start  # rounded as the initial load rounds
    finally:
        shutdown(eng)


@pytest.mark.engine
def test_collective_rpc_cannot_change_weights(untied):
    """What dev mode's /collective_rpc reaches (worker methods by name) cannot
    stage or apply anything: no proof, no transaction."""
    eng, sync = untied["eng_a"], untied["sync_a"]
    before, version = forced_logprobs(eng), sync.version
    info = {"source": "files", "path": untied["dir_b"]}
    attempts = [("start_weight_update", {}), ("update_weights", {"update_info": info}),
                ("finish_weight_update", {}),
                ("init_weight_transfer_engine", {"init_info": {}}),
                ("rl_compat_txn", {"txn": "x", "step": "start", "proof": "0" * 64}),
                ("rl_compat_txn", {"txn": "x", "step": "finish", "proof": "0" * 64})]
    for method, kwargs in attempts:
        # ours refuse; vLLM's own update/finish also find no update started
        with pytest.raises(Exception, match="refused|must be called|without a matching"):
            eng.collective_rpc(method, kwargs=kwargs)
    assert forced_logprobs(eng) == before and sync.version == version
    assert_serves(eng)


def test_staging_job_runs_at_a_short_switch_interval():
    """The staging thread hands the GIL back to the engine thread quickly while
    it works (``StagingJob``), and the process's interval is restored after
    every job, a failed one included."""
    from vllm_rl_compat.weights.worker.staging import SWITCH_INTERVAL_S, StagingJob

    before = sys.getswitchinterval()
    assert before > SWITCH_INTERVAL_S
    job, seen = StagingJob(), []
    job.submit(lambda: seen.append(sys.getswitchinterval()))
    job.submit(lambda: 1 / 0)
    deadline = time.monotonic() + 30
    while job.busy() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert seen == [pytest.approx(SWITCH_INTERVAL_S)]
    assert sys.getswitchinterval() == before
    with pytest.raises(ZeroDivisionError):
        job.done()
