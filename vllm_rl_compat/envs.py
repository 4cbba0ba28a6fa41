"""Environment variables read by vllm-rl-compat, in one documented table.

Modelled on ``vllm/envs.py``: every variable the package reads is listed in
``environment_variables`` with a getter and a one-line description, so the
README table and the ``info`` command cannot drift from the code. Values are
read lazily (attribute access), because vLLM loads the plugin in processes
whose environment the user may have changed after import.

Ray workers: vLLM copies every variable whose name starts with ``VLLM_`` to
its Ray actors (``vllm.ray.ray_env.get_env_vars_to_copy``), so all variables
below reach workers on other nodes unless listed in Ray's non-carry-over file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

SWITCH = "VLLM_RL_COMPAT"
SWITCH_VALUES = ("0", "1")


def _switch() -> bool:
    """Return whether RL mode is on; any value but unset/0/1 is an error."""
    raw = os.environ.get(SWITCH, "0").strip()
    if raw == "":
        raw = "0"
    if raw not in SWITCH_VALUES:
        raise ValueError(
            f"{SWITCH}={raw!r} is not valid: accepted values are "
            f"'0' (off, the default) and '1' (RL mode on)."
        )
    return raw == "1"


def _cache_dir() -> Path:
    root = os.environ.get("VLLM_RL_COMPAT_CACHE") or "~/.cache/vllm-rl-compat"
    return Path(root).expanduser()


def _flag(name: str, default: str = "0") -> Callable[[], bool]:
    return lambda: os.environ.get(name, default).strip() == "1"


def _override_flag(name: str) -> Callable[[], bool | None]:
    """``1`` / ``0`` override an option; unset or empty: ``None`` (the option decides)."""
    def get() -> bool | None:
        value = os.environ.get(name, "").strip()
        if value not in ("", "0", "1"):
            raise ValueError(f"{name}={value!r} is not 0 or 1")
        return None if value == "" else value == "1"
    return get


# name -> (getter, description). The README table is checked against this.
environment_variables: dict[str, tuple[Callable[[], Any], str]] = {
    SWITCH: (
        _switch,
        "`1` turns RL mode on in every vLLM process; unset or `0` leaves vLLM "
        "untouched; any other value fails start-up.",
    ),
    "VLLM_RL_COMPAT_CACHE": (
        _cache_dir,
        "Cache directory for converted and generated models "
        "(default `~/.cache/vllm-rl-compat`).",
    ),
    "VLLM_RL_COMPAT_AUTOTUNE": (
        _flag("VLLM_RL_COMPAT_AUTOTUNE"),
        "`1` autotunes the Triton fp32 projection kernel instead of using its "
        "fixed launch configuration.",
    ),
    "VLLM_RL_COMPAT_FAST_RELOAD": (
        _flag("VLLM_RL_COMPAT_FAST_RELOAD", default="1"),
        "`0` makes weight updates on CPU use vLLM's layerwise reload instead of "
        "the fast apply (`weights/apply_cpu.py`; for comparisons; default `1`); "
        "read by the front end at each update.",
    ),
    "VLLM_RL_COMPAT_WEIGHT_STAGING": (
        lambda: os.environ.get("VLLM_RL_COMPAT_WEIGHT_STAGING") or None,
        "Overrides `rl_compat.weight_staging` (`auto`, `overlapped`, `in_pause`) "
        "for the updates a front end starts (for comparisons); read at each update.",
    ),
    "VLLM_RL_COMPAT_COPY_PLAN": (
        _flag("VLLM_RL_COMPAT_COPY_PLAN", default="0"),
        "`1` makes overlapped weight staging record how vLLM's `load_weights` "
        "writes the first update and replay those writes for later ones instead "
        "of running the loader (`weights/copy_plan.py`; opt-in: no gain measured "
        "yet, see the README); read at each update.",
    ),
    "VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP": (
        _override_flag("VLLM_RL_COMPAT_WEIGHT_STAGING_KEEP"),
        "`1` / `0` overrides `rl_compat.weight_staging_keep` for the updates a "
        "front end starts (for comparisons); read at each update.",
    ),
    "VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB": (
        lambda: float(os.environ["VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB"])
        if os.environ.get("VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB") else None,
        "Overrides `rl_compat.weight_staging_max_gib` for the updates a front end "
        "starts (for tests and comparisons); read at each update.",
    ),
    "VLLM_RL_COMPAT_WEIGHT_UPDATE_LEASE_S": (
        lambda: float(os.environ["VLLM_RL_COMPAT_WEIGHT_UPDATE_LEASE_S"])
        if os.environ.get("VLLM_RL_COMPAT_WEIGHT_UPDATE_LEASE_S") else None,
        "Overrides `rl_compat.weight_update_lease_s` for the updates a front end "
        "starts (for tests); read at each update.",
    ),
    "VLLM_RL_COMPAT_CONTROL_TOKEN": (
        lambda: os.environ.get("VLLM_RL_COMPAT_CONTROL_TOKEN") or None,
        "Bearer token of the RL HTTP routes on `vllm serve` (never `--api-key` / "
        "`VLLM_API_KEY`, the inference users' key; without it the routes are not "
        "mounted); `TokenHTTPClient` reads it too.",
    ),
    "VLLM_RL_COMPAT_TXN_SECRET": (
        lambda: os.environ.get("VLLM_RL_COMPAT_TXN_SECRET") or None,
        "Internal: set by the plugin in the front end (random) and inherited by "
        "its engine core and workers, which accept weight steps only with its "
        "proof. Do not set it yourself.",
    ),
}

VLLM_RL_COMPAT: bool
VLLM_RL_COMPAT_CACHE: Path
VLLM_RL_COMPAT_AUTOTUNE: bool
VLLM_RL_COMPAT_FAST_RELOAD: bool
VLLM_RL_COMPAT_WEIGHT_STAGING: str | None
VLLM_RL_COMPAT_COPY_PLAN: bool
VLLM_RL_COMPAT_WEIGHT_STAGING_MAX_GIB: float | None
VLLM_RL_COMPAT_WEIGHT_UPDATE_LEASE_S: float | None
VLLM_RL_COMPAT_CONTROL_TOKEN: str | None
VLLM_RL_COMPAT_TXN_SECRET: str | None


def __getattr__(name: str) -> Any:
    if name in environment_variables:
        return environment_variables[name][0]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(environment_variables)
