"""Metrics: diversity, coherence, KL, expected best-of-N, bootstrap CIs, cost accounting."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from prelogit.checks import ParameterError
from prelogit.metrics import (CostMeter, best_of_n_weights, bootstrap_ci, coherence, distinct_ngram_diversity,
                              diversity_per_response, expected_best_of_n, kl_aisp, kl_bon, paired_difference, rep_n,
                              word_tokens)


# ---- diversity --------------------------------------------------------------------------------

def test_word_tokens_lowercase_and_split_punctuation():
    assert word_tokens("Don't STOP, me now!") == ["don't", "stop", ",", "me", "now", "!"]
    assert word_tokens("  \n ") == []


def test_diversity_hand_computed():
    # 6 distinct-ish tokens: 5 bigrams (all unique), 4 trigrams, 3 four-grams.
    # rep_2 = 100 (1 - 5/6), rep_3 = 100 (1 - 4/5), rep_4 = 100 (1 - 3/4).
    text = "The cat sat on the mat"
    assert rep_n(text, 2) == pytest.approx(100 / 6)
    assert diversity_per_response([text])[0] == pytest.approx(5 / 6 * 4 / 5 * 3 / 4)
    # "a b a b a b a b": 7 bigrams / 2 unique, 6 trigrams / 2 unique, 5 four-grams / 2 unique.
    rep = "a b a b a b a b"
    assert diversity_per_response([rep])[0] == pytest.approx(2 / 8 * 2 / 7 * 2 / 6)


def test_diversity_orders_repetitive_below_distinct_and_averages():
    distinct = "I went to the market yesterday and bought fresh apples, bread and some cheese for lunch."
    repeated = "I am happy. I am happy. I am happy. I am happy. I am happy."
    d_distinct, d_repeated = diversity_per_response([distinct, repeated])
    assert d_distinct > 0.7
    assert d_repeated < 0.2
    assert distinct_ngram_diversity([distinct, repeated]) == pytest.approx((d_distinct + d_repeated) / 2)


def test_diversity_short_and_empty_texts_are_zero():
    # Fewer than 4 tokens: no 4-grams, rep_4 = 100, diversity 0 (the +1 convention of the ARGS code).
    assert diversity_per_response(["", "hello there"]) == [0.0, 0.0]


def test_diversity_rejects_bad_input():
    with pytest.raises(ParameterError, match="responses"):
        diversity_per_response("a single string")
    with pytest.raises(ParameterError, match="responses"):
        distinct_ngram_diversity([])


# ---- coherence and KL --------------------------------------------------------------------------

def test_coherence_is_rowwise_cosine():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    r = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [1.0, 0.0]])
    assert torch.allclose(coherence(p, r), torch.tensor([1.0, -1.0, 0.0]), atol=1e-6)
    with pytest.raises(ParameterError, match="prompt_emb"):
        coherence(p, r[:2])


def test_kl_closed_forms():
    assert kl_bon(1) == 0.0
    assert kl_bon(32) == pytest.approx(math.log(32) - 31 / 32)
    U = torch.ones(2, 3)
    assert kl_aisp(U, sigma=0.5) == pytest.approx(6 / (2 * 0.25))


# ---- expected best-of-N ------------------------------------------------------------------------

def _brute_force_best_of_n(r: torch.Tensor, v: torch.Tensor, N: int) -> float:
    subsets = list(itertools.combinations(range(len(r)), N))
    return sum(float(v[max(s, key=lambda i: float(r[i]))]) for s in subsets) / len(subsets)


@pytest.mark.parametrize("M,N", [(1, 1), (5, 1), (5, 3), (7, 4), (8, 8)])
def test_expected_best_of_n_matches_brute_force(M, N):
    g = torch.Generator().manual_seed(M * 10 + N)
    r = torch.randn(M, generator=g)
    v = torch.randn(M, generator=g)
    assert expected_best_of_n(r, N) == pytest.approx(_brute_force_best_of_n(r, r, N), abs=1e-12)
    assert expected_best_of_n(r, N, values=v) == pytest.approx(_brute_force_best_of_n(r, v, N), abs=1e-12)


def test_expected_best_of_n_limits_and_large_pool():
    r = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    assert expected_best_of_n(r, 1) == pytest.approx(float(r.double().mean()))
    assert expected_best_of_n(r, 2000) == pytest.approx(float(r.max()))
    w = best_of_n_weights(2000, 64)  # lgamma keeps C(2000, 64) ~ 1e120 finite
    assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(1.0)
    # Monotone in N.
    vals = [expected_best_of_n(r, n) for n in (1, 4, 16, 64)]
    assert vals == sorted(vals)


def test_expected_best_of_n_validation():
    with pytest.raises(ParameterError, match="N"):
        expected_best_of_n(torch.zeros(3), 4)
    with pytest.raises(ParameterError, match="values"):
        expected_best_of_n(torch.zeros(3), 2, values=torch.zeros(4))
    with pytest.raises(ParameterError, match="rewards"):
        expected_best_of_n(torch.tensor([0.0, float("nan")]), 1)


# ---- bootstrap ---------------------------------------------------------------------------------

def test_bootstrap_is_deterministic_and_brackets_the_mean():
    x = np.random.default_rng(3).normal(size=40)
    a, b = bootstrap_ci(x, seed=7), bootstrap_ci(x, seed=7)
    assert a == b
    mean, lo, hi = a
    assert mean == pytest.approx(x.mean())
    assert lo < mean < hi
    assert bootstrap_ci(x, seed=8) != a  # the seed matters
    assert bootstrap_ci([2.5]) == (2.5, 2.5, 2.5)


def test_bootstrap_coverage_near_nominal():
    # 300 data sets of 30 prompts from N(1, 1): a 90 % interval should cover the true mean in
    # roughly 90 % of them (the percentile bootstrap under-covers slightly at small P).
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(300):
        _, lo, hi = bootstrap_ci(rng.normal(1.0, 1.0, size=30), n_boot=1000, level=0.9, seed=i)
        covered += lo <= 1.0 <= hi
    assert 0.82 <= covered / 300 <= 0.96


def test_paired_difference_sign_and_shares():
    b = np.linspace(0, 1, 20)
    a = b + 0.5
    a[:5] = b[:5]  # 5 ties
    a[5] = b[5] - 1.0  # 1 loss
    res = paired_difference(a, b, seed=1)
    assert res.mean == pytest.approx(float(np.mean(a - b)))
    assert res.lo > 0 and res.hi > res.lo
    assert res.share_a_greater == pytest.approx(14 / 20)
    assert res.share_ties == pytest.approx(5 / 20)
    rev = paired_difference(b, a, seed=1)
    assert rev.mean == pytest.approx(-res.mean) and rev.hi < 0
    with pytest.raises(ParameterError, match="same shape"):
        paired_difference(a, b[:3])


def test_bootstrap_validation():
    with pytest.raises(ParameterError, match="level"):
        bootstrap_ci([1.0, 2.0], level=1.0)
    with pytest.raises(ParameterError, match="n_boot"):
        bootstrap_ci([1.0, 2.0], n_boot=0)
    with pytest.raises(ParameterError, match="x"):
        bootstrap_ci([])


# ---- cost meter --------------------------------------------------------------------------------

class _WordCount:
    """Reward: number of words in the response."""

    name = "word-count"

    def score(self, prompts, responses):
        return torch.tensor([float(len(r.split())) for r in responses])


def test_cost_meter_counts_and_times():
    m = CostMeter()
    with m.generation():
        sum(range(10000))
    with pytest.raises(RuntimeError):
        with m.reward():
            raise RuntimeError("time still counts")
    r = m.score(_WordCount(), "hi", ["one two", "three"])
    assert r.tolist() == [2.0, 1.0] and r.dtype == torch.float32
    assert m.reward_calls == 2 and m.reward_batches == 1
    assert m.time_generation_s > 0 and m.time_reward_s > 0
    total = CostMeter(forward_calls=3).add(m).add(m)
    assert total.reward_calls == 4 and total.forward_calls == 3
    d = total.as_dict()
    assert d["time_total_s"] == pytest.approx(d["time_generation_s"] + d["time_reward_s"])
    assert {"forward_calls", "new_tokens", "generations", "reward_calls", "time_generation_s",
            "time_reward_s"} <= set(d)
