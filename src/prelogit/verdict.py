"""Statistics of the pre-stated decision rule and of the claims table.

The decision rule, fixed before the runs
----------------------------------------
Two methods a and b (AISP and best-of-N by default) are scored on the same P prompts. The unit
of replication is the prompt: for each prompt we take the difference d_p = a_p - b_p (in the
units of the score, e.g. reward points) and form the **paired percentile bootstrap** interval of
the mean difference over prompts at coverage ``level`` (0.95 unless stated otherwise; prompts
resampled with replacement, see :func:`prelogit.metrics.paired_difference`). Then:

* lower end of the interval > 0  ->  "a better";
* upper end of the interval < 0  ->  "b better";
* otherwise (the interval contains 0)  ->  "no difference detected".

"No difference detected" is not evidence of equality: :func:`minimal_detectable_difference`
says how large a true difference the P prompts could have detected, and
:func:`equivalence_claim` tests closeness against a margin stated before the run.

Claims are graded from the same intervals as "held", "not held" or "inconclusive"; a claim
resting on fewer than :data:`MIN_PROMPTS` prompts is "inconclusive" whatever its interval, because
a percentile bootstrap over so few prompts covers far less often than it says
(:func:`superiority_claim`, :func:`equivalence_claim`, :func:`best_of_claim`) and rendered with
:func:`claims_markdown`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np

from .checks import ParameterError, check_number
from .metrics import paired_difference

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
#: Grades of an equivalence claim whose interval is neither inside nor outside the margin but
#: excludes 0: a difference is detected, too small to rule comparability out.
LOWER, HIGHER = "lower (detected)", "higher (detected)"
#: Every grade a claim can get.
GRADES = (HELD, NOT_HELD, INCONCLUSIVE, LOWER, HIGHER)
NO_DIFFERENCE = "no difference detected"
#: Fewest prompts on which a claim can be held or not held. With 3 prompts, say, the bootstrap
#: distribution of the mean has at most 10 distinct values and its interval is far too narrow; with
#: 8, the tuning arms' paired sds (about 0.5 reward units) leave intervals wider than most effects,
#: and five of ten grades flipped between two CPUs. 32 is the tune stage's claim_prompts.
MIN_PROMPTS = 32


def _too_few(cmp: Mapping) -> bool:
    return int(cmp.get("n_prompts", MIN_PROMPTS)) < MIN_PROMPTS


def _values(name: str, x: object) -> np.ndarray:
    """``x`` as a finite float64 vector of shape (P,) with P >= 2."""
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ParameterError(f"{name} must be a sequence of numbers, got {x!r}") from err
    if a.ndim != 1 or a.size < 2:
        raise ParameterError(f"{name} must have shape (P,) with P >= 2 prompts, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ParameterError(f"{name} contains NaN or infinity")
    return a


def minimal_detectable_difference(diffs: Any, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true mean paired difference these P prompts detect with probability ``power``.

    MDD = (z_{(1+level)/2} + z_{power}) * sd(diffs, ddof=1) / sqrt(P), in the units of ``diffs``
    (per-prompt differences a - b, e.g. reward points).

    Meaning: if the true mean difference were MDD (or larger in size), a two-sided test at
    coverage ``level`` over P prompts with this spread of per-prompt differences would exclude
    zero with probability ``power``. A "no difference detected" verdict therefore only rules out
    differences of roughly MDD and above; smaller ones may exist. Normal approximation: the mean
    of P differences is treated as normal with the sample standard deviation as if known (no
    t correction), so for small P the real MDD is somewhat larger. Shrinks like 1 / sqrt(P).

    Args:
        diffs: (P,) per-prompt differences, P >= 2.
        level: two-sided coverage, in (0, 1).
        power: detection probability, in (0, 1).
    """
    d = _values("diffs", diffs)
    check_number("level", level, low=0, high=1, low_open=True, high_open=True)
    check_number("power", power, low=0, high=1, low_open=True, high_open=True)
    z = NormalDist()
    factor = z.inv_cdf((1 + level) / 2) + z.inv_cdf(power)
    return float(factor * d.std(ddof=1) / math.sqrt(d.size))


def _decision(lo: float, hi: float, names: Sequence[str]) -> str:
    if lo > 0:
        return f"{names[0]} better"
    if hi < 0:
        return f"{names[1]} better"
    return NO_DIFFERENCE


def compare(a: Any, b: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0, power: float = 0.8,
            names: Sequence[str] = ("AISP", "best-of-N")) -> dict:
    """Apply the pre-stated decision rule (module docstring) to per-prompt values a and b.

    Args:
        a, b: (P,) per-prompt values of two methods on the same P >= 2 prompts, same order.
        n_boot, level, seed: of the paired percentile bootstrap over prompts.
        power: for the minimal detectable difference.
        names: display names of a and b, used in ``decision``.
    Returns:
        dict with
        ``mean, lo, hi``: mean difference a - b and its interval (units of a and b);
        ``level``; ``n_prompts``;
        ``win_share``: share of prompts with a > b, a tie counting as half a win (in [0, 1];
        0.5 means a and b win equally often);
        ``share_ties``: share of prompts with a == b;
        ``mdd``: :func:`minimal_detectable_difference` of the differences (units of a and b);
        ``decision``: ``f"{names[0]} better"`` if lo > 0, ``f"{names[1]} better"`` if hi < 0,
        else ``"no difference detected"``.
    """
    if (isinstance(names, str) or len(names) != 2
            or not all(isinstance(n, str) and n for n in names) or names[0] == names[1]):
        raise ParameterError(f"names must be two different non-empty strings, got {names!r}")
    xa, xb = _values("a", a), _values("b", b)
    if xa.shape != xb.shape:
        raise ParameterError(f"a and b must have the same shape (P,), got {xa.shape} and {xb.shape}")
    pd = paired_difference(xa, xb, n_boot=n_boot, level=level, seed=seed)
    return {
        "mean": pd.mean,
        "lo": pd.lo,
        "hi": pd.hi,
        "level": pd.level,
        "n_prompts": pd.n_prompts,
        "win_share": pd.share_a_greater + pd.share_ties / 2,
        "share_ties": pd.share_ties,
        "mdd": minimal_detectable_difference(xa - xb, level=level, power=power),
        "decision": _decision(pd.lo, pd.hi, names),
    }


def what_wins(adaptation: Mapping, sampler: Mapping) -> str:
    """Which part of AISP its gain over best-of-N comes from, by the same interval rule.

    Args:
        adaptation: :func:`compare` of AISP minus its frozen-U twin (the same sampler, the same
            noise, U held at 0): what moving U adds.
        sampler: :func:`compare` of the frozen-U twin minus best-of-N: what decoding given
            V ~ N(0, sigma^2 I) does by itself, before any adaptation.
    Returns:
        ``"the adaptation and the sampler"``, ``"the adaptation"``, ``"the sampler"`` (the
        adaptation adds nothing detectable), ``"the sampler; the adaptation loses part of it"``
        (AISP below its own frozen twin), ``"neither"``, or ``"undecided (fewer than MIN_PROMPTS
        prompts)"``.
    """
    if _too_few(adaptation) or _too_few(sampler):
        return f"undecided (fewer than {MIN_PROMPTS} prompts)"
    return what_wins_by_grade(superiority_claim(adaptation), superiority_claim(sampler))


def what_wins_by_grade(adaptation: str, sampler: str) -> str:
    """:func:`what_wins` from the grades (:data:`GRADES`) of "AISP > its twin" (the adaptation) and
    "the twin > best-of-N" (the sampler), however they were graded (one run's interval, or pooled
    over seeds by :mod:`prelogit.pooling`): a part wins when its claim is held."""
    if adaptation == HELD:
        return "the adaptation and the sampler" if sampler == HELD else "the adaptation"
    if sampler == HELD:
        return "the sampler; the adaptation loses part of it" if adaptation == NOT_HELD else "the sampler"
    return "neither"


def _interval(cmp: Mapping) -> tuple[float, float]:
    if not isinstance(cmp, Mapping) or "lo" not in cmp or "hi" not in cmp:
        raise ParameterError(f"cmp must be a dict from compare() with keys 'lo' and 'hi', got {cmp!r}")
    lo, hi = cmp["lo"], cmp["hi"]
    check_number("cmp['lo']", lo)
    check_number("cmp['hi']", hi)
    if lo > hi:
        raise ParameterError(f"cmp['lo'] must be <= cmp['hi'], got {lo!r} > {hi!r}")
    return float(lo), float(hi)


def superiority_claim(cmp: Mapping) -> str:
    """Grade the claim "a > b" from a :func:`compare` result.

    "held" if lo > 0, "not held" if hi < 0 (b is better), else "inconclusive" (always, on fewer
    than :data:`MIN_PROMPTS` prompts).
    """
    lo, hi = _interval(cmp)
    if _too_few(cmp):
        return INCONCLUSIVE
    if lo > 0:
        return HELD
    if hi < 0:
        return NOT_HELD
    return INCONCLUSIVE


def equivalence_claim(cmp: Mapping, margin: float) -> str:
    """Grade the claim "a and b are comparable": |true mean difference| <= ``margin``.

    ``margin`` (> 0, units of the compared values) must be stated before the run.
    "held" if the whole interval lies inside [-margin, margin]; "not held" if it lies entirely
    outside it (lo > margin or hi < -margin); otherwise "lower (detected)" / "higher (detected)"
    if the interval still excludes 0 (a lies below / above b, by an amount the prompts cannot
    place inside or outside the margin), else "inconclusive".
    """
    lo, hi = _interval(cmp)
    check_number("margin", margin, low=0, low_open=True)
    if _too_few(cmp):
        return INCONCLUSIVE
    if -margin <= lo and hi <= margin:
        return HELD
    if lo > margin or hi < -margin:
        return NOT_HELD
    if hi < 0:
        return LOWER
    if lo > 0:
        return HIGHER
    return INCONCLUSIVE


def best_of_claim(scores: Mapping[str, Sequence[float]], claimed: str, n_boot: int = 2000,
                  level: float = 0.95, seed: int = 0) -> dict:
    """Grade the claim "setting ``claimed`` is best" among paired settings.

    Args:
        scores: {setting: (P,) per-prompt values}, all on the same prompts in the same order;
            at least two settings.
        claimed: the setting claimed to be best.
        n_boot, level, seed: of each paired bootstrap (:func:`compare`).
    Returns:
        dict with ``verdict``: "held" if ``claimed`` is better than every other setting (every
        comparison's lo > 0), "not held" if some other setting is better than it (some hi < 0),
        else "inconclusive"; ``best``: the setting with the highest mean (first one on a tie);
        ``means``: {setting: mean}; ``comparisons``: {other: :func:`compare` of claimed vs other}.
    """
    if not isinstance(scores, Mapping) or len(scores) < 2:
        raise ParameterError(f"scores must be a dict of at least two settings, got {scores!r}")
    if claimed not in scores:
        raise ParameterError(f"claimed setting {claimed!r} is not in scores ({', '.join(map(repr, scores))})")
    values = {str(k): _values(f"scores[{k!r}]", v) for k, v in scores.items()}
    lengths = {k: v.size for k, v in values.items()}
    if len(set(lengths.values())) != 1:
        raise ParameterError(f"every setting must have one value per prompt on the same prompts, got lengths {lengths}")
    claimed = str(claimed)
    comparisons = {other: compare(values[claimed], v, n_boot=n_boot, level=level, seed=seed,
                                  names=(claimed, other))
                   for other, v in values.items() if other != claimed}
    if len(values[claimed]) < MIN_PROMPTS:
        verdict = INCONCLUSIVE
    elif all(c["lo"] > 0 for c in comparisons.values()):
        verdict = HELD
    elif any(c["hi"] < 0 for c in comparisons.values()):
        verdict = NOT_HELD
    else:
        verdict = INCONCLUSIVE
    means = {k: float(v.mean()) for k, v in values.items()}
    best = max(means, key=means.__getitem__)
    return {"verdict": verdict, "best": best, "means": means, "comparisons": comparisons}


def _cell(text: object) -> str:
    """One markdown table cell: pipes escaped, line breaks turned into spaces."""
    return " ".join(str(text).replace("|", "\\|").split())


def claims_markdown(rows: Sequence[Mapping]) -> str:
    """Markdown table ``| claim | verdict | evidence |`` with the verdicts in bold.

    Each row needs the keys ``claim``, ``verdict`` and ``evidence``; pipes in any cell are
    escaped and line breaks become spaces, so a cell never breaks the table.
    """
    if isinstance(rows, (str, Mapping)):
        raise ParameterError(f"rows must be a list of dicts, got {type(rows).__name__}")
    lines = ["| claim | verdict | evidence |", "|---|---|---|"]
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ParameterError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        missing = [k for k in ("claim", "verdict", "evidence") if k not in row]
        if missing:
            raise ParameterError(f"rows[{i}] lacks the keys {', '.join(missing)}")
        lines.append(f"| {_cell(row['claim'])} | **{_cell(row['verdict'])}** | {_cell(row['evidence'])} |")
    return "\n".join(lines) + "\n"


def signed(x: float, digits: int) -> str:
    """``x`` with its sign; a non-zero value that rounds to zero gets up to three more digits, so
    that an interval end just below or above 0 does not read as 0 (the decisions compare with 0)."""
    s = f"{x:+.{digits}f}"
    extra = digits
    while x != 0 and float(s) == 0 and extra < digits + 3:
        extra += 1
        s = f"{x:+.{extra}f}"
    return "+" + s[1:] if s.startswith("-") and float(s) == 0 else s  # no "-0.00"


def fmt_interval(cmp: Mapping, digits: int = 2) -> str:
    """Mean difference and interval of a :func:`compare` result, e.g. ``"+0.12 [-0.05, +0.30]"``."""
    lo, hi = _interval(cmp)
    if "mean" not in cmp:
        raise ParameterError(f"cmp must have the key 'mean', got {cmp!r}")
    check_number("cmp['mean']", cmp["mean"])
    check_number("digits", digits, low=0, integer=True)
    return f"{signed(cmp['mean'], digits)} [{signed(lo, digits)}, {signed(hi, digits)}]"
