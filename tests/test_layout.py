"""The weights package's layout is its process map, and old import paths hold.

``weights/`` has one sub-package per process of an update (front end, engine
core, workers, trainer) plus ``protocol/``, what they share. A module of one
process importing another process's package would hide a cross-process
dependency the state table does not show, so it fails here; so does a public
import path users have in their configs and code that stops resolving.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

WEIGHTS = Path(__file__).resolve().parents[1] / "vllm_rl_compat" / "weights"
ROLES = ("frontend", "engine_core", "worker", "trainer")


def _weights_imports(path: Path) -> set[str]:
    """The ``vllm_rl_compat.weights.<package>`` each import of ``path`` names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                 else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        for name in names:
            parts = name.split(".")
            if parts[:2] == ["vllm_rl_compat", "weights"] and len(parts) > 2:
                found.add(parts[2])
    return found


@pytest.mark.parametrize("package", ROLES + ("protocol",))
def test_a_process_package_imports_only_itself_and_the_protocol(package: str) -> None:
    files = sorted((WEIGHTS / package).glob("*.py"))
    assert files, package
    allowed = {package, "protocol"}
    crossing = {f.name: _weights_imports(f) - allowed for f in files}
    assert not any(crossing.values()), crossing


@pytest.mark.parametrize("qualname", [
    "vllm_rl_compat.weights.worker.WeightSyncExtension",  # users' worker_extension_cls
    "vllm_rl_compat.weights.trainer.RLCompatGlooTrainerInitInfo",
    "vllm_rl_compat.weights.trainer.RLCompatGlooTrainer",
    "vllm_rl_compat.weights.client.TokenHTTPClient",
    "vllm_rl_compat.weights.broadcast.TrainerBroadcaster",
    "vllm_rl_compat.weight_sync.WeightSync",
    "vllm_rl_compat.weight_sync.AsyncWeightSync",
])
def test_public_import_paths_resolve_as_vllm_resolves_them(qualname: str) -> None:
    from vllm.utils.import_utils import resolve_obj_by_qualname

    obj = resolve_obj_by_qualname(qualname)
    assert obj.__name__ == qualname.rsplit(".", 1)[1]
    assert obj.__module__.startswith("vllm_rl_compat.weights.")
