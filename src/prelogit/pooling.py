"""Pooling seeds: a verdict that covers both sources of variation, the prompts and the seeds.

The main pipeline tunes and tests with one seed; the replicate stage runs the whole procedure,
tune then test, again with other seeds on the first test prompts (:mod:`prelogit.replicate`). A
change of CPU rounds like a change of seed, so a verdict that survives the seeds is also one that
survives the machine.

The rule, fixed before the runs
-------------------------------
For a contrast ``first - second`` (AISP - best-of-N, AISP - its frozen-U twin, the twin -
best-of-N, AISP - the tuned sampler) at budget N, on the test prompts that **every** seed ran:

* per seed s: the per-prompt differences d_sp and their mean m_s (with its own paired interval,
  :func:`prelogit.verdict.compare`);
* pooled: the per-prompt mean over the seeds, d_p = mean_s d_sp, and the paired percentile
  bootstrap interval over prompts of its mean. Averaging a prompt over seeds first takes the
  seeds' noise out of each prompt's value; resampling the prompts covers the prompts' sampling;
* the claim "first > second" is **held** when the pooled interval lies above 0 *and* every seed's
  mean is above 0; **not held** when the pooled interval lies below 0 and every seed's mean is
  below 0; otherwise **inconclusive** (the interval contains 0, or the seeds disagree in sign).
  With fewer than :data:`MIN_SEEDS` seeds, or fewer than :data:`prelogit.verdict.MIN_PROMPTS`
  shared prompts, it is inconclusive whatever the numbers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import verdict
from .comparisons import BON, SAMPLER, Comparison, Curves, Method, aisp, per_prompt, twin

#: Fewest seeds on which a pooled claim can be held or not held: with two, one seed's luck is half
#: the evidence and "every seed agrees" is a coin toss's worth of replication.
MIN_SEEDS = 3


def contrasts(reading: str) -> list[Comparison]:
    """The pooled contrasts of one reading, in the table's order."""
    A, F = aisp(reading), twin(reading)
    return [Comparison(A, BON), Comparison(A, F), Comparison(F, BON), Comparison(A, SAMPLER)]


def values(curves: Curves, method: Method, N: int) -> dict[str, float]:
    """prompt_id -> reward at budget N of ``method`` (best-of-N, the tuned sampler, or a reading's AISP
    or frozen-U twin) in one seed's curves."""
    if method == BON:
        return per_prompt(curves.bon, N)
    if method == SAMPLER:
        return per_prompt(curves.sampler, N)
    if method.kind in ("aisp", "frozen") and method.reading is not None:
        return per_prompt((curves.aisp if method.kind == "aisp" else curves.frozen)[method.reading], N)
    raise ValueError(f"{method.label} is not pooled across seeds")


def grade(pooled: Mapping, seed_means: Sequence[float]) -> str:
    """The claim "first > second" by the rule in the module docstring, from the pooled
    :func:`prelogit.verdict.compare` result and every seed's mean difference."""
    if len(seed_means) < MIN_SEEDS:
        return verdict.INCONCLUSIVE
    pooled_grade = verdict.superiority_claim(pooled)
    if pooled_grade == verdict.HELD and all(m > 0 for m in seed_means):
        return verdict.HELD
    if pooled_grade == verdict.NOT_HELD and all(m < 0 for m in seed_means):
        return verdict.NOT_HELD
    return verdict.INCONCLUSIVE


def pool(by_seed: Mapping[int, Curves], comparison: Comparison, N: int, n_boot: int = 2000, level: float = 0.95,
         seed: int = 0, power: float = 0.8) -> dict | None:
    """One pooled row: ``comparison`` at budget N over the seeds of ``by_seed`` (seed -> its curves).

    Returns None when the seeds share no prompt at N. Otherwise ``{"comparison"`` (label), ``"N"``,
    ``"prompts"`` (shared), ``"seeds"``, ``"per_seed"`` (seed -> :func:`prelogit.verdict.compare` on the
    shared prompts, as a string-keyed dict), ``"pooled"`` (compare of the per-prompt means over
    seeds), ``"seeds_agree"`` (every seed's mean on the pooled mean's side of 0), ``"grade"``
    (:func:`grade`)``}``.
    """
    seeds = sorted(by_seed)
    firsts = {s: values(by_seed[s], comparison.first, N) for s in seeds}
    seconds = {s: values(by_seed[s], comparison.second, N) for s in seeds}
    shared = sorted(set.intersection(*(set(firsts[s]) & set(seconds[s]) for s in seeds))) if seeds else []
    if len(shared) < 2:
        return None
    ci: dict[str, Any] = {"n_boot": n_boot, "level": level, "seed": seed, "power": power,
                          "names": comparison.decision_names}
    per_seed = {str(s): verdict.compare([firsts[s][p] for p in shared], [seconds[s][p] for p in shared], **ci)
                for s in seeds}
    pooled = verdict.compare([float(np.mean([firsts[s][p] for s in seeds])) for p in shared],
                             [float(np.mean([seconds[s][p] for s in seeds])) for p in shared], **ci)
    means = [per_seed[str(s)]["mean"] for s in seeds]
    return {"comparison": comparison.label, "N": N, "prompts": len(shared), "seeds": seeds, "per_seed": per_seed,
            "pooled": pooled, "seeds_agree": all(np.sign(m) == np.sign(pooled["mean"]) for m in means),
            "grade": grade(pooled, means)}


def pooled_rows(by_seed: Mapping[int, Curves], readings: Sequence[str], budgets: Sequence[int], n_boot: int = 2000,
                level: float = 0.95, seed: int = 0, power: float = 0.8) -> list[dict]:
    """:func:`pool` for every reading's :func:`contrasts` at every budget (rows the seeds do not share skipped)."""
    rows = []
    for R in readings:
        for c in contrasts(R):
            for N in budgets:
                row = pool(by_seed, c, N, n_boot=n_boot, level=level, seed=seed, power=power)
                if row is not None:
                    rows.append(row)
    return rows


def find(rows: Sequence[Mapping], comparison: Comparison, N: int) -> Mapping | None:
    """The pooled row of ``comparison`` at N, or None."""
    return next((r for r in rows if r["comparison"] == comparison.label and r["N"] == N), None)


def markdown(rows: Sequence[Mapping], level: float = 0.95) -> str:
    """``replication.md``: per seed the mean difference, then the pooled interval and the grade."""
    seeds = sorted({s for r in rows for s in r["seeds"]})
    head = ("| comparison | N | prompts | " + " | ".join(f"seed {s}" for s in seeds)
            + f" | pooled (mean, {level:.0%} CI) | seeds agree | claim first > second |")
    lines = [head, "|---|---:|---:|" + "---:|" * len(seeds) + "---|---|---|"]
    for r in rows:
        per = [verdict.signed(r["per_seed"][str(s)]["mean"], 2) if str(s) in r["per_seed"] else "" for s in seeds]
        lines.append(f"| {r['comparison']} | {r['N']} | {r['prompts']} | " + " | ".join(per)
                     + f" | {verdict.fmt_interval(r['pooled'])} | {'yes' if r['seeds_agree'] else 'no'} | {r['grade']} |")
    return "\n".join(lines) + "\n"


def selections(selected: Mapping[int, Mapping[str, str]]) -> dict[str, dict]:
    """How often each arm was selected across seeds, per reading.

    Args:
        selected: seed -> reading -> the label of the arm that seed's search selected.
    Returns:
        reading -> ``{"by_seed": {seed: label}, "counts": {label: seeds}, "seeds": n, "distinct": k}``,
        the counts most frequent first (ties in order of first appearance).
    """
    out: dict[str, dict] = {}
    for s in sorted(selected):
        for R, label in selected[s].items():
            out.setdefault(R, {"by_seed": {}})["by_seed"][str(s)] = label
    for R, d in out.items():
        counts = Counter(d["by_seed"].values())
        d["counts"] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        d["seeds"], d["distinct"] = len(d["by_seed"]), len(counts)
    return out


def what_wins(rows: Sequence[Mapping], reading: str, N: int) -> str | None:
    """What wins for one reading at N over the seeds, as :func:`prelogit.verdict.what_wins` says it for one
    seed, from the pooled grades of AISP - its twin (the adaptation) and the twin - best-of-N (the
    sampler): a part wins only when its claim is held over the seeds. None without both rows."""
    adaptation = find(rows, Comparison(aisp(reading), twin(reading)), N)
    sampler = find(rows, Comparison(twin(reading), BON), N)
    if adaptation is None or sampler is None:
        return None
    return verdict.what_wins_by_grade(adaptation["grade"], sampler["grade"])


def claim(rows: Sequence[Mapping], comparison: Comparison, N: int, what: str) -> dict | None:
    """The claim ``what`` graded by the pooled rule from ``comparison``'s row at N (None if there is none):
    ``{"claim", "verdict", "n_prompts", "evidence"}`` as :mod:`prelogit.claims` builds them."""
    r = find(rows, comparison, N)
    if r is None:
        return None
    per = ", ".join(verdict.signed(c["mean"], 2) for c in r["per_seed"].values())
    why = ""
    if len(r["seeds"]) < MIN_SEEDS:
        why = f" Fewer than {MIN_SEEDS} seeds: inconclusive by the stated rule."
    elif r["grade"] == verdict.INCONCLUSIVE and r["pooled"]["decision"] != verdict.NO_DIFFERENCE:
        why = " The pooled interval excludes 0 but the seeds disagree in sign: inconclusive by the stated rule."
    return {"claim": what, "verdict": r["grade"], "n_prompts": r["prompts"],
            "evidence": f"N = {N}, the {r['prompts']} test prompts every seed ran, seeds {', '.join(map(str, r['seeds']))} "
                        f"(each tuned and tested anew): {comparison.label} pooled {verdict.fmt_interval(r['pooled'])}; "
                        f"per seed ({', '.join(r['per_seed'])}): {per}.{why}"}


__all__ = ["MIN_SEEDS", "contrasts", "values", "grade", "pool", "pooled_rows", "find", "markdown", "selections", "what_wins", "claim"]
