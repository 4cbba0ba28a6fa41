"""Smoke test: the fp32_linear benchmark script runs end to end at a tiny size."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from kernel_support import blocked_expected, brgemm_expected

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fp32_linear.py"


@pytest.fixture()
def bench(monkeypatch):
    # Without CUDA the script runs the Triton provider in the interpreter; the
    # kernel reads TRITON_INTERPRET at its first launch (see fp32_linear_triton).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("bench_fp32_linear", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look the module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_every_provider(bench, tmp_path):
    assert bench.main(["--shapes", "64x300,129x70", "--tokens", "1,3", "--repeats", "1",
                       "--out", str(tmp_path), "--name", "smoke"]) == 0
    raw = json.loads((tmp_path / "smoke.json").read_text())
    assert {"commit", "CPU", "command"} <= set(raw["header"])  # same header as the table
    rows = raw["results"]
    assert len(rows) == 2 * 2 * len(bench.PROVIDERS)
    for (H, V) in [(64, 300), (129, 70)]:
        for T in (1, 3):
            got = {r["provider"]: r for r in rows if (int(r["H"]), int(r["V"]), int(r["T"])) == (H, V, T)}
            assert set(got) == set(bench.PROVIDERS)
            for name, r in got.items():
                if name == "torch_mm_fp32" and not torch.cuda.is_available():
                    assert r["status"] == "n/a" and "CUDA only" in r["note"], r  # cuBLAS row
                    continue
                if r["status"] == "skipped":  # brgemm odd H or no AMX, blocked without compiler
                    assert r["note"] and not torch.cuda.is_available(), (name, r)
                    brgemm_skip = name == "ours_brgemm" and (H % 2 or not brgemm_expected())
                    blocked_skip = name == "ours_blocked" and not blocked_expected()
                    assert brgemm_skip or blocked_skip, (name, r)
                    continue
                assert float(r["time_ms"]) > 0, (name, r)
                err = float(r["max_rel_err"])
                # fp32 providers are exact to fp32 accumulation; bf16 logits are not.
                assert (err > 1e-5) if name == "torch_bf16" else (err < 1e-6), (name, err)
    md = (tmp_path / "smoke.md").read_text()
    for needle in ("torch " + torch.__version__, "triton ", "| 64 x 300 | 1 |", "| 129 x 70 | 3 |",
                   *bench.PROVIDERS):
        assert needle.replace("torch ", "torch: ").replace("triton ", "triton: ") in md, needle
