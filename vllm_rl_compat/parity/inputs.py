"""Bad input to ``check`` and ``--fail-above`` thresholds (static and online).

Its own module so that the online run (``online/command.py``) and the static
command (``parity/command.py``) share them without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from vllm_rl_compat.parity.metrics import HIGHER_IS_BETTER, METRIC_NAMES


class CheckInputError(ValueError):
    """Bad input to ``check``; the message names the offending value."""


@dataclass(frozen=True)
class Threshold:
    """``--fail-above METRIC=VALUE``: fail when the RL row's METRIC > VALUE."""

    metric: str
    limit: float


def parse_threshold(text: str, allowed: Sequence[str] | None = None) -> Threshold:
    """Parse ``METRIC=VALUE``; errors name the spec and what is accepted
    (``allowed``: the static report's metrics unless given)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if allowed is None:
        allowed = [m for m in METRIC_NAMES if m not in HIGHER_IS_BETTER]
    if not sep:
        raise CheckInputError(f"--fail-above {text!r}: expected METRIC=VALUE, "
                              f"e.g. clip_rate=0.05")
    if name not in allowed:
        hint = " (higher is better, so it has no upper limit)" if name in HIGHER_IS_BETTER else ""
        raise CheckInputError(f"--fail-above {text!r}: unknown metric {name!r}{hint}; "
                              f"choose one of {', '.join(allowed)}")
    try:
        limit = float(raw)
    except ValueError:
        raise CheckInputError(f"--fail-above {text!r}: value {raw.strip()!r} "
                              f"is not a number") from None
    if math.isnan(limit):
        raise CheckInputError(f"--fail-above {text!r}: value must not be nan")
    return Threshold(name, limit)
