"""Every weight path on every CPU weight layout this machine can produce (issue 28).

vLLM's CPU engine lays out each linear by CPU and dtype (``weights.cpu_layout``):
packed into a oneDNN handle with ``layer.weight`` emptied (fp32 on every x86
CPU; bf16 on AVX512-BF16 / AMX), an SGL-kernel packed copy (AMX, small bf16
layers), or kept for ``F.linear`` (bf16 on AVX2-only CPUs, or anywhere with
``ONEDNN_MAX_CPU_ISA=AVX2``). The machine's own bf16 layout is what
``test_weight_sync.py`` runs everything on; each other configuration below
starts a real engine. Which layout each gets is asked of the machine (vLLM's
own dispatch checks, in a child process with the configuration's
environment), and a configuration that gives the same dtype and layouts as an
earlier one is skipped as a duplicate (``bf16-onednn-avx2`` on an AVX2-only
CPU). On each configuration the same sequence runs through every apply path
and staging mode, each update compared bit for bit with a fresh engine on the
same weights:

* overlapped staging with the kept copy, four updates in a row (three load
  into the stage the previous swap left), files and in-process tensors;
* vLLM's trainer API with ``rl_compat_gloo``, three broadcasts in a row;
* the opt-in copy plan (recorded, then replayed);
* a chunked update that fails after its first chunk loaded into the kept stage;
* in the pause (fast apply), vLLM's layerwise reload, then overlapped again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from test_weight_sync import (
    EAGER,
    fail_after_half,
    forced_logprobs,
    free_port,
    make_llm,
    max_diff,
    shutdown,
    state_dict,
)
from vllm_rl_compat.weight_sync import WeightSync

# name: (engine dtype, the engine's extra environment). The machine's own bf16
# layout is ``NATIVE``: ``test_weight_sync.py`` runs every path on it.
NATIVE = "bf16"
CONFIGS: dict[str, tuple[str, dict[str, str]]] = {
    NATIVE: ("bfloat16", {}),
    "fp32": ("float32", {}),
    "bf16-onednn-avx2": ("bfloat16", {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
}

_PROBE = ("import json, sys, torch; from vllm_rl_compat.weights.worker.cpu_layout import "
          "predicted_layouts; cfg = json.load(open(sys.argv[1])); print(json.dumps("
          "{d: predicted_layouts(cfg, getattr(torch, d)) for d in sys.argv[2:]}))")


def machine_layouts(model_dir: str, env: dict[str, str], dtypes: list[str]) -> dict:
    """``{dtype: {kind: layout}}`` vLLM's dispatch gives this model here, asked in a
    fresh interpreter (``ONEDNN_MAX_CPU_ISA`` counts only before oneDNN starts)."""
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(Path(model_dir) / "config.json"),
                           *dtypes], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def predictions(tiny_model) -> dict[str, dict[str, str]]:
    """Each configuration's predicted layouts (one probe per environment)."""
    model = tiny_model("llama-untied", 0)
    by_env: dict[str, dict] = {}
    out = {}
    for name, (dtype, env) in CONFIGS.items():
        key = json.dumps(env, sort_keys=True)
        if key not in by_env:
            dtypes = sorted({d for d, e in CONFIGS.values() if e == env})
            by_env[key] = machine_layouts(model, env, dtypes)
        out[name] = by_env[key][dtype]
    return out


@pytest.fixture(scope="module", params=[n for n in CONFIGS if n != NATIVE])
def layout(request, tiny_model, predictions) -> Iterator[dict[str, Any]]:
    """An engine on model A in one configuration, with references for A and B
    from fresh engines of the same configuration."""
    name = request.param
    dtype, env = CONFIGS[name]
    for other in list(CONFIGS)[: list(CONFIGS).index(name)]:
        if CONFIGS[other][0] == dtype and predictions[other] == predictions[name]:
            pytest.skip(f"{name} gives the same layouts as {other} on this machine "
                        f"({predictions[name]}), run by "
                        f"{'test_weight_sync.py' if other == NATIVE else other}")
    a, b = tiny_model("llama-untied", 0), tiny_model("llama-untied", 1)
    kwargs = {"dtype": dtype, **EAGER}
    with pytest.MonkeyPatch.context() as mp:  # the engine processes inherit it
        for key, value in env.items():
            mp.setenv(key, value)
        ref = make_llm(b, **kwargs)
        try:
            ref_b = forced_logprobs(ref)
        finally:
            shutdown(ref)
        eng = make_llm(a, **kwargs)
    ctx = {"name": name, "eng": eng, "sync": WeightSync(eng), "dir_a": a, "dir_b": b,
           "ref_a": forced_logprobs(eng), "ref_b": ref_b, "expected": predictions[name]}
    assert max_diff(ctx["ref_a"], ref_b) > 1.0  # the two models really differ
    yield ctx
    shutdown(eng)


def update(ctx: dict[str, Any], model: str, send: str) -> None:
    """Send model ``a`` or ``b`` as files or in-process tensors; then exact."""
    sync = ctx["sync"]
    if send == "files":
        sync.update_from_files(ctx[f"dir_{model}"])
    else:
        sync.update_from_tensors(state_dict(ctx[f"dir_{model}"]))
    assert forced_logprobs(ctx["eng"]) == ctx[f"ref_{model}"], (ctx["name"], model, send)


@pytest.mark.engine
def test_engine_gets_the_predicted_layout(layout):
    """The engine's linears have the layout vLLM's dispatch predicts here."""
    assert layout["eng"].collective_rpc("rl_compat_layouts") == [layout["expected"]]


@pytest.mark.engine
def test_kept_stage_takes_repeated_updates(layout, monkeypatch):
    """Overlapped, copy kept: four updates, the last three into the stage the
    previous swap left (issue 31: the second one failed on packed layouts)."""
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP", "1")
    sync = layout["sync"]
    for model, send in (("b", "files"), ("a", "tensors"), ("b", "tensors"), ("a", "files")):
        version = sync.version
        update(layout, model, send)
        assert sync.version == version + 1
        assert [(r["overlapped"], r["kept"]) for r in sync.last_apply] == [(True, True)]


@pytest.mark.engine
def test_trainer_api_broadcasts_in_a_row(layout):
    """vLLM's trainer API (factory, client, source) over ``rl_compat_gloo``:
    three updates, each a new version and exact."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from http_trainer import StateSource
    from vllm_rl_compat.weights.trainer.client import LLMClient
    from vllm_rl_compat.weights.trainer.senders import RLCompatGlooTrainerInitInfo

    eng, sync = layout["eng"], layout["sync"]
    info = RLCompatGlooTrainerInitInfo(master_address="127.0.0.1", master_port=free_port(),
                                       world_size=1 + sync.num_workers, rank=0, timeout=30)
    for model in ("b", "a", "b"):
        sender = WeightTransferTrainerFactory.trainer_init(
            info, client=LLMClient(eng), source=StateSource(state_dict(layout[f"dir_{model}"])))
        version = sync.version
        try:
            sender.send_weights()
        finally:
            sender.shutdown()
        info.master_port = free_port()
        assert sync.version == version + 1
        assert forced_logprobs(eng) == layout[f"ref_{model}"]
    eng.shutdown_weight_transfer_engine()


@pytest.mark.engine
def test_copy_plan_records_then_replays(layout, monkeypatch):
    """``VLLM_RL_COMPAT_COPY_PLAN=1``: recorded once, replayed after, exact."""
    monkeypatch.setenv("VLLM_RL_COMPAT_COPY_PLAN", "1")
    via = []
    for model, send in (("a", "files"), ("b", "tensors"), ("a", "files")):
        update(layout, model, send)
        via += [r["via"] for r in layout["sync"].last_apply]
    assert via[0] in ("recording", "plan") and via[1:] == ["plan", "plan"]


@pytest.mark.engine
def test_failed_chunk_into_kept_stage_leaves_the_model(layout, tmp_path, monkeypatch):
    """Half of B loads into the kept stage, then a bad chunk: live weights as
    they were, nothing paused or held; the next update is exact."""
    monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP", "1")
    update(layout, "a", "files")
    fail_after_half(layout["eng"], layout["sync"], layout["dir_b"], tmp_path)
    assert forced_logprobs(layout["eng"]) == layout["ref_a"]
    update(layout, "b", "files")


@pytest.mark.engine
def test_in_pause_layerwise_then_overlapped(layout, monkeypatch):
    """The in-pause fast apply, vLLM's layerwise reload, then overlapped again
    (a fresh stage: the in-pause update freed the kept one)."""
    sync = layout["sync"]
    for staging, fast, model in (("in_pause", "1", "a"), ("in_pause", "0", "b"),
                                 ("auto", "1", "a")):
        monkeypatch.setenv("VLLM_RL_COMPAT_WEIGHT_STAGING", staging)
        monkeypatch.setenv("VLLM_RL_COMPAT_FAST_RELOAD", fast)
        update(layout, model, "files")
        assert [(r["fast"], r["overlapped"]) for r in sync.last_apply] == [
            (fast == "1", staging == "auto")]


@pytest.mark.engine
def test_fp32_model_scores_like_an_fp32_trainer(layout):
    """An fp32 model in RL mode (start-up probe passed: the fixture started it)
    gives the logprobs of an fp32 trainer (HF transformers, the report's
    ``fp32`` reference) up to fp32 accumulation order, also after updates."""
    if CONFIGS[layout["name"]][0] != "float32":
        pytest.skip("an fp32 engine only")
    from test_weight_sync import PROMPTS

    from vllm_rl_compat.parity.reference import ReferenceScorer

    update(layout, "a", "files")  # after the updates above, back to A
    assert layout["sync"].version > 0
    trainer = ReferenceScorer(layout["dir_a"], kind="fp32")
    want = [trainer.score(p[:1], p[1:]) for p in PROMPTS]
    assert max_diff(forced_logprobs(layout["eng"]), want) < 1e-3
