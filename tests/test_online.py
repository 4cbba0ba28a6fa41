"""``vllm-rl-compat check --online`` on a tiny model, with real CPU engines.

One command run (module fixture) with four rows and a learning rate of 0:
``rl - v1_defaults`` (plain prefix caching), ``rl``, ``stock`` (whose engine
is killed after its first step) and ``reference``. A zero learning rate
keeps every version's weights equal, so the mismatch-alone must equal the
static report's scorer on the same tokens, and the trainer-side KL must equal
the mismatch-alone (no staleness), while versions still advance once per
step. The trainer's learning and rescoring are tested without an engine.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vllm_rl_compat import models
from vllm_rl_compat.parity.metrics import compute_metrics
from vllm_rl_compat.parity.reference import ReferenceScorer, SamplingSpec

STEPS = 5
ROWS = ("rl-v1_defaults", "rl", "stock", "reference")
KILLED = "stock"
TEMPERATURE = 0.7


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return models.tiny_model_dir("llama-tied")


def _kill_engine_after_first_step(proc: subprocess.Popen, folder: Path,
                                  result: dict) -> None:
    """Once the killed row has written step 1, freeze its process (so it cannot
    finish meanwhile), kill every process under it (engine core, workers),
    then let it go on: it must notice the dead engine."""
    import psutil

    steps = folder / f"{KILLED}.steps.jsonl"
    while proc.poll() is None:
        if steps.is_file() and steps.read_text().strip():
            rows = [p for p in psutil.Process(proc.pid).children()
                    if f"{KILLED}.spec.json" in " ".join(p.cmdline())]
            if not rows:
                continue
            row = rows[0]
            row.send_signal(signal.SIGSTOP)
            below = row.children(recursive=True)
            for child in below:
                child.kill()
            psutil.wait_procs(below, timeout=30)
            result["killed"] = len(below)
            row.send_signal(signal.SIGCONT)
            return
        time.sleep(0.1)  # waiting for a file to appear, not an ordering


@pytest.fixture(scope="module")
def online_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("online")
    cmd = [sys.executable, "-m", "vllm_rl_compat.parity.command", "--online",
           "--model", str(model_dir), "--rows", *ROWS, "--steps", str(STEPS),
           "--groups", "1", "--samples", "2", "--num-prompts", "2", "--max-tokens", "8",
           "--lr", "0", "--temperature", str(TEMPERATURE), "--out", str(out),
           "--fail-above", "mismatch_kl=1e9"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    killer: dict = {}
    thread = threading.Thread(target=_kill_engine_after_first_step,
                              args=(proc, out / "online-rows", killer))
    thread.start()
    stdout, stderr = proc.communicate(timeout=900)
    thread.join()
    payload = json.loads((out / "online.json").read_text())
    samples = {key: [json.loads(line) for line in
                     (out / "online-rows" / f"{key}.samples.jsonl").read_text().splitlines()]
               for key in ROWS}
    return {"code": proc.returncode, "stdout": stdout, "stderr": stderr, "out": out,
            "payload": payload, "samples": samples, "killed": killer.get("killed", 0)}


@pytest.mark.engine
def test_files_shape_and_finite_metrics(online_run: dict) -> None:
    out, payload = online_run["out"], online_run["payload"]
    assert online_run["code"] == 2, online_run["stderr"][-3000:]  # the killed row
    assert set(payload["settings"]) >= {"lr", "steps", "samples", "seed", "temperature"}
    assert payload["settings"]["lr"] == 0
    for key in ("rl-v1_defaults", "rl", "reference"):
        steps = payload["rows"][key]["steps"]
        assert [s["step"] for s in steps] == list(range(STEPS)), key
        for s in steps:
            for name in ("clip_rate", "kl", "entropy", "reward", "mismatch_kl", "lag_mean"):
                assert isinstance(s[name], float) and math.isfinite(s[name]), (key, name, s)
            assert s["unattributed_tokens"] == 0
    lines = (out / "online.csv").read_text().splitlines()
    assert len(lines) == 1 + 3 * STEPS + len(payload["rows"][KILLED]["steps"])
    assert (out / "online.png").stat().st_size > 10_000
    assert "online run" in online_run["stdout"]


@pytest.mark.engine
@pytest.mark.parametrize("key", ["rl-v1_defaults", "rl"])
def test_versions_advance_once_per_step(online_run: dict, key: str) -> None:
    """Every token carries the version that sampled it: step 0 only version 0,
    step s only s - 1 (sampled while step s - 1 trained) or s (after its
    update); the trainer is at version s at step s."""
    steps = online_run["payload"]["rows"][key]["steps"]
    assert [s["weight_version"] for s in steps] == list(range(STEPS))
    for record in online_run["samples"][key]:
        s = record["step"]
        versions = {v for sample in record["samples"] for v in sample["versions"]}
        assert None not in versions
        assert versions <= ({0} if s == 0 else {s - 1, s}), (s, versions)


@pytest.mark.engine
def test_stale_prefix_only_with_plain_prefix_caching(online_run: dict) -> None:
    """Prompts recur every second step: with plain prefix caching a later
    request reads prompt KV of older weights; RL mode's default never does."""
    rows = online_run["payload"]["rows"]
    assert rows["rl-v1_defaults"]["summary"]["stale_prefix_tokens"] > 0
    assert rows["rl"]["summary"]["stale_prefix_tokens"] == 0
    assert all(s["stale_prefix_tokens"] == 0 for s in rows["rl"]["steps"])


@pytest.mark.engine
def test_zero_lr_mismatch_equals_static_scorer(online_run: dict, model_dir: Path) -> None:
    """lr = 0: each step's mismatch-alone is the static report's k3 for the
    same tokens, and the trainer sees no staleness (its KL is the mismatch's)."""
    scorer = ReferenceScorer(model_dir, "bf16-fp32head", "bfloat16",
                             SamplingSpec(TEMPERATURE))
    steps = online_run["payload"]["rows"]["rl"]["steps"]
    for record, step in zip(online_run["samples"]["rl"], steps):
        batch = record["samples"]
        train = scorer.score_many((s["prompt"], s["tokens"]) for s in batch)
        static = compute_metrics(train, [s["behaviour"] for s in batch], 0.2)
        assert step["mismatch_kl"] == pytest.approx(static.kl_k3, rel=1e-9, abs=1e-15)
        assert step["kl"] == pytest.approx(step["mismatch_kl"], rel=1e-9, abs=1e-15)
        assert step["clip_rate"] == pytest.approx(static.clip_rate, abs=1e-12)
    assert any(s["lag_mean"] > 0 for s in steps)  # there was something to be stale


@pytest.mark.engine
def test_reference_row_has_zero_mismatch(online_run: dict) -> None:
    for s in online_run["payload"]["rows"]["reference"]["steps"]:
        assert s["kl"] == 0 and s["mismatch_kl"] == 0 and s["clip_rate"] == 0


@pytest.mark.engine
def test_engine_failure_ends_row_and_others_report(online_run: dict) -> None:
    assert online_run["killed"] > 0
    row = online_run["payload"]["rows"][KILLED]
    assert 1 <= len(row["steps"]) < STEPS
    assert f"row {KILLED!r} failed" in row["error"]
    assert f"row {KILLED!r} failed" in online_run["stderr"]
    assert len(online_run["payload"]["rows"]["reference"]["steps"]) == STEPS


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--lr", "nan"], "--lr nan: must be >= 0 and finite"),
    (["--samples", "1"], "--samples 1: must be >= 2"),
    (["--block-size", "24"], "--block-size 24: must be a positive multiple of 16"),
    (["--rows", "rl", "nope"], "unknown row(s) 'nope'"),
    (["--fail-above", "kl_k3=1"], "unknown metric 'kl_k3'"),
    (["--rows", "stock", "--fail-above", "kl=1"], "checks the 'rl' row"),
    (["--layers"], "--layers and --reference-model apply to the static report"),
])
def test_bad_options_refused(args: list[str], message: str,
                             capsys: pytest.CaptureFixture[str]) -> None:
    from vllm_rl_compat.cli import main

    assert main(["check", "--online", *args]) == 2
    assert message in capsys.readouterr().err.replace("\n", " ")


def test_trainer_steps_and_rescores_old_versions(model_dir: Path) -> None:
    """No engine: after one step with a real learning rate the policy changed,
    and tokens of version 0 are rescored with version 0's weights exactly."""
    import torch

    from vllm_rl_compat.online.stats import Sample
    from vllm_rl_compat.online.trainer import OnlineTrainer
    from vllm_rl_compat.parity.command import tokenize_prompts

    spec = SamplingSpec(TEMPERATURE)
    trainer = OnlineTrainer(str(model_dir), "bf16-fp32head", "bfloat16", spec,
                            lr=1e-2, epsilon=0.2, group_size=2)
    prompt = tokenize_prompts(model_dir, ["What is 2 plus 3?"])[0]
    drawn = trainer.generate(prompt, 1, 6, set(), seed=0)[0][0]
    other = [(t * 7 + 11) % 1000 for t in drawn]  # a second, different completion
    scorer = ReferenceScorer(model_dir, "bf16-fp32head", "bfloat16", spec)
    samples = [Sample(prompt, t, scorer.score(prompt, t), [0] * len(t), 0, float(i), False)
               for i, t in enumerate((drawn, other))]
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.step(samples)
    assert trainer.version == 1
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.policy.parameters()))
    scores = trainer.score(samples)
    for s, sc in zip(samples, scores):
        assert sc.rescored == s.behaviour  # version 0's weights, bit for bit
        assert sc.train != s.behaviour  # the current weights differ


def test_mixed_kv_tokens_split_the_mismatch() -> None:
    """A token whose context KV (prompt or earlier tokens) came from an older
    version is ``mixed_kv``; the single-version rest is what the static
    report measures. Hand-made tokens with known log-ratios."""
    from vllm_rl_compat.online.stats import Sample, Scores, step_metrics

    kept = Sample([1], [5, 6, 7, 8], [-1.0] * 4, [0, 0, 1, 1], 0, 1.0)  # kept across 0 -> 1
    stale = Sample([1], [5, 6], [-1.0] * 2, [1, 1], 0, 0.0)  # prompt KV of version 0
    fresh = Sample([1], [5, 6], [-1.0] * 2, [1, 1], 1, 0.0)
    unknown = Sample([1], [5, 6], [-1.0] * 2, [0, 1], None, 0.0)  # prompt KV unknown
    assert kept.mixed_kv == [False, False, True, True]
    assert stale.mixed_kv == [True, True] and fresh.mixed_kv == [False, False]
    assert unknown.mixed_kv == [False, True]
    samples = [kept, stale, fresh]
    # rescored - behaviour: 0.1 on single-version tokens, 0.5 on mixed ones
    rescored = [[-0.9, -0.9, -0.5, -0.5], [-0.5, -0.5], [-0.9, -0.9]]
    scores = [Scores(r, [1.0] * len(r), r) for r in rescored]
    out = step_metrics(samples, scores, trainer_version=1, epsilon=0.2)

    def k3(d: float) -> float:
        return math.expm1(d) - d

    assert out["mixed_kv_tokens"] == 4
    assert out["mismatch_kl_mixed_kv"] == pytest.approx(k3(0.5), rel=1e-12)
    assert out["mismatch_kl_single_version"] == pytest.approx(k3(0.1), rel=1e-9)
    assert out["stale_prefix_tokens"] == 2
