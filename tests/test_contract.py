"""The vLLM contract (``vllm_rl_compat.contract``): no engine, seconds.

Every vLLM internal RL mode depends on holds in the installed vLLM (by
import and by source); the source checker sees the changes it exists for;
nothing is wrapped that is not listed; and a vLLM with a listed symbol
removed or changed fails start-up with the registry's error naming it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_rl_compat import contract
from vllm_rl_compat.contract import VLLMContractError

VLLM_ROOT = Path(__import__("vllm").__file__).parent.parent


def test_installed_vllm_holds_every_entry() -> None:
    assert contract.check_all() == []


def test_source_checker_agrees_on_installed_vllm() -> None:
    assert contract.check_source_tree(VLLM_ROOT) == []


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vllm_src")
    shutil.copytree(VLLM_ROOT / "vllm", root / "vllm", ignore=_not_python)
    return root


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n == "__pycache__" or not (
        n.endswith(".py") or os.path.isdir(os.path.join(folder, n)))]


LP = "vllm.model_executor.layers.logits_processor"


@pytest.mark.parametrize("module, old, new, expected", [
    (LP, "def _apply_head(", "def _project_head(",
     "LogitsProcessor._apply_head: not defined"),
    (LP, "        logits = self._apply_head(lm_head, hidden_states, embedding_bias)\n",
     "        logits = self._project(lm_head, hidden_states, embedding_bias)\n",
     "LogitsProcessor._apply_head: not called from _get_logits"),
    ("vllm.v1.engine.core", "def _attach_weight_version(self, outputs",
     "def _attach_weight_version(self, engine_outputs",
     "EngineCore._attach_weight_version: parameters are ['self', 'engine_outputs']"),
    ("vllm.model_executor.model_loader.reload.sanitize", "layer_ref_sentinel = object()",
     "layer_sentinel = object()", "layer_ref_sentinel: not defined"),
])
def test_source_checker_sees_changes(source_copy, module, old, new, expected) -> None:
    path = source_copy.joinpath(*module.split(".")).with_suffix(".py")
    original = path.read_text()
    assert old in original, (module, old)
    path.write_text(original.replace(old, new))
    try:
        problems = contract.check_source_tree(source_copy)
    finally:
        path.write_text(original)
    assert any(expected in p for p in problems), problems


def test_source_checker_needs_a_vllm_tree(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no vllm/__init__.py"):
        contract.check_source_tree(tmp_path)


def test_unlisted_vllm_attribute_cannot_be_patched() -> None:
    from vllm.engine.arg_utils import EngineArgs

    from vllm_rl_compat.patching import patch_method

    with pytest.raises(KeyError, match="EngineArgs.from_cli_args is not in"):
        patch_method(EngineArgs, "from_cli_args", lambda f: f)
    assert not hasattr(EngineArgs.from_cli_args, contract.PATCH_MARK)


def test_added_methods_are_ours_only_and_added_once() -> None:
    """``patching.add_method``: only ``rl_compat_*`` names, never over a vLLM
    attribute, a second add is a no-op (what the engine-core commit relies on)."""
    from vllm_rl_compat.patching import add_method

    class Core:
        def step(self) -> int:
            return 1

    def rl_compat_probe(self) -> int:
        return 2

    with pytest.raises(ValueError, match="'probe': methods added to vLLM classes"):
        add_method(Core, "probe", rl_compat_probe)
    assert add_method(Core, "rl_compat_probe", rl_compat_probe) is True
    assert add_method(Core, "rl_compat_probe", rl_compat_probe) is False
    assert Core().rl_compat_probe() == 2
    Core.rl_compat_step = Core.step
    with pytest.raises(RuntimeError, match=r"cannot add .*Core\.rl_compat_step: it exists"):
        add_method(Core, "rl_compat_step", rl_compat_probe)


def test_optional_internal_missing_is_reported_by_name(monkeypatch) -> None:
    """The fast CPU apply's internals: a clear error the worker turns into the
    layerwise reload (``weights/worker._fast_reloader``)."""
    import vllm.model_executor.model_loader.reload.sanitize as sanitize

    from vllm_rl_compat.weights.worker.apply_cpu import check_internals

    assert contract.entry_for("layer_ref_sentinel").optional
    monkeypatch.delattr(sanitize, "layer_ref_sentinel")
    with pytest.raises(VLLMContractError, match="reload.sanitize.layer_ref_sentinel"):
        check_internals()


def test_caller_that_stops_calling_apply_head_is_named(monkeypatch) -> None:
    """What the plugin checks at load (``fp32_head.install``) when a vLLM
    release keeps ``_apply_head`` but stops calling it from a logits path."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    def get_top_tokens(self, lm_head, hidden_states, embedding_bias=None):
        return None

    monkeypatch.setattr(LogitsProcessor, "get_top_tokens", get_top_tokens)
    with pytest.raises(VLLMContractError, match="no longer calls it from get_top_tokens"):
        contract.require("LogitsProcessor._apply_head")


def test_probe_rejects_a_logits_path_without_the_fp32_head() -> None:
    """``probe_head`` on a model whose logits bypass the fp32 processor (as a
    vLLM that stopped calling ``_apply_head`` would): start-up fails."""
    from vllm_rl_compat.fp32_head import probe_head

    class Processor(torch.nn.Module):
        rl_mode, rl_apply_head_calls = "compute", 0

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.logits_processor = Processor()
            self.head = torch.nn.Linear(8, 16, bias=False, dtype=torch.bfloat16)

        def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
            return self.head(hidden)  # bf16, processor never called

    with pytest.raises(RuntimeError, match="did not call the fp32 head"):
        probe_head(Model(), torch.bfloat16, 8)
    with pytest.raises(RuntimeError, match="no fp32 LogitsProcessor"):
        probe_head(torch.nn.Linear(2, 2), torch.bfloat16, 2)


# ----------------------------------------------------- start-up in child processes
_CHILD = """
import json, sys
{mutate}
from vllm.plugins import load_general_plugins
try:
    load_general_plugins()
except Exception as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
    sys.exit(3)
import vllm.entrypoints.llm, vllm.v1.engine.async_llm, vllm.v1.worker.gpu_worker
from vllm_rl_compat.contract import wrapped_now
print(json.dumps({{"wrapped": wrapped_now()}}))
"""

_MUTATIONS = {
    "removed _apply_head": (
        "from vllm.model_executor.layers.logits_processor import LogitsProcessor\n"
        "del LogitsProcessor._apply_head",
        "logits_processor.LogitsProcessor._apply_head"),
    "renamed create_engine_config": (
        "from vllm.engine.arg_utils import EngineArgs\n"
        "EngineArgs.build_engine_config = EngineArgs.create_engine_config\n"
        "del EngineArgs.create_engine_config",
        "arg_utils.EngineArgs.create_engine_config"),
}


def _start(script: Path, mutate: str, switch: str) -> subprocess.Popen:
    """A child running ``_CHILD`` from a file (so ``inspect`` finds its source)."""
    script.write_text(_CHILD.format(mutate=mutate))
    env = {**os.environ, "VLLM_RL_COMPAT": switch}
    env.pop("VLLM_PLUGINS", None)
    return subprocess.Popen([sys.executable, str(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def children(tmp_path_factory) -> dict[str, tuple[int, str]]:
    """All start-up children at once (each pays one vLLM import)."""
    folder = tmp_path_factory.mktemp("children")
    cases = {**{name: (mutate, "1") for name, (mutate, _) in _MUTATIONS.items()},
             "rl on": ("", "1")}
    procs = {name: _start(folder / f"child{i}.py", mutate, switch)
             for i, (name, (mutate, switch)) in enumerate(cases.items())}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        lines = stdout.strip().splitlines()
        out[name] = (proc.returncode, lines[-1] if lines else stderr[-2000:])
    return out


@pytest.mark.parametrize("name", list(_MUTATIONS))
def test_changed_symbol_fails_startup_naming_it(children, name) -> None:
    import json

    code, last = children[name]
    assert code == 3, last
    result = json.loads(last)
    assert result["error"] == "VLLMContractError"
    assert _MUTATIONS[name][1] in result["message"]
    assert "checked on vLLM" in result["message"]


def test_rl_mode_wraps_what_the_contract_lists(children) -> None:
    import json

    code, last = children["rl on"]
    assert code == 0, last
    wrapped = set(json.loads(last)["wrapped"])
    assert {"vllm.engine.arg_utils:EngineArgs.create_engine_config",
            "vllm.plugins:load_endpoint_plugins",
            "vllm.entrypoints.llm:LLM.update_weights",
            "vllm.v1.engine.async_llm:AsyncLLM.finish_weight_update",
            # two capabilities hook the same module when it loads: both apply
            "vllm.v1.worker.gpu_worker:Worker.load_model",
            "vllm.v1.worker.gpu_worker:Worker.execute_model"} <= wrapped
    assert wrapped <= {e.target for e in contract.ENTRIES if e.use == "wrap"}
    # With the switch off the same list is empty: tests/test_switch_off.py.


@pytest.mark.parametrize("out_features", [1536, 40])  # oneDNN-sized; sgl-kernel-sized
def test_kept_linear_reprocess_skipped_only_without_weight_state(out_features) -> None:
    """``apply_cpu.weight_free`` on what vLLM's own CPU dispatch builds on this
    machine: a linear that kept its weight (the fallback, e.g. bf16 on AVX2)
    reads it per call and is skipped on reload; one whose weight vLLM packed
    away (a oneDNN handle or sgl-kernel copy in the closure) is not."""
    import torch
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    from vllm_rl_compat.weights.worker.apply_cpu import weight_free

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(out_features, 576, dtype=torch.bfloat16),
                                      requires_grad=False)
    live = layer.weight
    dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    kept = layer.weight is live and layer.weight.numel() > 0
    assert weight_free(layer.cpu_linear) == kept
    if kept:  # what the skip relies on: new values are used without a re-dispatch
        x = torch.randn(3, 576, dtype=torch.bfloat16)
        live.data.mul_(2)
        assert torch.equal(layer.cpu_linear(x, layer.weight, None),
                           torch.nn.functional.linear(x, live, None))
    handle = torch.ones(2)
    assert not weight_free(lambda x, weight, bias: handle)  # a captured tensor
