"""The pre-stated decision rule, the minimal detectable difference and the claims table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prelogit.checks import ParameterError
from prelogit.verdict import (best_of_claim, claims_markdown, compare, equivalence_claim, fmt_interval,
                              minimal_detectable_difference, superiority_claim)

# ---- minimal detectable difference -------------------------------------------------------------


def test_mdd_hand_computed():
    d = [1.0, 2.0, 3.0, 4.0]
    # sd(ddof=1) = sqrt(((1.5^2 + 0.5^2) * 2) / 3) = sqrt(5/3); z_0.975 = 1.959964, z_0.8 = 0.841621
    expected = (1.959964 + 0.841621) * math.sqrt(5 / 3) / math.sqrt(4)
    assert minimal_detectable_difference(d) == pytest.approx(expected, rel=1e-5)
    # level 0.9, power 0.5: z_0.95 = 1.644854, z_0.5 = 0
    assert minimal_detectable_difference(d, level=0.9, power=0.5) == pytest.approx(
        1.644854 * math.sqrt(5 / 3) / 2, rel=1e-5)


def test_mdd_shrinks_like_one_over_sqrt_p():
    base = np.array([-1.0, 0.5, 2.0, 0.0, 1.5])
    m1 = minimal_detectable_difference(base)
    m4 = minimal_detectable_difference(np.tile(base, 4))  # 4x the prompts, almost the same sd
    sd1, sd4 = base.std(ddof=1), np.tile(base, 4).std(ddof=1)
    assert m4 == pytest.approx(m1 / 2 * sd4 / sd1, rel=1e-12)
    rng = np.random.default_rng(0)
    m_small = minimal_detectable_difference(rng.normal(size=100))
    m_large = minimal_detectable_difference(rng.normal(size=10_000))
    assert m_large / m_small == pytest.approx(0.1, rel=0.05)


def test_mdd_zero_spread_and_bad_inputs():
    assert minimal_detectable_difference([0.3, 0.3, 0.3]) == 0.0
    for bad in ([1.0], [], [[1.0, 2.0]], [1.0, float("nan")], "ab"):
        with pytest.raises(ParameterError):
            minimal_detectable_difference(bad)
    for kw in ({"level": 1.0}, {"level": 0.0}, {"power": 1.0}, {"power": 0.0}, {"power": -0.1}):
        with pytest.raises(ParameterError):
            minimal_detectable_difference([1.0, 2.0], **kw)


# ---- compare: the decision rule ----------------------------------------------------------------


def test_compare_three_decisions():
    rng = np.random.default_rng(1)
    b = rng.normal(size=200)
    a_up = b + 1.0 + 0.1 * rng.normal(size=200)
    up = compare(a_up, b)
    assert up["decision"] == "AISP better" and up["lo"] > 0
    down = compare(b - 1.0 + 0.1 * rng.normal(size=200), b, names=("x", "y"))
    assert down["decision"] == "y better" and down["hi"] < 0
    null = compare(b + rng.normal(size=200), b + rng.normal(size=200))
    assert null["lo"] <= 0 <= null["hi"]
    assert null["decision"] == "no difference detected"
    assert set(up) == {"mean", "lo", "hi", "level", "n_prompts", "win_share", "share_ties", "mdd", "decision"}
    assert up["n_prompts"] == 200 and up["level"] == 0.95
    assert up["mdd"] == pytest.approx(minimal_detectable_difference(a_up - b))
    assert 0 < up["mdd"] < 0.1  # differences have sd 0.1 over 200 prompts


def test_compare_matches_hand_numbers():
    a, b = [3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 3.0, 2.0]
    c = compare(a, b, n_boot=500, seed=3)
    assert c["mean"] == pytest.approx(np.mean([2.0, 0.0, -1.0, 3.0]))
    assert c["mdd"] == pytest.approx(minimal_detectable_difference([2.0, 0.0, -1.0, 3.0]))
    assert c["lo"] <= c["mean"] <= c["hi"]
    assert compare(a, b, n_boot=500, seed=3) == c  # deterministic for a seed


def test_win_share_counts_ties_as_half():
    a = [1.0, 2.0, 3.0, 4.0]
    b = [0.0, 2.0, 3.0, 5.0]  # one win, two ties, one loss
    c = compare(a, b, n_boot=100)
    assert c["share_ties"] == pytest.approx(0.5)
    assert c["win_share"] == pytest.approx((1 + 0.5 * 2) / 4)
    assert compare(b, a, n_boot=100)["win_share"] == pytest.approx(0.5)
    assert compare([1.0, 1.0], [1.0, 1.0], n_boot=10)["win_share"] == 0.5
    assert compare([2.0, 3.0], [1.0, 1.0], n_boot=10)["win_share"] == 1.0


def test_all_ties_is_no_difference():
    c = compare([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], n_boot=50)
    assert (c["lo"], c["hi"]) == (0.0, 0.0)
    assert c["decision"] == "no difference detected"


def test_compare_bad_inputs():
    with pytest.raises(ParameterError):
        compare([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ParameterError):
        compare([1.0], [2.0])
    with pytest.raises(ParameterError):
        compare([1.0, float("inf")], [1.0, 2.0])
    with pytest.raises(ParameterError):
        compare([1.0, 2.0], [1.0, 2.0], names=("same", "same"))
    with pytest.raises(ParameterError):
        compare([1.0, 2.0], [1.0, 2.0], names="ab")
    with pytest.raises(ParameterError):
        compare([1.0, 2.0], [1.0, 2.0], level=1.5)
    with pytest.raises(ParameterError):
        compare([1.0, 2.0], [1.0, 2.0], n_boot=0)


# ---- superiority and equivalence ---------------------------------------------------------------


def test_superiority_boundaries():
    assert superiority_claim({"lo": 0.01, "hi": 1.0}) == "held"
    assert superiority_claim({"lo": 0.0, "hi": 1.0}) == "inconclusive"  # touching 0 is not > 0
    assert superiority_claim({"lo": -1.0, "hi": 0.0}) == "inconclusive"
    assert superiority_claim({"lo": -1.0, "hi": -0.01}) == "not held"
    with pytest.raises(ParameterError):
        superiority_claim({"lo": 1.0})
    with pytest.raises(ParameterError):
        superiority_claim({"lo": 1.0, "hi": 0.0})
    with pytest.raises(ParameterError):
        superiority_claim({"lo": float("nan"), "hi": 0.0})


def test_equivalence_boundaries():
    m = 0.5
    assert equivalence_claim({"lo": -0.5, "hi": 0.5}, m) == "held"  # closed interval
    assert equivalence_claim({"lo": -0.1, "hi": 0.2}, m) == "held"
    assert equivalence_claim({"lo": -0.1, "hi": 0.51}, m) == "inconclusive"
    assert equivalence_claim({"lo": -0.6, "hi": 0.6}, m) == "inconclusive"  # wider than the margin
    assert equivalence_claim({"lo": 0.5, "hi": 0.9}, m) == "higher (detected)"  # touches the margin, excludes 0
    assert equivalence_claim({"lo": -0.7, "hi": -0.1}, m) == "lower (detected)"  # straddles -m, excludes 0
    assert equivalence_claim({"lo": -0.7, "hi": 0.0}, m) == "inconclusive"  # reaches 0: nothing detected
    assert equivalence_claim({"lo": 0.51, "hi": 0.9}, m) == "not held"
    assert equivalence_claim({"lo": -0.9, "hi": -0.51}, m) == "not held"
    # a clear superiority can still be an equivalence within a generous margin
    assert equivalence_claim({"lo": 0.1, "hi": 0.2}, m) == "held"
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ParameterError):
            equivalence_claim({"lo": -0.1, "hi": 0.1}, bad)


def test_claims_from_compare():
    rng = np.random.default_rng(2)
    b = rng.normal(size=300)
    c = compare(b + 0.3, b + 0.01 * rng.normal(size=300))
    assert superiority_claim(c) == "held"
    assert equivalence_claim(c, 1.0) == "held"
    assert equivalence_claim(c, 0.1) == "not held"


# ---- best-of claim -----------------------------------------------------------------------------


def _settings(shift_b: float, shift_c: float, noise: float = 0.05, p: int = 150, seed: int = 4) -> dict:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=p)
    return {"A": list(base + 1.0),
            "B": list(base + 1.0 + shift_b + noise * rng.normal(size=p)),
            "C": list(base + 1.0 + shift_c + noise * rng.normal(size=p))}


def test_best_of_claim_held():
    r = best_of_claim(_settings(-0.5, -1.0), "A", n_boot=500)
    assert r["verdict"] == "held" and r["best"] == "A"
    assert set(r["comparisons"]) == {"B", "C"}
    assert r["comparisons"]["B"]["decision"] == "A better"
    assert r["means"]["A"] > r["means"]["B"] > r["means"]["C"]


def test_best_of_claim_not_held():
    r = best_of_claim(_settings(-0.5, +0.5), "A", n_boot=500)
    assert r["verdict"] == "not held" and r["best"] == "C"
    assert r["comparisons"]["C"]["decision"] == "C better"


def test_best_of_claim_inconclusive():
    # A is clearly above C but indistinguishable from B: A - B is +1, -1, +1, ... (mean exactly 0)
    s = _settings(0.0, -1.0, noise=0.0, p=150)
    s["B"] = [x + (-1.0) ** i for i, x in enumerate(s["A"])]
    r = best_of_claim(s, "A", n_boot=500)
    assert r["comparisons"]["C"]["lo"] > 0
    assert r["comparisons"]["B"]["lo"] <= 0 <= r["comparisons"]["B"]["hi"]
    assert r["verdict"] == "inconclusive"


def test_best_of_claim_bad_inputs():
    s = _settings(-0.5, -1.0, p=10)
    with pytest.raises(ParameterError):
        best_of_claim(s, "D")
    with pytest.raises(ParameterError):
        best_of_claim({**s, "B": s["B"][:-1]}, "A")
    with pytest.raises(ParameterError):
        best_of_claim({"A": s["A"]}, "A")
    with pytest.raises(ParameterError):
        best_of_claim({**s, "C": s["C"][:-1] + [float("nan")]}, "A")


# ---- rendering ---------------------------------------------------------------------------------


def test_claims_markdown_escapes_and_bolds():
    md = claims_markdown([
        {"claim": "AISP > best-of-N | reward", "verdict": "held", "evidence": "+0.12 [+0.05, +0.30]"},
        {"claim": "comparable\ndiversity", "verdict": "inconclusive", "evidence": "a|b"},
    ])
    lines = md.strip().split("\n")
    assert lines[0] == "| claim | verdict | evidence |"
    assert lines[1] == "|---|---|---|"
    assert lines[2] == "| AISP > best-of-N \\| reward | **held** | +0.12 [+0.05, +0.30] |"
    assert lines[3] == "| comparable diversity | **inconclusive** | a\\|b |"
    assert len(lines) == 4
    # every row has exactly four unescaped pipes, so each has three cells
    for line in lines:
        assert line.replace("\\|", "").count("|") == 4
    assert claims_markdown([]).strip().split("\n") == lines[:2]


def test_claims_markdown_bad_rows():
    with pytest.raises(ParameterError):
        claims_markdown([{"claim": "x", "verdict": "held"}])
    with pytest.raises(ParameterError):
        claims_markdown(["not a dict"])
    with pytest.raises(ParameterError):
        claims_markdown({"claim": "x", "verdict": "held", "evidence": "e"})


def test_fmt_interval():
    assert fmt_interval({"mean": 0.12, "lo": -0.05, "hi": 0.30}) == "+0.12 [-0.05, +0.30]"
    assert fmt_interval({"mean": -1.23456, "lo": -2.0, "hi": -0.5}, digits=3) == "-1.235 [-2.000, -0.500]"
    assert fmt_interval({"mean": -0.001, "lo": -0.004, "hi": 0.0}) == "-0.001 [-0.004, +0.00]"  # sign kept, no "-0.00"
    c = compare([3.0, 1.0, 2.0, 5.0], [1.0, 1.0, 3.0, 2.0], n_boot=200)
    assert fmt_interval(c).startswith("+1.00 [")
    with pytest.raises(ParameterError):
        fmt_interval({"lo": 0.0, "hi": 1.0})
    with pytest.raises(ParameterError):
        fmt_interval({"mean": 0.5, "lo": 0.0, "hi": 1.0}, digits=-1)


def test_claims_on_fewer_than_min_prompts_are_inconclusive_whatever_the_interval():
    from prelogit import verdict

    few = verdict.compare([5.0, 6.0, 7.0], [0.0, 0.5, 1.0])
    assert few["decision"] == "AISP better"  # the verdict table still reports the interval's decision
    assert verdict.superiority_claim(few) == verdict.INCONCLUSIVE
    assert verdict.equivalence_claim(verdict.compare([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]), 0.1) == verdict.INCONCLUSIVE
    assert verdict.best_of_claim({"a": [5.0, 6.0, 7.0], "b": [0.0, 0.5, 1.0]}, "a")["verdict"] == verdict.INCONCLUSIVE
    many = verdict.compare([5.0, 6.0, 7.0] * 11, [0.0, 0.5, 1.0] * 11)
    assert many["n_prompts"] >= verdict.MIN_PROMPTS and verdict.superiority_claim(many) == verdict.HELD


def test_an_interval_end_that_rounds_to_zero_keeps_its_sign():
    assert fmt_interval({"mean": -0.18, "lo": -0.35, "hi": -0.0012}) == "-0.18 [-0.35, -0.001]"
    assert fmt_interval({"mean": 0.0, "lo": -0.1, "hi": 0.00004}) == "+0.00 [-0.10, +0.00004]"
    assert fmt_interval({"mean": 0.0, "lo": -0.1, "hi": 0.0}) == "+0.00 [-0.10, +0.00]"


def test_what_wins_separates_the_sampler_from_the_adaptation():
    from prelogit.verdict import MIN_PROMPTS, what_wins

    def cmp(lo, hi, n=MIN_PROMPTS):
        return {"mean": (lo + hi) / 2, "lo": lo, "hi": hi, "n_prompts": n}

    up, zero, down = cmp(0.2, 0.6), cmp(-0.2, 0.3), cmp(-0.9, -0.1)
    assert what_wins(up, up) == "the adaptation and the sampler"
    assert what_wins(up, zero) == "the adaptation"
    assert what_wins(zero, up) == "the sampler"
    assert what_wins(down, up) == "the sampler; the adaptation loses part of it"
    assert what_wins(zero, zero) == what_wins(down, down) == "neither"
    assert what_wins(cmp(0.2, 0.6, n=MIN_PROMPTS - 1), up).startswith("undecided")
    real = compare([3.0, 4.0, 5.0, 6.0] * 8, [1.0, 1.5, 2.0, 3.0] * 8, n_boot=200)
    same = compare([1.0, 2.0, 3.0, 4.0] * 8, [1.0, 2.0, 3.0, 4.0] * 8, n_boot=200)
    assert what_wins(same, real) == "the sampler"
