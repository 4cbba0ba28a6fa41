"""Mismatch metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vllm_rl_compat.parity.metrics import compute_metrics, kl_k3, pearson, token_deltas

NEG_INF = float("-inf")


def test_identical_logprobs_give_zero_mismatch() -> None:
    seqs = [[-0.5, -1.0, -2.0], [-0.1]]
    m = compute_metrics(seqs, seqs)
    assert (m.sequences, m.tokens) == (2, 4)
    assert m.mean_abs_dlogp == 0.0 and m.rms_dlogp == 0.0 and m.max_abs_dlogp == 0.0
    assert m.kl_k3 == 0.0 and m.clip_rate == 0.0 and m.max_abs_dp == 0.0
    assert m.prob_corr == pytest.approx(1.0)
    assert m.support_mismatch == 0 and m.support_mismatch_rate == 0.0


def test_hand_computed_values() -> None:
    # deltas train - infer: +0.1, -0.3, 0.0, +0.5
    infer = [[-1.0, -2.0], [-0.5, -3.0]]
    train = [[-0.9, -2.3], [-0.5, -2.5]]
    m = compute_metrics(train, infer, epsilon=0.2)
    d = np.array([0.1, -0.3, 0.0, 0.5])
    assert m.mean_abs_dlogp == pytest.approx(0.9 / 4)
    assert m.rms_dlogp == pytest.approx(math.sqrt((0.01 + 0.09 + 0.25) / 4))
    assert m.max_abs_dlogp == pytest.approx(0.5)
    assert m.kl_k3 == pytest.approx(float(np.mean(np.exp(d) - 1 - d)))
    # ratios exp(d): 1.105 (in), 0.741 (out), 1.0 (in), 1.649 (out)
    assert m.clip_rate == pytest.approx(0.5)
    dp = [abs(math.exp(t) - math.exp(i)) for t, i in zip(sum(train, []), sum(infer, []))]
    assert m.max_abs_dp == pytest.approx(max(dp))
    assert m.prob_corr == pytest.approx(
        float(np.corrcoef(np.exp(sum(train, [])), np.exp(sum(infer, [])))[0, 1])
    )


def test_clip_rate_depends_on_epsilon() -> None:
    train, infer = [[-1.0 + math.log(1.15)]], [[-1.0]]  # ratio 1.15
    assert compute_metrics(train, infer, epsilon=0.2).clip_rate == 0.0
    assert compute_metrics(train, infer, epsilon=0.1).clip_rate == 1.0


def test_k3_is_kl_infer_to_train_in_expectation() -> None:
    # Tokens sampled from the inference policy q; k3 averages to KL(q || p).
    rng = np.random.default_rng(0)
    q = np.array([0.9, 0.1])  # KL(q || p) = 0.368, KL(p || q) = 0.511
    p = np.array([0.5, 0.5])
    x = rng.choice(2, size=200_000, p=q)
    est = kl_k3(np.log(p[x]) - np.log(q[x]))
    assert est == pytest.approx(float(np.sum(q * np.log(q / p))), rel=0.03)
    assert est != pytest.approx(float(np.sum(p * np.log(p / q))), rel=0.1)


def test_empty_input_and_empty_sequences() -> None:
    m = compute_metrics([], [])
    assert (m.sequences, m.tokens, m.support_mismatch) == (0, 0, 0)
    for name in ("mean_abs_dlogp", "rms_dlogp", "kl_k3", "clip_rate", "max_abs_dp",
                 "prob_corr", "support_mismatch_rate"):
        assert getattr(m, name) is None, name
    m = compute_metrics([[], [-0.5, -1.5]], [[], [-0.5, -1.0]])
    assert (m.sequences, m.tokens) == (2, 2)
    assert m.max_abs_dlogp == pytest.approx(0.5)


def test_eos_as_only_token_is_scored() -> None:
    # A sequence whose first sampled token is EOS still has one scored token.
    m = compute_metrics([[-0.2]], [[-0.3]])
    assert m.tokens == 1 and m.mean_abs_dlogp == pytest.approx(0.1)
    assert m.prob_corr is None  # one point: correlation undefined, not nan


def test_neg_inf_is_a_support_mismatch_not_nan() -> None:
    # token 2: trainer gives -inf (e.g. outside its top-p); token 3: engine -inf.
    train = [[-1.0, NEG_INF, -0.5, -2.0]]
    infer = [[-1.2, -0.7, NEG_INF, -2.0]]
    m = compute_metrics(train, infer, epsilon=0.2)
    values = [v for v in m.as_dict().values() if isinstance(v, float)]
    assert not any(math.isnan(v) or math.isinf(v) for v in values)
    assert m.tokens == 4 and m.support_mismatch == 2
    assert m.support_mismatch_rate == pytest.approx(0.5)
    # finite pairs: deltas +0.2 and 0.0
    assert m.mean_abs_dlogp == pytest.approx(0.1)
    assert m.max_abs_dlogp == pytest.approx(0.2)
    # clipped: ratio e^0.2 = 1.22 (out) + both mismatches; 0.0 is in -> 3/4
    assert m.clip_rate == pytest.approx(0.75)
    # probabilities are defined: |0 - e^-0.7| and |e^-0.5 - 0|
    assert m.max_abs_dp == pytest.approx(math.exp(-0.5))
    assert token_deltas(train, infer).tolist() == pytest.approx([0.2, 0.0])


def test_all_tokens_mismatched_leaves_finite_stats_none() -> None:
    m = compute_metrics([[NEG_INF]], [[-0.1]])
    assert m.support_mismatch == 1 and m.clip_rate == 1.0
    assert m.mean_abs_dlogp is None and m.kl_k3 is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.5])
def test_values_that_are_not_logprobs_raise(bad: float) -> None:
    with pytest.raises(ValueError, match=r"sequence 1 \(infer\): token 0"):
        compute_metrics([[-1.0], [-1.0]], [[-1.0], [bad]])


def test_length_mismatch_names_the_sequence() -> None:
    with pytest.raises(ValueError, match="sequence 1: train has 2 tokens, infer has 1"):
        compute_metrics([[-1.0], [-1.0, -2.0]], [[-1.0], [-1.0]])
    with pytest.raises(ValueError, match="2 sequences"):
        compute_metrics([[-1.0], [-1.0]], [[-1.0]])


def test_bad_epsilon() -> None:
    with pytest.raises(ValueError, match="epsilon"):
        compute_metrics([[-1.0]], [[-1.0]], epsilon=0.0)


def test_pearson_constant_side_is_none() -> None:
    assert pearson(np.array([0.1, 0.1]), np.array([0.2, 0.3])) is None
    assert pearson(np.array([0.1, 0.2]), np.array([0.2, 0.4])) == pytest.approx(1.0)
