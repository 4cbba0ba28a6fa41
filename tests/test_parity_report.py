"""``vllm-rl-compat check`` end to end on a tiny model, plus its input errors.

The engine test runs the real command in a subprocess (two engine starts:
plugin off and on), then checks the files it wrote and the metric values
against an independent recomputation from the per-token data in the JSON.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_rl_compat import models
from vllm_rl_compat.parity import command
from vllm_rl_compat.parity.metrics import compute_metrics
from vllm_rl_compat.parity.reference import ReferenceScorer, SamplingSpec

TEMPERATURE = 0.7
NUM_PROMPTS = 6
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def llama_dir() -> Path:
    return models.tiny_model_dir("llama-untied")


@pytest.fixture(scope="module")
def check_run(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real check run (rows stock + rl) shared by the engine tests.

    Two thresholds: a generous one that passes and ``kl_k3=0`` that the RL row
    cannot meet (an exact match of two different bf16 implementations), so
    the run exercises both threshold outcomes and must exit 1.
    """
    out = tmp_path_factory.mktemp("report")
    cmd = [sys.executable, "-m", "vllm_rl_compat.parity.command",
           "--model", str(llama_dir), "--rows", "stock", "rl",
           "--num-prompts", str(NUM_PROMPTS), "--max-tokens", str(MAX_TOKENS),
           "--temperature", str(TEMPERATURE), "--out", str(out),
           "--fail-above", "clip_rate=0.5", "--fail-above", "kl_k3=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    path = out / "report.json"
    report = json.loads(path.read_text()) if path.exists() else None
    return {"proc": proc, "out": out, "report": report,
            "rows": {r["key"]: r for r in (report or {}).get("rows", [])}}


@pytest.mark.engine
def test_check_writes_table_json_csv_png(check_run: dict) -> None:
    proc, out = check_run["proc"], check_run["out"]
    assert check_run["report"] is not None, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]  # kl_k3=0 must fail
    assert "ok: rl row clip_rate" in proc.stderr
    assert "FAIL rl row: kl_k3" in proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("│")]
    assert [ln.split("│")[1].strip() for ln in lines] == ["stock", "rl"]
    with open(out / "report.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [r["row"] for r in csv_rows] == ["stock", "rl"]
    for csv_row, key in zip(csv_rows, ["stock", "rl"]):
        assert float(csv_row["kl_k3"]) == pytest.approx(check_run["rows"][key]["kl_k3"])
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.engine
def test_rows_ran_with_the_intended_engine_settings(check_run: dict) -> None:
    stock = check_run["rows"]["stock"]["engine_settings"]
    rl = check_run["rows"]["rl"]["engine_settings"]
    assert stock["logprobs_mode"] == "raw_logprobs"
    assert stock["enable_prefix_caching"] is True
    assert rl["logprobs_mode"] == "processed_logprobs"
    assert rl["enable_prefix_caching"] is False
    assert rl["async_scheduling"] is False
    # RL rows sample after one weight reload through the weight-sync path.
    assert rl["weight_update"]["version"] == 1
    assert "weight_update" not in stock


@pytest.mark.engine
def test_rl_row_is_much_closer_to_the_trainer_than_stock(check_run: dict) -> None:
    stock, rl = check_run["rows"]["stock"], check_run["rows"]["rl"]
    for row in (stock, rl):
        assert 0 < row["tokens"] <= NUM_PROMPTS * MAX_TOKENS
        assert row["support_mismatch"] == 0
    # Stock returns T=1 logprobs while sampling at T=0.7: a large mismatch.
    assert stock["mean_abs_dlogp"] > 0.05
    assert stock["clip_rate"] > 0.1
    assert rl["mean_abs_dlogp"] < stock["mean_abs_dlogp"] / 3
    assert rl["kl_k3"] < stock["kl_k3"] / 10
    assert rl["clip_rate"] < stock["clip_rate"] / 2
    assert rl["prob_corr"] > stock["prob_corr"]


@pytest.mark.engine
def test_reported_metrics_match_the_per_token_data(check_run: dict) -> None:
    for key, row in check_run["rows"].items():
        seqs = row["sequences"]
        m = compute_metrics([s["train_logprobs"] for s in seqs],
                            [s["infer_logprobs"] for s in seqs], epsilon=0.2)
        assert m.tokens == row["tokens"]
        assert m.kl_k3 == pytest.approx(row["kl_k3"]), key
        assert m.clip_rate == pytest.approx(row["clip_rate"]), key


@pytest.mark.engine
def test_stock_logprobs_are_the_untempered_distribution(check_run: dict, llama_dir: Path) -> None:
    """Explains the stock mismatch: its logprobs match a T=1 trainer instead."""
    report = check_run["report"]
    seqs = check_run["rows"]["stock"]["sequences"]
    assert len(seqs) == report["settings"]["num_prompts"] == NUM_PROMPTS
    prompts = command.tokenize_prompts(llama_dir, list(command.BUILTIN_PROMPTS[:NUM_PROMPTS]))
    at_t1 = ReferenceScorer(llama_dir, spec=SamplingSpec(temperature=1.0))
    train_t1 = [at_t1.score(p, s["token_ids"]) for p, s in zip(prompts, seqs)]
    m = compute_metrics(train_t1, [s["infer_logprobs"] for s in seqs])
    assert m.mean_abs_dlogp < check_run["rows"]["stock"]["mean_abs_dlogp"] / 3


# ------------------------------------------------------------- bad input

def _run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = command.main(list(argv))
    return code, capsys.readouterr().err


# ------------------------------------------------------------- check --layers
PERTURBED_LAYER = 1  # of the tiny model's 2 decoder layers


def _run_check(model: Path, out: Path, *extra: str) -> dict:
    """``check --rows rl`` with check_run's sampling settings, plus ``extra``."""
    cmd = [sys.executable, "-m", "vllm_rl_compat.parity.command", "--model", str(model),
           "--rows", "rl", "--num-prompts", str(NUM_PROMPTS), "--max-tokens", str(MAX_TOKENS),
           "--temperature", str(TEMPERATURE), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"proc": proc, "report": json.loads((out / "report.json").read_text()),
            "layers": json.loads((out / "layers.json").read_text())
            if (out / "layers.json").exists() else None}


def _perturbed_copy(src: Path, other: Path, dst: Path) -> Path:
    """``src`` with one decoder layer's weights taken from ``other`` (a weight
    sync that missed a layer). Why a whole layer: in the tiny random model a
    layer changes the residual stream by under 1%, so a few-percent change of
    its weights moves the stream less than bf16 rounding does (below the
    floor, undetectable by construction); a whole foreign layer moves it
    about 3x the floor."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    (path,) = dst.glob("*.safetensors")
    (foreign,) = Path(other).glob("*.safetensors")
    state, theirs = load_file(str(path)), load_file(str(foreign))
    prefix = f"model.layers.{PERTURBED_LAYER}."
    state.update({k: v for k, v in theirs.items() if k.startswith(prefix)})
    save_file(state, str(path), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def layer_runs(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two ``--layers`` runs: the engine on a perturbed copy against the
    original as the trainer's checkpoint, and the same model on both sides."""
    tmp = tmp_path_factory.mktemp("layers")
    perturbed = _perturbed_copy(llama_dir, models.tiny_model_dir("llama-untied", seed=1),
                                tmp / "perturbed")
    return {"perturbed": _run_check(perturbed, tmp / "out_p", "--layers",
                                    "--reference-model", str(llama_dir)),
            "same": _run_check(llama_dir, tmp / "out_s", "--layers")}


@pytest.mark.engine
def test_layers_find_the_perturbed_layer(layer_runs: dict) -> None:
    row = layer_runs["perturbed"]["layers"]["rows"]["rl"]
    names = [e["name"] for e in row["layers"]]
    assert names == ["layer.0", "layer.1", "final_norm", "logits"]
    assert row["first_diverging_layer"] == f"layer.{PERTURBED_LAYER}"
    factor = layer_runs["perturbed"]["layers"]["floor_factor"]
    for entry in row["layers"][:PERTURBED_LAYER]:  # before it: at the rounding floor
        assert entry["rel_err_median"] <= factor * entry["floor"], entry
    assert "first div. layer" in layer_runs["perturbed"]["proc"].stdout
    assert "layer.1" in layer_runs["perturbed"]["proc"].stdout


@pytest.mark.engine
def test_layers_same_model_flags_nothing(layer_runs: dict) -> None:
    """bf16 reference: the engine and the trainer are two bf16 implementations,
    each within about one rounding of the fp32 pass, so every slot stays
    under the factor times the floor; the error grows with depth."""
    row = layer_runs["same"]["layers"]["rows"]["rl"]
    assert row["first_diverging_layer"] is None, row
    assert all(e["rel_err_median"] > 0 for e in row["layers"])


@pytest.mark.engine
def test_layers_change_no_engine_number(layer_runs: dict, check_run: dict) -> None:
    """The same rl row with and without --layers: identical tokens and metrics."""
    with_layers = layer_runs["same"]["report"]["rows"][0]
    without = check_run["rows"]["rl"]
    assert [s["token_ids"] for s in with_layers["sequences"]] == \
        [s["token_ids"] for s in without["sequences"]]
    assert [s["infer_logprobs"] for s in with_layers["sequences"]] == \
        [s["infer_logprobs"] for s in without["sequences"]]
    for key in ("mean_abs_dlogp", "kl_k3", "clip_rate", "max_abs_dp"):
        assert with_layers[key] == without[key], key


@pytest.mark.engine
@pytest.mark.parametrize("kind", ["gemma2-softcap", "qwen2-tied"])
def test_layers_on_other_architectures(kind: str, tmp_path: Path) -> None:
    """Gemma-style (tied, soft-capped) and Qwen2-style: the capture finds every
    decoder layer and the same model on both sides flags nothing."""
    run = _run_check(models.tiny_model_dir(kind), tmp_path / "out", "--layers")
    row = run["layers"]["rows"]["rl"]
    assert [e["name"] for e in row["layers"]] == ["layer.0", "layer.1", "final_norm",
                                                  "logits"]
    assert row["first_diverging_layer"] is None, row


def test_reference_model_with_another_tokenizer(capsys: pytest.CaptureFixture,
                                                llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "other"
    shutil.copytree(llama_dir, other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    model = vocab["model"]["vocab"]
    first = next(iter(model))
    model["zz_renamed_token"] = model.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    code = command.main(["--model", str(llama_dir), "--reference-model", str(other)])
    assert code == 2
    assert "its tokenizer differs from --model" in capsys.readouterr().err


def test_reference_model_with_another_layer_count(capsys: pytest.CaptureFixture,
                                                  llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    other = tmp_path / "deeper"
    shutil.copytree(llama_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    code = command.main(["--model", str(llama_dir), "--reference-model", str(other),
                         "--layers"])
    assert code == 2
    assert "has 3 decoder layers, --model 2" in capsys.readouterr().err


def test_missing_model_path(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    code, err = _run_cli(capsys, "--model", str(missing))
    assert code == 2
    assert f"--model '{missing}': no such directory" in err


def test_model_folder_without_config(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    code, err = _run_cli(capsys, "--model", str(tmp_path))
    assert code == 2 and "no config.json" in err


@pytest.mark.parametrize("make", ["missing", "directory", "binary", "empty"])
def test_unreadable_prompt_file(capsys: pytest.CaptureFixture, tmp_path: Path,
                                llama_dir: Path, make: str) -> None:
    path = tmp_path / "prompts.txt"
    if make == "directory":
        path.mkdir()
    elif make == "binary":
        path.write_bytes(b"\xff\xfe\x00bad")
    elif make == "empty":
        path.write_text("\n\n")
    code, err = _run_cli(capsys, "--model", str(llama_dir), "--prompts", str(path))
    assert code == 2
    expected = "has no prompts" if make == "empty" else "cannot read prompt file"
    assert f"{expected}" in err and str(path) in err


def test_bad_jsonl_line_is_named(capsys: pytest.CaptureFixture, tmp_path: Path,
                                 llama_dir: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hi"}\n{"prompt": \n')
    code, err = _run_cli(capsys, "--model", str(llama_dir), "--prompts", str(path))
    assert code == 2 and "line 2: invalid JSON" in err


@pytest.mark.parametrize("spec, message", [
    ("kl=0.1", "unknown metric 'kl'"),
    ("clip_rate=abc", "value 'abc' is not a number"),
    ("clip_rate", "expected METRIC=VALUE"),
    ("prob_corr=0.9", "higher is better"),
])
def test_invalid_threshold_spec(capsys: pytest.CaptureFixture, spec: str, message: str) -> None:
    code, err = _run_cli(capsys, "--fail-above", spec)
    assert code == 2
    assert message in err and spec in err


def test_threshold_needs_the_rl_row(capsys: pytest.CaptureFixture, llama_dir: Path) -> None:
    code, err = _run_cli(capsys, "--model", str(llama_dir), "--rows", "stock",
                         "--fail-above", "clip_rate=0.1")
    assert code == 2 and "'rl' row" in err


def test_unknown_row(capsys: pytest.CaptureFixture) -> None:
    code, err = _run_cli(capsys, "--rows", "stock,bogus")
    assert code == 2 and "unknown row(s) 'bogus'" in err


def test_prompt_file_formats(tmp_path: Path) -> None:
    plain = tmp_path / "p.txt"
    plain.write_text("first prompt\n\nsecond {prompt}\n")
    assert command.read_prompt_file(plain) == ["first prompt", "second {prompt}"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"a"\n{"prompt": "b"}\n{"messages": [{"role": "user", "content": "c"}]}\n')
    assert command.read_prompt_file(jsonl) == ["a", "b", [{"role": "user", "content": "c"}]]


# ------------------------------------------------------------- tiny models

def test_tiny_model_kinds_have_the_promised_heads() -> None:
    """The properties other tests rely on (tied, bias, odd vocab, soft-cap)."""
    def cfg(kind: str, seed: int = 0) -> dict:
        return json.loads((models.tiny_model_dir(kind, seed) / "config.json").read_text())

    assert cfg("llama-untied")["tie_word_embeddings"] is False
    assert cfg("llama-tied")["tie_word_embeddings"] is True
    assert cfg("llama-oddvocab")["vocab_size"] % 64 != 0
    assert cfg("gemma2-softcap")["final_logit_softcapping"] == 30.0
    assert cfg("qwen2-tied")["model_type"] == "qwen2"
    for kind in ("phi-bias", "gptj-bias"):
        from safetensors import safe_open

        with safe_open(models.tiny_model_dir(kind) / "model.safetensors", "pt") as fh:
            bias = fh.get_tensor("lm_head.bias")
        assert bias.float().abs().max() > 0.1, kind
    assert models.tiny_model_dir("llama-untied", seed=1) != models.tiny_model_dir("llama-untied")
    with pytest.raises(models.ModelSetupError, match="unknown tiny model kind 'nope'"):
        models.tiny_model_dir("nope")


def test_second_seed_gives_different_weights() -> None:
    from safetensors import safe_open

    def head(seed: int) -> "object":
        path = models.tiny_model_dir("llama-untied", seed) / "model.safetensors"
        with safe_open(path, "pt") as fh:
            return fh.get_tensor("lm_head.weight")

    a, b = head(0), head(1)
    assert a.shape == b.shape and not bool((a == b).all())
    assert math.isclose(float(a.float().std()), float(b.float().std()), rel_tol=0.05)
