"""Same-host tensors as a safetensors file in shared memory (``/dev/shm``).

vLLM's RPC path cannot carry tensors to multiprocess workers (pickling
fails), so in-process tensors reach the workers as one file in RAM: written
before the engine pauses, read into staging by every worker, deleted when the
update ends. Workers on other hosts cannot see it: use the trainer broadcast
(``rl_compat_gloo``) there. Runs in the writer's process (front end or trainer).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any


def write_shm(pairs: list[tuple[str, Any]]) -> str:
    """Write ``(name, tensor)`` pairs to a fresh file; returns its path."""
    from safetensors.torch import save_file

    root = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = tempfile.mkdtemp(prefix="vllm-rl-compat-", dir=root)
    path = os.path.join(folder, "update.safetensors")
    try:
        save_file({n: t.detach().to("cpu").contiguous() for n, t in pairs}, path)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return path


def remove_shm(path: str) -> None:
    """Delete a file made by ``write_shm`` (and its private folder)."""
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)
