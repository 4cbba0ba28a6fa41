"""Per-step metrics of the online run (pure functions, no torch, no vLLM).

Per token ``t`` of a step's batch, with ``mu`` the engine's (behaviour)
logprob of the sampled token, ``pi`` the trainer's at its first forward of the
step (current weights), and ``pi_v`` the trainer's under the weights of the
version ``v`` that sampled the token:

* log ratio ``r = pi - mu``; ``clip_rate`` = mean of ``|exp(r) - 1| > eps``;
  ``kl`` = mean of ``exp(r) - 1 - r`` (k3, estimates KL(engine || trainer));
  ``mean_abs_log_ratio`` = mean of ``|r|``: what the trainer sees (staleness
  and mismatch together).
* ``mismatch_kl`` = mean of ``exp(m) - 1 - m`` with ``m = pi_v - mu``: the
  mismatch alone (``mismatch_abs`` = mean ``|m|``). At a learning rate of 0
  it is the static report's k3 for the same tokens.
* ``entropy``: mean over tokens of the trainer's policy entropy (nats).
* ``reward``: mean over the step's samples.
* ``lag`` = trainer version - ``v``; ``stale_prefix`` tokens are those of a
  request whose prompt KV (``prompt_weight_versions``) was already older than
  its first sampled token (a prefix-cache hit on KV of older weights); the
  breakdowns split ``mismatch_kl`` by both.
* ``mixed_kv`` tokens are those whose context KV (the prompt's, or an earlier
  token's of the same sequence) was computed by an older version than the
  token's own: stale-prefix tokens, and in keep mode every token sampled
  after an update that found its request running. The rescoring recomputes
  that context under the token's version, so their mismatch includes the KV
  difference; ``mismatch_kl_single_version`` (every position of the context
  computed by the sampling version) is the part the static report measures.

Tokens with a non-finite trainer logprob (support mismatch) are counted and
left out of the averages; tokens with no known version are counted as
``unattributed`` and left out of the mismatch-alone numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Sample:
    """One sampled completion, as the trainer receives it."""

    prompt: list[int]
    tokens: list[int]
    behaviour: list[float]  # the engine's logprob of each sampled token
    versions: list[int | None]  # the weight version that sampled each token
    prompt_version: int | None  # oldest version of the prompt's KV (None: unknown)
    reward: float
    finished: bool = False

    @property
    def stale_prefix(self) -> list[bool]:
        """Per token: was the prompt's KV already older than the request's first
        token, i.e. read from a prefix cache filled by older weights? (A request
        kept running across an update also decodes on older KV: that is keep
        mode, counted by ``version_spanning_sequences``, not here.)"""
        old, first = self.prompt_version, self.versions[0] if self.versions else None
        stale = old is not None and first is not None and old < first
        return [stale] * len(self.versions)

    @property
    def mixed_kv(self) -> list[bool]:
        """Per token: was any KV it attended to computed by an older version
        (the prompt's, or an earlier token's of this sequence)? Versions never
        decrease along a sequence, so the oldest context is the prompt's or the
        first token's."""
        out, oldest = [], self.prompt_version
        for v in self.versions:
            if oldest is None or (v is not None and v < oldest):
                oldest = v
            out.append(v is not None and oldest is not None and oldest < v)
        return out


@dataclass
class Scores:
    """The trainer's numbers for one sample."""

    train: list[float]  # current weights
    entropy: list[float]
    rescored: list[float | None] = field(default_factory=list)  # sampling version's weights


def _k3(delta: np.ndarray) -> float | None:
    return float(np.mean(np.expm1(delta) - delta)) if delta.size else None


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def step_metrics(samples: Sequence[Sample], scores: Sequence[Scores], trainer_version: int,
                 epsilon: float) -> dict[str, float | int | None]:
    """Every metric of one step (see the module docstring for the formulas)."""
    mu = np.array([x for s in samples for x in s.behaviour], dtype=np.float64)
    pi = np.array([x for s in scores for x in s.train], dtype=np.float64)
    ent = np.array([x for s in scores for x in s.entropy], dtype=np.float64)
    versions = [v for s in samples for v in s.versions]
    stale = np.array([x for s in samples for x in s.stale_prefix], dtype=bool)
    mixed = np.array([x for s in samples for x in s.mixed_kv], dtype=bool)
    rescored = np.array([math.nan if x is None else x for s in scores for x in s.rescored],
                        dtype=np.float64)
    if not (mu.size == pi.size == ent.size == len(versions) == rescored.size):
        raise ValueError("samples and scores disagree on the number of tokens")
    finite = np.isfinite(pi)
    r = (pi - mu)[finite]
    known = np.array([v is not None for v in versions], dtype=bool)
    lag = np.array([trainer_version - v if v is not None else -1 for v in versions])
    m_ok = known & np.isfinite(rescored)
    m = rescored - mu
    out: dict[str, float | int | None] = {
        "tokens": int(mu.size),
        "sequences": len(samples),
        "clip_rate": _mean((np.abs(np.expm1(r)) > epsilon).astype(np.float64)),
        "kl": _k3(r),
        "mean_abs_log_ratio": _mean(np.abs(r)),
        "entropy": _mean(ent[np.isfinite(ent)]),
        "reward": float(np.mean([s.reward for s in samples])) if samples else None,
        "finished_rate": float(np.mean([s.finished for s in samples])) if samples else None,
        "mean_length": float(np.mean([len(s.tokens) for s in samples])) if samples else None,
        "support_mismatch": int((~finite).sum()),
        "mismatch_kl": _k3(m[m_ok]),
        "mismatch_abs": _mean(np.abs(m[m_ok])),
        "unattributed_tokens": int((~known).sum()),
        "lag_mean": _mean(lag[known].astype(np.float64)),
        "lag_max": int(lag[known].max()) if known.any() else None,
        "lag0_tokens": int((known & (lag == 0)).sum()),
        "mismatch_kl_lag0": _k3(m[m_ok & (lag == 0)]),
        "mismatch_kl_lag1plus": _k3(m[m_ok & (lag >= 1)]),
        "stale_prefix_tokens": int(stale.sum()),
        "mismatch_kl_stale_prefix": _k3(m[m_ok & stale]),
        "mismatch_kl_fresh_prefix": _k3(m[m_ok & ~stale]),
        "mixed_kv_tokens": int(mixed.sum()),
        "mismatch_kl_mixed_kv": _k3(m[m_ok & mixed]),
        "mismatch_kl_single_version": _k3(m[m_ok & ~mixed]),
        "version_spanning_sequences": sum(len({v for v in s.versions}) > 1 for s in samples),
    }
    return out


def group_advantages(rewards: Sequence[float], group_size: int) -> list[float]:
    """GRPO advantages: reward minus its group's mean, over the group's std
    (+1e-6); groups are consecutive runs of ``group_size`` samples."""
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = np.array(rewards[start:start + group_size], dtype=np.float64)
        out += ((group - group.mean()) / (group.std() + 1e-6)).tolist()
    return out
