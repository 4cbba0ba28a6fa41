"""The one way this package changes vLLM: wrap a named attribute, once.

Why one helper: every vLLM attribute it wraps must be listed in
``contract.ENTRIES`` (checked before wrapping, so a renamed or changed symbol
fails loudly with its name instead of leaving RL mode half-applied), and a
second wrap of the same attribute (a plugin loaded twice, a test re-running
``install``) is detected by the mark on the wrapper instead of stacking.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any, Callable

from vllm_rl_compat.contract import PATCH_MARK as _MARK
from vllm_rl_compat.contract import check, entry_for_patch


def patch_method(owner: Any, name: str, wrap: Callable[[Any], Any]) -> bool:
    """Replace ``owner.name`` with ``wrap(original)``; ``False`` if already done.

    A vLLM ``owner`` must be listed in ``contract.ENTRIES``; the entry is
    checked first, so a renamed or changed symbol fails with its name.
    """
    entry = entry_for_patch(owner, name)
    if entry is not None:
        check(entry)
    original = owner.__dict__.get(name) if isinstance(owner, type) else None
    if original is None:
        original = getattr(owner, name, None)
    if original is None:
        raise RuntimeError(f"vllm-rl-compat cannot patch {_title(owner)}.{name}: it does "
                           f"not exist in this vLLM version")
    if hasattr(original, _MARK):
        return False
    replacement = wrap(original)
    setattr(replacement, _MARK, original)
    replacement.__name__ = getattr(original, "__name__", name)
    replacement.__doc__ = getattr(original, "__doc__", None)
    setattr(owner, name, replacement)
    return True


def add_method(owner: type, name: str, method: Callable[..., Any]) -> bool:
    """Give a vLLM class a method of ours (``False`` if already done).

    Only ``rl_compat_*`` names, which vLLM does not use, so nothing of vLLM's
    is replaced; vLLM reaches them by name (e.g. an engine-core utility call).
    """
    if not name.startswith("rl_compat_"):
        raise ValueError(f"{name!r}: methods added to vLLM classes are named rl_compat_*")
    current = owner.__dict__.get(name)
    if current is not None:
        if getattr(current, _MARK, None) is _ADDED:
            return False
        raise RuntimeError(f"vllm-rl-compat cannot add {_title(owner)}.{name}: it exists")
    setattr(method, _MARK, _ADDED)
    setattr(owner, name, method)
    return True


_ADDED = object()  # the mark of an added method (it wraps nothing)


def original_of(owner: Any, name: str) -> Any:
    """The unpatched ``owner.name`` (the attribute itself if not patched)."""
    current = getattr(owner, name)
    return getattr(current, _MARK, current)


def _title(owner: Any) -> str:
    return getattr(owner, "__qualname__", getattr(owner, "__name__", repr(owner)))


def when_imported(module_name: str, apply: Callable[[Any], None]) -> None:
    """Run ``apply(module)`` now if the module is loaded, else right after it loads.

    Lets a process that never imports the module (e.g. the front end, for a
    worker-only patch) never pay for it.
    """
    module = sys.modules.get(module_name)
    if module is not None:
        apply(module)
        return
    pending = next((f for f in sys.meta_path
                    if isinstance(f, _OnImport) and f.name == module_name), None)
    if pending is None:
        sys.meta_path.insert(0, _OnImport(module_name, [apply]))
    elif apply not in pending.applies:
        pending.applies.append(apply)


class _OnImport(importlib.abc.MetaPathFinder):
    """Calls each ``apply`` right after ``name`` is executed, then removes itself."""

    def __init__(self, name: str, applies: list[Callable[[Any], None]]) -> None:
        self.name = name
        self.applies = applies

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        spec = next((s for f in sys.meta_path if f is not self
                     and (s := getattr(f, "find_spec", lambda *a: None)(fullname, path, target))),
                    None)
        if spec is None:
            return None
        loader = spec.loader
        real_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            try:
                real_exec(module)
            finally:
                vars(loader).pop("exec_module", None)
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            for apply in self.applies:
                apply(module)

        loader.exec_module = exec_module
        return spec
