"""Train-inference mismatch metrics on per-token logprobs of sampled tokens.

Inputs are two parallel lists of sequences: ``train[i][t]`` is the trainer's
(reference) logprob of the t-th sampled token of sequence i, and ``infer[i][t]``
the logprob the inference engine reported for the same token.  All tokens were
sampled by the engine, i.e. from the inference policy, which fixes the
direction of the KL estimate below.

Non-finite values.  A logprob of ``-inf`` means "this policy cannot produce the
token" (e.g. the trainer's top-p mask excludes a token the engine sampled, or
an engine bug).  Such a token is a *support mismatch*:

* it is counted in ``tokens`` and in ``support_mismatch`` / its rate;
* it counts as clipped (its importance ratio is 0 or infinite, which is outside
  any ``[1 - eps, 1 + eps]``), so ``clip_rate`` still sees it;
* probabilities are well defined (``exp(-inf) = 0``), so ``max_abs_dp`` and
  ``prob_corr`` include it;
* the logprob-difference statistics (mean/RMS/max |Δlogprob|, ``kl_k3``) are
  computed over the finite pairs only, because one infinity would turn them
  into ``inf``/``nan`` and hide everything else.  The report always shows
  ``support_mismatch`` next to them, so nothing is silently dropped.

``nan`` or ``+inf`` inputs are not logprobs at all and raise ``ValueError``.
A statistic with nothing to average (no tokens, or no finite pair) is ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

# Logprobs can come out a hair above 0 through rounding; beyond this they are
# not logprobs.
_MAX_LOGPROB = 1e-3

LogprobSeqs = Sequence[Sequence[float]]


@dataclass(frozen=True)
class MismatchMetrics:
    """Summary of how far the engine's token logprobs are from the trainer's.

    Differences are ``train - infer``.  ``kl_k3`` estimates KL(infer || train).
    """

    sequences: int
    tokens: int
    mean_abs_dlogp: float | None
    rms_dlogp: float | None
    max_abs_dlogp: float | None
    kl_k3: float | None
    clip_rate: float | None
    max_abs_dp: float | None
    prob_corr: float | None
    support_mismatch: int
    support_mismatch_rate: float | None
    epsilon: float

    def as_dict(self) -> dict[str, float | int | None]:
        """Plain dict for JSON/CSV output."""
        return asdict(self)


METRIC_NAMES: tuple[str, ...] = (
    "mean_abs_dlogp",
    "rms_dlogp",
    "max_abs_dlogp",
    "kl_k3",
    "clip_rate",
    "max_abs_dp",
    "prob_corr",
    "support_mismatch",
    "support_mismatch_rate",
)
"""Metric names usable in reports and thresholds (all: lower is better,
except ``prob_corr``: higher is better)."""

HIGHER_IS_BETTER = frozenset({"prob_corr"})


def flatten_pairs(train: LogprobSeqs, infer: LogprobSeqs) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate matching sequences into two float64 arrays, validating them.

    Raises ``ValueError`` naming the first sequence whose lengths differ or that
    holds a value that is not a logprob (nan, +inf, clearly positive).
    """
    if len(train) != len(infer):
        raise ValueError(f"train has {len(train)} sequences but infer has {len(infer)}")
    tr_parts, in_parts = [], []
    for i, (tr, inf) in enumerate(zip(train, infer)):
        tr_arr = np.asarray(tr, dtype=np.float64).reshape(-1)
        in_arr = np.asarray(inf, dtype=np.float64).reshape(-1)
        if tr_arr.shape != in_arr.shape:
            raise ValueError(
                f"sequence {i}: train has {tr_arr.size} tokens, infer has {in_arr.size}"
            )
        _check_logprobs(tr_arr, f"sequence {i} (train)")
        _check_logprobs(in_arr, f"sequence {i} (infer)")
        tr_parts.append(tr_arr)
        in_parts.append(in_arr)
    if not tr_parts:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(tr_parts), np.concatenate(in_parts)


def _check_logprobs(values: np.ndarray, where: str) -> None:
    """Reject values that cannot be logprobs instead of averaging them."""
    bad = np.isnan(values) | (values > _MAX_LOGPROB)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"{where}: token {j} has logprob {values[j]!r}, not a logprob")


def token_deltas(train: LogprobSeqs, infer: LogprobSeqs) -> np.ndarray:
    """Per-token ``train - infer`` over finite pairs (for plots and histograms)."""
    tr, inf = flatten_pairs(train, infer)
    finite = np.isfinite(tr) & np.isfinite(inf)
    return tr[finite] - inf[finite]


def compute_metrics(
    train: LogprobSeqs, infer: LogprobSeqs, epsilon: float = 0.2
) -> MismatchMetrics:
    """Compute all mismatch metrics; see the module docstring for edge cases.

    ``epsilon`` is the PPO-style clip range: a token is clipped when its
    importance ratio ``exp(train - infer)`` lies outside ``[1 - eps, 1 + eps]``.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    tr, inf = flatten_pairs(train, infer)
    finite = np.isfinite(tr) & np.isfinite(inf)
    delta = tr[finite] - inf[finite]
    n = int(tr.size)
    mismatched = n - int(finite.sum())
    return MismatchMetrics(
        sequences=len(train),
        tokens=n,
        mean_abs_dlogp=_mean(np.abs(delta)),
        rms_dlogp=None if delta.size == 0 else float(np.sqrt(np.mean(delta**2))),
        max_abs_dlogp=None if delta.size == 0 else float(np.max(np.abs(delta))),
        kl_k3=kl_k3(delta),
        clip_rate=_clip_rate(delta, mismatched, epsilon),
        max_abs_dp=None if n == 0 else float(np.max(np.abs(np.exp(tr) - np.exp(inf)))),
        prob_corr=pearson(np.exp(tr), np.exp(inf)),
        support_mismatch=mismatched,
        support_mismatch_rate=None if n == 0 else mismatched / n,
        epsilon=float(epsilon),
    )


def _mean(values: np.ndarray) -> float | None:
    """Mean, or None when there is nothing to average."""
    return None if values.size == 0 else float(np.mean(values))


def kl_k3(delta: np.ndarray) -> float | None:
    """k3 estimator of KL(infer || train) from ``delta = logp_train - logp_infer``.

    With tokens x ~ infer and r = log(train(x) / infer(x)),
    E[exp(r) - 1 - r] = E[train/infer] - 1 - E[r] = 0 + KL(infer || train).
    Each term is >= 0, so the estimate never goes negative (unlike the mean
    of -r), and it has low variance when the policies are close.
    """
    if delta.size == 0:
        return None
    return float(np.mean(np.expm1(delta) - delta))


def _clip_rate(delta: np.ndarray, mismatched: int, epsilon: float) -> float | None:
    """Fraction of tokens whose ratio leaves ``[1 - eps, 1 + eps]``.

    Support mismatches count as clipped: their ratio is 0 or infinite.
    """
    total = delta.size + mismatched
    if total == 0:
        return None
    clipped = int(np.count_nonzero(np.abs(np.expm1(delta)) > epsilon))
    return (clipped + mismatched) / total


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson correlation; None when undefined (< 2 points or a constant side)."""
    if x.size < 2:
        return None
    xc, yc = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    if denom == 0.0:
        return None
    return float(np.dot(xc, yc) / denom)
