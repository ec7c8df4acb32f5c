"""prelogit.claims: each claim graded from hand-made verdict rows and a synthetic tune search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prelogit import claims, comparisons, verdict
from prelogit.comparisons import BON, Comparison, Curves, Method, VerdictRows, aisp
from prelogit.selection import Search

ROOT = Path(__file__).resolve().parents[1]
CI = {"n_boot": 200, "level": 0.95, "seed": 0}
# multiples of 0.5: every difference below is exact, so a constant shift has the interval [shift, shift]
BASE = [0.5 * (i % 7) for i in range(40)]
IDS = [f"val-{i:03d}" for i in range(40)]
RMS = 2.0  # sigma_rms 0.25 -> sigma 0.50
ARMS = [  # arm 0 is the center; arm 7 differs from it in sigma and alpha, so it belongs to no one-factor claim
    {"label": "center", "sigma_rms": 0.25, "alpha": 0.0, "alpha_mode": "mppi", "lam": 0.1, "n": 16},
    {"label": "sigma_rms=0.1", "sigma_rms": 0.1, "alpha": 0.0, "alpha_mode": "mppi", "lam": 0.1, "n": 16},
    {"label": "sigma_rms=0.5", "sigma_rms": 0.5, "alpha": 0.0, "alpha_mode": "mppi", "lam": 0.1, "n": 16},
    {"label": "alpha(mppi)=0.9", "sigma_rms": 0.25, "alpha": 0.9, "alpha_mode": "mppi", "lam": 0.1, "n": 16},
    {"label": "lam=0.001", "sigma_rms": 0.25, "alpha": 0.0, "alpha_mode": "mppi", "lam": 0.001, "n": 16},
    {"label": "alpha(step)=0.1", "sigma_rms": 0.25, "alpha": 0.1, "alpha_mode": "step", "lam": 0.1, "n": 16},
    {"label": "alpha(step)=0.9", "sigma_rms": 0.25, "alpha": 0.9, "alpha_mode": "step", "lam": 0.1, "n": 16},
    {"label": "two factors", "sigma_rms": 0.5, "alpha": 0.9, "alpha_mode": "mppi", "lam": 0.1, "n": 16},
]
# arm -> its best reward minus BASE on every prompt: the center beats the other sigmas, alpha 0.9 beats 0.0
# under mppi and loses to 0.1 under step
HELD_OFFSETS = {0: 1.0, 1: 0.0, 2: 0.0, 3: 2.0, 4: 0.0, 5: 1.0, 6: 0.0, 7: 9.0}


def make_search(offsets=HELD_OFFSETS, n_claim=40, claim_arms=tuple(range(8)), lam_twin=0.0) -> Search:
    best = {i: [b + off for b in BASE] for i, off in offsets.items()}
    search = {
        "N": 64, "rms": RMS, "arms": ARMS, "claim_prompts": IDS[:n_claim],
        "rows": [{"arm": i, "ess_mean": 1.0, "per_prompt": {p: {"best": v, "score": v - 1} for p, v in zip(IDS, best[i])}}
                 for i in offsets],
        "readings": {"sample": {"rungs": [{"arms": list(range(8)), "prompts": 3}, {"arms": [0], "prompts": 40}],
                                "claim_arms": list(claim_arms), "center": 0, "arms": list(range(8)), "selected": 0}},
        "bon_at_N": {p: v - 0.5 for p, v in zip(IDS, best[4])},
    }
    if lam_twin is not None:
        search["lam_twin"] = {"arm": 4, "per_prompt": {p: v + lam_twin for p, v in zip(IDS, best[4])}}
    return Search(search, "sample")


@pytest.mark.parametrize(("offsets", "grade"), [
    (HELD_OFFSETS, verdict.HELD),
    ({**HELD_OFFSETS, 1: 1.5}, verdict.NOT_HELD),  # sigma = 0.20 beats the claimed 0.50
    ({**HELD_OFFSETS, 1: 1.0, 2: 1.0}, verdict.INCONCLUSIVE)])  # all three tie
def test_sigma_claim_grades_the_arms_that_differ_in_sigma_only(offsets, grade):
    c = claims.sigma_claim(make_search(offsets), **CI)
    assert c["verdict"] == grade and c["n_prompts"] == 40


def test_sigma_claim_evidence_and_too_few_prompts():
    c = claims.sigma_claim(make_search(), **CI)
    # the mean of BASE is 0.5 * (5 * 21 + 10) / 40 = 1.4375; arm 7 (+9) would make sigma = 1.00 the best
    assert c["evidence"] == ("40 validation prompts, sigma in pre-logit units (RMS 2.00): sigma = 0.50: +2.44, "
                             "sigma = 0.20: +1.44, sigma = 1.00: +1.44; best sigma = 0.50")
    assert claims.sigma_claim(make_search(n_claim=10), **CI)["verdict"] == verdict.INCONCLUSIVE


def test_alpha_claims_per_mode():
    mppi, step = claims.alpha_claims(make_search(), **CI)
    assert (mppi["claim"], mppi["verdict"]) == ("a small alpha gives a poor reward (mppi reading)", verdict.HELD)
    assert (step["claim"], step["verdict"]) == ("a small alpha gives a poor reward (step reading)", verdict.NOT_HELD)
    # first rung: the first 3 prompts, BASE mean 0.5
    assert mppi["evidence"] == ("alpha = 0.9 minus alpha = 0.0: +1.00 [+1.00, +1.00] (40 validation prompts); every "
                                "alpha on the first rung's 3 prompts: 0.0: +1.50, 0.9: +2.50")
    assert step["evidence"].startswith("alpha = 0.9 minus alpha = 0.1: -1.00 [-1.00, -1.00]")
    # a mode with a single claim arm makes no claim
    only = claims.alpha_claims(make_search(claim_arms=[0, 1, 2, 3, 4, 5]), **CI)
    assert [c["claim"] for c in only] == ["a small alpha gives a poor reward (mppi reading)"]


def test_lambda_claim_is_equivalence_with_the_twin():
    c = claims.lambda_claim(make_search(), bon_val_sd=1.0, margin_sd=0.2, **CI)
    assert c["verdict"] == verdict.HELD and c["n_prompts"] == 40
    assert c["evidence"] == ("lambda = 0.001 minus its frozen-U twin at N = 64: +0.00 [+0.00, +0.00] on 40 validation "
                             "prompts; margin +-0.20 (0.2 x within-prompt sd 1.00); minus temperature-1 best-of-64: "
                             "+0.50 [+0.50, +0.50]; ESS 1.00 of n = 16")
    assert claims.lambda_claim(make_search(lam_twin=1.0), 1.0, 0.2, **CI)["verdict"] == verdict.NOT_HELD
    assert claims.lambda_claim(make_search(lam_twin=0.1), 1.0, 0.2, **CI)["verdict"] == verdict.HELD  # inside +-0.2
    assert claims.lambda_claim(make_search(lam_twin=None), 1.0, 0.2, **CI) is None


def curve(by_N: dict[int, list[float]], n: int) -> list[dict]:
    return [{"N": N, "prompt_id": IDS[i], "reward": v[i]} for N, v in by_N.items() for i in range(n)]


def verdict_rows(n: int) -> VerdictRows:
    """AISP = best-of-N + 1 at N = 16 and 64; ARGS 1 below AISP, RE-Control 1 above it."""
    base = BASE[:n]
    c = Curves(bon=curve({16: base, 64: base}, n), aisp={"greedy": curve({16: [b + 1 for b in base], 64: [b + 1 for b in base]}, n)},
               frozen={"greedy": curve({16: base, 64: base}, n)},
               baselines={"ARGS": dict(zip(IDS, base)), "RE-Control": {p: b + 2 for p, b in zip(IDS, base)}})
    return comparisons.verdict_rows(c, ["greedy"], verdict_N=64, misvo_N=None, **CI)


def test_headline_held_with_the_other_budgets_in_evidence():
    h = claims.headline(verdict_rows(40), "greedy", 64)
    assert (h["claim"], h["verdict"], h["n_prompts"]) == ("AISP > best-of-N at equal N (greedy reading)", verdict.HELD, 40)
    assert h["evidence"] == ("N = 64, 40 test prompts: AISP (greedy) - best-of-N +1.00 [+1.00, +1.00], AISP wins 100%, "
                             "smallest detectable 0.00. N = 16 (40 prompts): +1.00 [+1.00, +1.00], AISP (greedy) better. ")


def test_headline_on_too_few_prompts_is_inconclusive_and_says_why():
    h = claims.headline(verdict_rows(10), "greedy", 64)
    assert h["verdict"] == verdict.INCONCLUSIVE and h["n_prompts"] == 10
    [noted] = claims.note_too_few([h])
    assert noted["evidence"].endswith("AISP (greedy) better. Fewer than 32 prompts: inconclusive by the stated rule.")


def test_headline_lists_the_literature_rows():
    rows = VerdictRows(**CI)
    a, b = dict(zip(IDS, [x + 1 for x in BASE])), dict(zip(IDS, BASE))
    rows.add(Comparison(aisp("greedy"), BON), 64, a, b)
    rows.add(Comparison(Method("aisp", lam=0.5), BON), 64, b, a)
    h = claims.headline(rows, "greedy", 64)
    assert h["evidence"].endswith(" AISP (literature, lambda = 0.5) at N = 64: -1.00 [-1.00, -1.00], best-of-N better")


def test_baseline_claims_find_their_rows_by_key():
    rows = verdict_rows(40)
    # verdict_rows added them with names=("AISP", "ARGS"): the key is the same without them
    assert rows.get(Comparison(aisp("greedy"), comparisons.ARGS), 64)["decision"] == "AISP better"
    assert claims.baseline_claims(rows, "greedy", 64) == [
        {"claim": "AISP > ARGS", "verdict": verdict.HELD, "n_prompts": 40,
         "evidence": "N = 64, 40 test prompts: +1.00 [+1.00, +1.00], AISP wins 100%"},
        {"claim": "AISP > RE-Control", "verdict": verdict.NOT_HELD, "n_prompts": 40,
         "evidence": "N = 64, 40 test prompts: -1.00 [-1.00, -1.00], AISP wins 0%"}]
    assert claims.baseline_claims(rows, "sample", 64) == [] and claims.baseline_claims(rows, "greedy", 16) == []


def test_misvo_claim_on_the_prompts_both_have():
    aisp_at = dict(zip(IDS, BASE))
    misvo_at = {**{p: b + 0.5 for p, b in zip(IDS, BASE)}, "extra": 99.0}
    c = claims.misvo_claim(aisp_at, misvo_at, 64, "K=8", "AISP (greedy)", **CI)
    assert (c["verdict"], c["n_prompts"]) == (verdict.HELD, 40)
    assert c["evidence"] == "N = 64, 40 test prompts: MISVO (K=8) - AISP (greedy) +0.50 [+0.50, +0.50], MISVO wins 100%"
    assert claims.misvo_claim(misvo_at, aisp_at, 64, "K=8", "AISP", **CI)["verdict"] == verdict.NOT_HELD


def test_comparable_claim_against_its_margin():
    claim, cmp = claims.comparable_claim("diversity", BASE, BASE, sd=0.5, margin_sd=0.2, N=64, **CI)
    assert (claim["claim"], claim["verdict"]) == ("diversity comparable to best-of-N", verdict.HELD)
    assert cmp["margin"] == pytest.approx(0.1)
    assert claim["evidence"] == ("N = 64, 40 prompts: AISP - best-of-N +0.000 [+0.000, +0.000], margin +-0.100 "
                                 "(0.2 x within-prompt sd 0.500)")
    shifted = [b + 1 for b in BASE]
    assert claims.comparable_claim("d", shifted, BASE, 0.5, 0.2, 64, **CI)[0]["verdict"] == verdict.NOT_HELD
    # below 0 by about the margin: the interval straddles -0.1 but excludes 0
    straddle = [b - (0.05 if i % 2 else 0.15) for i, b in enumerate(BASE)]
    assert claims.comparable_claim("d", straddle, BASE, 0.5, 0.2, 64, **CI)[0]["verdict"] == verdict.LOWER


def test_note_too_few_only_touches_inconclusive_claims_under_min_prompts():
    few = " Fewer than 32 prompts: inconclusive by the stated rule."
    cs = [{"verdict": verdict.INCONCLUSIVE, "n_prompts": 10, "evidence": "x = 1. "},
          {"verdict": verdict.INCONCLUSIVE, "n_prompts": 32, "evidence": "y"},
          {"verdict": verdict.HELD, "n_prompts": 10, "evidence": "z"},
          {"verdict": verdict.INCONCLUSIVE, "evidence": "w"}]
    assert [c["evidence"] for c in claims.note_too_few(cs)] == ["x = 1." + few, "y", "z", "w"]


def test_tally_counts_each_grade():
    grades = [verdict.HELD, verdict.HELD, verdict.NOT_HELD, verdict.INCONCLUSIVE, verdict.LOWER, verdict.HIGHER]
    assert claims.tally([{"verdict": g} for g in grades]) == {
        "claims_held": 2, "claims_not_held": 1, "claims_inconclusive": 1, "claims_difference_detected": 2}


def test_paired_values_for_a_judge_and_for_diversity():
    def rows(N, vals):
        return [{"N": N, "prompt_id": p, "reward": 0.0, "relevance": v} for p, v in vals.items()]
    aisp_curve = rows(4, {"p0": 0.1, "p1": 0.2, "p2": 0.3}) + rows(8, {"p3": 9.0})
    bon_curve = rows(4, {"p2": 0.6, "p1": 0.5, "p3": 0.7})
    assert claims.paired_values(4, "relevance", aisp_curve, bon_curve, {}, {}) == (["p1", "p2"], [0.2, 0.3], [0.5, 0.6])
    # diversity of "a b c d" is 0.25, of "a a a a" 1/24, of a single token 0
    answer = lambda a: {"iterations": [{"samples_so_far": 2, "best_so_far": {"response": "x"}},  # noqa: E731
                                       {"samples_so_far": 4, "best_so_far": {"response": a}}]}
    aisp_by_id = {"p1": answer("a b c d"), "p2": answer("a a a a")}
    bon_by_id = {"p1": {"responses": ["x", "a a a a", "x", "x", "a b c d"], "rewards": [0, 3, 1, 2, 9]},
                 "p2": {"responses": ["a b c d", "x", "x", "x"], "rewards": [5, 1, 1, 1]}}
    ids, a, b = claims.paired_values(4, "diversity", aisp_curve, bon_curve, aisp_by_id, bon_by_id)
    assert ids == ["p1", "p2"] and a == pytest.approx([0.25, 1 / 24]) and b == pytest.approx([1 / 24, 0.25])


def test_the_committed_claims_table_is_what_its_claims_render():
    summary = json.loads((ROOT / "results/figures/summary.json").read_text())
    assert len(summary["claims"]) > 0 and all(c["verdict"] in verdict.GRADES for c in summary["claims"])
    md = claims.markdown(summary["claims"])
    assert md.rstrip() == (ROOT / "results/figures/claims.md").read_text().rstrip()
