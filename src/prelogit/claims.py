"""The claims table: each of the paper's claims graded by the pre-stated rule (:mod:`prelogit.verdict`).

A claim is a dict ``{"claim", "verdict", "n_prompts", "evidence"}``: the claim as the paper makes
it, its grade (one of :data:`prelogit.verdict.GRADES`), the prompts it rests on and the numbers it
was graded from, as one line of text. The functions here assemble them from the verdict rows
(:mod:`prelogit.comparisons`) and from the tune stage's search (``results/tune/search.json``); the
figures notebook only displays them. Rewards are in the reward model's units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import verdict
from .comparisons import ARGS, BON, RECONTROL, Comparison, VerdictRows, aisp, per_prompt
from .metrics import diversity_per_response
from .selection import Search
from .tables import best_of_first, search_answer


def headline(rows: VerdictRows, reading: str, verdict_N: int) -> dict:
    """"AISP > best-of-N at equal N" for one reading, graded at ``verdict_N`` on its own test run.

    The evidence lists the other budgets and the literature configuration's rows beside it.
    """
    key = Comparison(aisp(reading), BON)
    main = rows[key, verdict_N]
    others = "; ".join(f"N = {r['N']} ({r['n_prompts']} prompts): {verdict.fmt_interval(r)}, {r['decision']}"
                       for r in rows.where(key) if r["N"] != verdict_N)
    lits = "; ".join(f"{c.first.label} at N = {N}: {verdict.fmt_interval(r)}, {r['decision']}"
                     for (c, N), r in rows.items() if c.first.kind == "aisp" and c.first.lam is not None)
    return {"claim": f"AISP > best-of-N at equal N ({reading} reading)", "verdict": verdict.superiority_claim(main),
            "n_prompts": main["n_prompts"],
            "evidence": f"N = {verdict_N}, {main['n_prompts']} test prompts: {key.first.label} - best-of-N "
                        f"{verdict.fmt_interval(main)}, AISP wins {main['win_share']:.0%}, smallest detectable "
                        f"{main['mdd']:.2f}. {others}. {lits}"}


def sigma_claim(s: Search, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """"sigma = 0.5 is best": the claim-set arms that differ from the center only in sigma, on the claim prompts."""
    ci: dict[str, Any] = {"n_boot": n_boot, "level": level, "seed": seed}
    rms = s.search["rms"]
    arms = [i for i in s.claim_arms if s.differs_only_in(i, ["sigma_rms"])]
    scores = {f"sigma = {s.arms[i]['sigma_rms'] * rms:.2f}": s.best(i, s.claim_ids) for i in arms}
    claimed = min(arms, key=lambda i: abs(s.arms[i]["sigma_rms"] * rms - 0.5))
    g = verdict.best_of_claim(scores, f"sigma = {s.arms[claimed]['sigma_rms'] * rms:.2f}", **ci)
    return {"claim": "sigma = 0.5 is best", "verdict": g["verdict"], "n_prompts": len(s.claim_ids),
            "evidence": f"{len(s.claim_ids)} validation prompts, sigma in pre-logit units (RMS {rms:.2f}): "
                        + ", ".join(f"{k}: {v:+.2f}" for k, v in g["means"].items()) + f"; best {g['best']}"}


def alpha_claims(s: Search, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> list[dict]:
    """"A small alpha gives a poor reward", per reading of alpha that the claim set has two values of:
    the largest alpha minus the smallest on the claim prompts, and every alpha on the first rung."""
    ci: dict[str, Any] = {"n_boot": n_boot, "level": level, "seed": seed}
    out = []
    def of_mode(candidates: Sequence[int], mode: str) -> list[int]:
        return [i for i in candidates if s.differs_only_in(i, ["alpha", "alpha_mode"]) and s.arms[i]["alpha_mode"] == mode]

    for mode in ("mppi", "step"):
        al = of_mode(s.claim_arms, mode)
        if len(al) < 2:
            continue
        lo_i = min(al, key=lambda i: s.arms[i]["alpha"])
        hi_i = max(al, key=lambda i: s.arms[i]["alpha"])
        c = verdict.compare(s.best(hi_i, s.claim_ids), s.best(lo_i, s.claim_ids), names=("large alpha", "small alpha"), **ci)
        first_rung = sorted(of_mode(s.rung0["arms"], mode), key=lambda i: s.arms[i]["alpha"])
        out.append({"claim": f"a small alpha gives a poor reward ({mode} reading)", "verdict": verdict.superiority_claim(c),
                    "n_prompts": c["n_prompts"],
                    "evidence": f"alpha = {s.arms[hi_i]['alpha']} minus alpha = {s.arms[lo_i]['alpha']}: "
                                f"{verdict.fmt_interval(c)} ({len(s.claim_ids)} validation prompts); every alpha on the "
                                f"first rung's {len(s.rung0_ids)} prompts: "
                                + ", ".join(f"{s.arms[i]['alpha']}: {np.mean(s.best(i, s.rung0_ids)):+.2f}" for i in first_rung)})
    return out


def lambda_claim(s: Search, bon_val_sd: float, margin_sd: float, n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> dict | None:
    """"lambda -> 0 recovers best-of-N", graded against its real limit; None where the search ran no twin.

    As lambda -> 0 the weights put all mass on the best draw, and the best of N draws of this
    sampler with U held at 0 (its frozen-U twin, the K = 1 limit) is what that can recover: the
    claim is equivalence with the twin within ``margin_sd`` x ``bon_val_sd`` (best-of-N's
    within-prompt sd on the validation prompts). Temperature-1 best-of-N is a different sampler,
    reported beside it.
    """
    twin = s.search.get("lam_twin")
    if not twin:
        return None
    ci: dict[str, Any] = {"n_boot": n_boot, "level": level, "seed": seed}
    li = twin["arm"]
    ids = list(twin["per_prompt"])
    a = [s.by_arm[li]["per_prompt"][p]["best"] for p in ids]
    c = verdict.compare(a, [twin["per_prompt"][p] for p in ids], names=("AISP", "frozen-U twin"), **ci)
    c_bon = verdict.compare(a, [s.search["bon_at_N"][p] for p in ids], names=("AISP", "best-of-N"), **ci)
    margin = margin_sd * bon_val_sd
    N = s.search["N"]
    return {"claim": "lambda -> 0 recovers best-of-N (its limit: the same sampler at U = 0)",
            "verdict": verdict.equivalence_claim(c, margin), "n_prompts": c["n_prompts"],
            "evidence": f"lambda = {s.arms[li]['lam']} minus its frozen-U twin at N = {N}: {verdict.fmt_interval(c)} on "
                        f"{len(ids)} validation prompts; margin +-{margin:.2f} ({margin_sd} x within-prompt sd "
                        f"{bon_val_sd:.2f}); minus temperature-1 best-of-{N}: {verdict.fmt_interval(c_bon)}; "
                        f"ESS {s.by_arm[li]['ess_mean']:.2f} of n = {s.arms[li]['n']}"}


def baseline_claims(rows: VerdictRows, reading: str, verdict_N: int) -> list[dict]:
    """"AISP > ARGS" and "AISP > RE-Control", from the first reading's verdict rows at ``verdict_N``."""
    out = []
    for method in (ARGS, RECONTROL):
        r = rows.get(Comparison(aisp(reading), method), verdict_N)
        if r is not None:
            out.append({"claim": f"AISP > {method.label}", "verdict": verdict.superiority_claim(r), "n_prompts": r["n_prompts"],
                        "evidence": f"N = {r['N']}, {r['n_prompts']} test prompts: {verdict.fmt_interval(r)}, "
                                    f"AISP wins {r['win_share']:.0%}"})
    return out


def misvo_claim(aisp_at: Mapping[str, float], misvo_at: Mapping[str, float], N: int, misvo_label: str, aisp_label: str,
                power: float = 0.8, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """"MISVO > AISP" (Entesari et al. 2026) at budget N, on the prompts both have (prompt_id -> best reward)."""
    ids = [i for i in misvo_at if i in aisp_at]
    c = verdict.compare([misvo_at[i] for i in ids], [aisp_at[i] for i in ids], power=power, names=("MISVO", "AISP"),
                        n_boot=n_boot, level=level, seed=seed)
    return {"claim": "MISVO > AISP (Entesari et al. 2026)", "verdict": verdict.superiority_claim(c), "n_prompts": c["n_prompts"],
            "evidence": f"N = {N}, {c['n_prompts']} test prompts: MISVO ({misvo_label}) - {aisp_label} "
                        f"{verdict.fmt_interval(c)}, MISVO wins {c['win_share']:.0%}"}


#: The comparability claims: the key of the paired values, and the name in the claim.
COMPARABLE = (("diversity", "diversity"), ("relevance", "coherence (relevance)"))


def paired_values(N: int, key: str, aisp_curve: Sequence[Mapping], bon_curve: Sequence[Mapping],
                  aisp_by_id: Mapping[str, Mapping], bon_by_id: Mapping[str, Mapping]) -> tuple[list[str], list[float], list[float]]:
    """(prompt ids, AISP's values, best-of-N's values) at budget N on the prompts both have there.

    ``key`` is a curve column (``"reward"`` or a judge), or ``"diversity"``: that of the response
    each method selects (AISP's best-so-far answer, best-of-N's best of its first N draws).
    """
    if key == "diversity":
        B = per_prompt(bon_curve, N)
        ids = [i for i in per_prompt(aisp_curve, N) if i in B]
        return (ids, [diversity_per_response([search_answer(aisp_by_id[i], N)])[0] for i in ids],
                [diversity_per_response([best_of_first(bon_by_id[i], N)])[0] for i in ids])
    A, B = per_prompt(aisp_curve, N, key), per_prompt(bon_curve, N, key)
    ids = [i for i in A if i in B]
    return ids, [A[i] for i in ids], [B[i] for i in ids]


def comparable_claim(what: str, a: Sequence[float], b: Sequence[float], sd: float, margin_sd: float, N: int,
                     n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[dict, dict]:
    """"<what> comparable to best-of-N": equivalence of AISP's and best-of-N's per-prompt values
    (same prompts, same order) within ``margin_sd`` x ``sd`` (best-of-N's within-prompt sd).

    Returns (the claim, the comparison with its ``margin``).
    """
    c = verdict.compare(a, b, names=("AISP", "best-of-N"), n_boot=n_boot, level=level, seed=seed)
    margin = margin_sd * sd
    claim = {"claim": f"{what} comparable to best-of-N", "verdict": verdict.equivalence_claim(c, margin),
             "n_prompts": c["n_prompts"],
             "evidence": f"N = {N}, {len(a)} prompts: AISP - best-of-N {verdict.fmt_interval(c, 3)}, margin "
                         f"+-{margin:.3f} ({margin_sd} x within-prompt sd {sd:.3f})"}
    return claim, {**c, "margin": margin}


def note_too_few(claims: list[dict]) -> list[dict]:
    """Say in the evidence of every inconclusive claim on fewer than MIN_PROMPTS prompts why it is."""
    few = f" Fewer than {verdict.MIN_PROMPTS} prompts: inconclusive by the stated rule."
    for c in claims:
        if c["verdict"] == verdict.INCONCLUSIVE and c.get("n_prompts", verdict.MIN_PROMPTS) < verdict.MIN_PROMPTS:
            c["evidence"] = c["evidence"].rstrip(". ") + "." + few
    return claims


def tally(claims: Sequence[Mapping]) -> dict[str, int]:
    """How many claims got each grade (the ``dvc metrics`` headline)."""
    return {"claims_held": sum(c["verdict"] == verdict.HELD for c in claims),
            "claims_not_held": sum(c["verdict"] == verdict.NOT_HELD for c in claims),
            "claims_inconclusive": sum(c["verdict"] == verdict.INCONCLUSIVE for c in claims),
            "claims_difference_detected": sum(c["verdict"] in (verdict.LOWER, verdict.HIGHER) for c in claims)}


def markdown(claims: Sequence[Mapping]) -> str:
    """The ``claims.md`` table."""
    return verdict.claims_markdown([{k: c[k] for k in ("claim", "verdict", "evidence")} for c in claims])
