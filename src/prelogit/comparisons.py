"""The verdict rows: every paired comparison of two methods at equal N, keyed by ids.

A method is a :class:`Method` (its kind, and the reading or literature lambda that tells two AISP
variants apart); a comparison is a :class:`Comparison` of two methods on one prompt set. Rows are
looked up by ``(Comparison, N)``, never by their display label: the label is derived from the key
for the tables, once. Every row applies :func:`prelogit.verdict.compare` (the pre-stated decision
rule) to the per-prompt values of the two methods, on the prompts both have at that budget.

Curves are lists of rows ``{"N", "prompt_id", "reward", ...}`` (the stages' ``curve.json``); a
per-prompt map is ``prompt_id -> value`` (:func:`per_prompt`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import verdict

#: The prompt sets a comparison can be on: the primary test prompts (chit-chat openers) and the
#: second distribution (ChatterBot questions, the transfer stage).
PROMPT_SETS = ("test", "questions")
_LABELS = {"bon": "best-of-N", "sampler": "tuned sampler", "misvo": "MISVO", "args": "ARGS", "recontrol": "RE-Control"}


def per_prompt(curve: Iterable[Mapping], N: int, key: str = "reward") -> dict[str, float]:
    """prompt_id -> value of ``key`` at budget N."""
    return {row["prompt_id"]: row[key] for row in curve if row["N"] == N}


@dataclass(frozen=True)
class Method:
    """One method of the comparisons.

    ``kind`` is ``"aisp"``, ``"frozen"`` (AISP's frozen-U twin: U held at 0), ``"bon"``
    (temperature-1 best-of-N), ``"sampler"`` (the tuned non-adaptive sampler), ``"misvo"``,
    ``"args"`` or ``"recontrol"``. An AISP variant or twin is told apart by its ``reading`` (the
    decoding given V it was tuned with) or, for the literature configuration, by its ``lam``.
    """

    kind: str
    reading: str | None = None
    lam: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("aisp", "frozen", *_LABELS):
            raise ValueError(f"unknown method kind {self.kind!r}")
        if self.kind not in ("aisp", "frozen") and (self.reading is not None or self.lam is not None):
            raise ValueError(f"{self.kind} has no reading or lambda")
        if self.kind == "aisp" and (self.reading is None) == (self.lam is None):
            raise ValueError("an AISP variant has either a reading or a literature lambda")

    @property
    def label(self) -> str:
        """The display name in the tables, e.g. ``"AISP (greedy)"``, ``"frozen-U twin (sample)"``."""
        if self.kind == "aisp":
            return f"AISP ({self.reading})" if self.reading is not None else f"AISP (literature, lambda = {self.lam})"
        if self.kind == "frozen":
            # the literature configuration's twin is named without its lambda (its first method says which)
            return f"frozen-U twin ({self.reading})" if self.reading is not None else "frozen-U twin"
        return _LABELS[self.kind]


BON, SAMPLER, MISVO = Method("bon"), Method("sampler"), Method("misvo")
ARGS, RECONTROL = Method("args"), Method("recontrol")


def aisp(reading: str) -> Method:
    return Method("aisp", reading=reading)


def twin(reading: str) -> Method:
    return Method("frozen", reading=reading)


@dataclass(frozen=True)
class Comparison:
    """``first - second`` on one prompt set (:data:`PROMPT_SETS`).

    ``names`` overrides the two names the decision text uses (``"AISP better"``); by default they
    are the methods' labels.
    """

    first: Method
    second: Method
    prompts: str = "test"
    # display only: two comparisons of the same methods are the same key whatever their names
    names: tuple[str, str] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.prompts not in PROMPT_SETS:
            raise ValueError(f"prompts must be one of {PROMPT_SETS}, got {self.prompts!r}")
        if self.first == self.second:
            raise ValueError(f"a comparison needs two different methods, got {self.first} twice")

    @property
    def label(self) -> str:
        """``"first - second"``, with ``" [questions]"`` on the second distribution, e.g.
        ``"AISP (greedy) - best-of-N"``, ``"AISP (greedy) - frozen-U twin [questions]"``."""
        where = "" if self.prompts == "test" else f" [{self.prompts}]"
        own_twin = (self.second.kind == "frozen"
                    and (self.second.reading, self.second.lam) == (self.first.reading, self.first.lam))
        # a method's own twin needs no qualifier: "AISP (greedy) - frozen-U twin"
        return f"{self.first.label} - {'frozen-U twin' if own_twin else self.second.label}{where}"

    @property
    def decision_names(self) -> tuple[str, str]:
        return self.names or (self.first.label, self.second.label)


class VerdictRows:
    """The verdict rows in the order they were added, each looked up by ``(Comparison, N)``.

    A row is :func:`prelogit.verdict.compare`'s dict with ``comparison`` (the display label) and
    ``N`` in front: exactly what ``verdict.md`` and ``summary.json`` show.
    """

    def __init__(self, n_boot: int = 2000, level: float = 0.95, seed: int = 0, power: float = 0.8) -> None:
        self.ci: dict[str, Any] = {"n_boot": n_boot, "level": level, "seed": seed}
        self.power = power
        self._rows: dict[tuple[Comparison, int], dict] = {}

    def add(self, comparison: Comparison, N: int, first: Mapping[str, float], second: Mapping[str, float]) -> dict:
        """Compare two per-prompt maps (prompt_id -> value at budget N) on the prompts both have."""
        key = (comparison, int(N))
        if key in self._rows:
            raise ValueError(f"{comparison.label} at N = {N} was added twice")
        ids = [i for i in first if i in second]
        stats = verdict.compare([first[i] for i in ids], [second[i] for i in ids], power=self.power,
                                names=comparison.decision_names, **self.ci)
        self._rows[key] = row = {"comparison": comparison.label, "N": int(N), **stats}
        return row

    def get(self, comparison: Comparison, N: int) -> dict | None:
        return self._rows.get((comparison, int(N)))

    def __getitem__(self, key: tuple[Comparison, int]) -> dict:
        comparison, N = key
        row = self.get(comparison, N)
        if row is None:
            raise KeyError(f"no verdict row {comparison.label} at N = {N}")
        return row

    def budgets(self, comparison: Comparison) -> list[int]:
        """The budgets N this comparison has rows at, in the order they were added."""
        return [N for (c, N) in self._rows if c == comparison]

    def where(self, comparison: Comparison) -> list[dict]:
        """This comparison's rows, at every budget it has."""
        return [row for (c, _), row in self._rows.items() if c == comparison]

    def rows(self) -> list[dict]:
        return list(self._rows.values())

    def items(self) -> list[tuple[tuple[Comparison, int], dict]]:
        """((comparison, N), row) pairs in the order they were added."""
        return list(self._rows.items())

    def __len__(self) -> int:
        return len(self._rows)

    def markdown(self) -> str:
        """The ``verdict.md`` table."""
        return markdown(self.rows(), self.ci["level"])


def markdown(rows: Sequence[Mapping], level: float = 0.95) -> str:
    """The ``verdict.md`` table of verdict rows (:meth:`VerdictRows.rows`, or ``summary.json``'s ``verdict``)."""
    md = [(f"| comparison | N | prompts | difference (mean, {round(100 * level)}% CI) | first wins | smallest detectable "
           "| decision |"), "|---|---:|---:|---|---:|---:|---|"]
    for r in rows:
        md.append(f"| {r['comparison']} | {r['N']} | {r['n_prompts']} | {verdict.fmt_interval(r)} | "
                  f"{r['win_share']:.0%} | {r['mdd']:.2f} | {r['decision']} |")
    return "\n".join(md)


def budgets(*curves: Iterable[Mapping]) -> list[int]:
    """The budgets N that every one of these curves has (on at least one prompt), sorted."""
    sets = [{int(r["N"]) for r in c} for c in curves]
    return sorted(set.intersection(*sets)) if sets else []


def of_reading(curve: Sequence[Mapping], reading: str) -> list[Mapping]:
    """The rows of a curve that holds several readings (the aisp and transfer stages')."""
    return [r for r in curve if r["reading"] == reading]


@dataclass
class Curves:
    """Every curve the verdict compares (the stages' ``curve.json`` rows), by method.

    ``aisp`` and ``frozen`` map a reading to its curve; ``literature`` and ``literature_frozen``
    hold the literature configuration's rows (with ``lit_lam``); ``baselines`` maps ``"ARGS"`` and
    ``"RE-Control"`` to prompt_id -> reward of their one response; the ``qa_`` curves are the second
    distribution's (the transfer stage).
    """

    bon: Sequence[Mapping]
    aisp: Mapping[str, Sequence[Mapping]]
    frozen: Mapping[str, Sequence[Mapping]]
    sampler: Sequence[Mapping] = ()
    misvo: Sequence[Mapping] = ()
    literature: Sequence[Mapping] = ()
    literature_frozen: Sequence[Mapping] = ()
    baselines: Mapping[str, Mapping[str, float]] | None = None
    qa_bon: Sequence[Mapping] = ()
    qa_aisp: Mapping[str, Sequence[Mapping]] | None = None
    qa_frozen: Mapping[str, Sequence[Mapping]] | None = None


_BASELINES = {"ARGS": ARGS, "RE-Control": RECONTROL}


def literature_at(curve: Sequence[Mapping], lam: float, N: int) -> dict[str, float]:
    """prompt_id -> reward of the literature configuration with lambda ``lam`` at budget N."""
    return {r["prompt_id"]: r["reward"] for r in curve if r["lit_lam"] == lam and r["N"] == N}


def verdict_rows(c: Curves, readings: Sequence[str], verdict_N: int, misvo_N: int | None, n_boot: int = 2000,
                 level: float = 0.95, seed: int = 0, power: float = 0.8) -> VerdictRows:
    """Every verdict row of the figures stage, in the order of ``verdict.md``.

    Per reading, at every budget it shares with best-of-N: AISP - best-of-N; AISP - its frozen-U
    twin and the twin - best-of-N (the gain split into the adaptation and the sampler alone); and
    the headline contrast AISP - the tuned sampler. Then the tuned sampler - best-of-N, the
    literature configuration against best-of-N and its twin (at its largest budget), MISVO -
    best-of-N, the first reading's AISP against MISVO (at ``misvo_N``) and against ARGS and
    RE-Control (at ``verdict_N``), and on the second distribution each reading against best-of-N
    and its twin, and the twin against best-of-N.
    """
    rows = VerdictRows(n_boot=n_boot, level=level, seed=seed, power=power)
    # the tuned sampler's budgets: those it shares with the first reading and best-of-N
    sampler_N = sorted(set(budgets(c.sampler)) & set(budgets(c.aisp[readings[0]], c.bon)))
    for R in readings:
        A, F = aisp(R), twin(R)
        Ns = budgets(c.aisp[R], c.bon)  # each reading at its own budgets (its n sets them)
        for N in Ns:
            rows.add(Comparison(A, BON), N, per_prompt(c.aisp[R], N), per_prompt(c.bon, N))
        for N in Ns:
            rows.add(Comparison(A, F), N, per_prompt(c.aisp[R], N), per_prompt(c.frozen[R], N))
            rows.add(Comparison(F, BON), N, per_prompt(c.frozen[R], N), per_prompt(c.bon, N))
        for N in sorted(set(sampler_N) & set(Ns)):
            rows.add(Comparison(A, SAMPLER), N, per_prompt(c.aisp[R], N), per_prompt(c.sampler, N))
    for N in sampler_N:
        rows.add(Comparison(SAMPLER, BON), N, per_prompt(c.sampler, N), per_prompt(c.bon, N))
    if c.literature:
        lit_N = max(r["N"] for r in c.literature)
        for lam in sorted({r["lit_lam"] for r in c.literature}):
            L = Method("aisp", lam=lam)
            rows.add(Comparison(L, BON), lit_N, literature_at(c.literature, lam, lit_N), per_prompt(c.bon, lit_N))
            rows.add(Comparison(L, Method("frozen", lam=lam)), lit_N, literature_at(c.literature, lam, lit_N),
                     literature_at(c.literature_frozen, lam, lit_N))
    for N in budgets(c.misvo, c.bon):
        rows.add(Comparison(MISVO, BON), N, per_prompt(c.misvo, N), per_prompt(c.bon, N))
    tuned = aisp(readings[0])
    if misvo_N is not None:
        rows.add(Comparison(tuned, MISVO, names=("AISP", "MISVO")), misvo_N, per_prompt(c.aisp[readings[0]], misvo_N),
                 per_prompt(c.misvo, misvo_N))
    for name, rewards in (c.baselines or {}).items():
        rows.add(Comparison(tuned, _BASELINES[name], names=("AISP", name)), verdict_N,
                 per_prompt(c.aisp[readings[0]], verdict_N), rewards)
    qa_aisp, qa_frozen = c.qa_aisp or {}, c.qa_frozen or {}
    for R in readings if qa_aisp else ():
        A, F = aisp(R), twin(R)
        cur, frz = qa_aisp[R], qa_frozen[R]
        for N in budgets(cur, c.qa_bon):
            rows.add(Comparison(A, BON, "questions"), N, per_prompt(cur, N), per_prompt(c.qa_bon, N))
            rows.add(Comparison(A, F, "questions"), N, per_prompt(cur, N), per_prompt(frz, N))
            rows.add(Comparison(F, BON, "questions"), N, per_prompt(frz, N), per_prompt(c.qa_bon, N))
    return rows


def what_wins(rows: VerdictRows, reading: str, N: int, prompts: str = "test") -> dict:
    """What wins for one reading at budget N, from its rows (:func:`prelogit.verdict.what_wins`).

    Returns ``{"verdict", "adaptation", "sampler", "vs_tuned_sampler", "vs_bon"}``: the verdict text
    and the rows AISP - its twin, the twin - best-of-N, AISP - the tuned sampler (None where no
    tuned sampler ran, as on the second distribution) and AISP - best-of-N.
    """
    A, F = aisp(reading), twin(reading)
    adaptation, sampler = rows[Comparison(A, F, prompts), N], rows[Comparison(F, BON, prompts), N]
    return {"verdict": verdict.what_wins(adaptation, sampler), "adaptation": adaptation, "sampler": sampler,
            "vs_tuned_sampler": rows.get(Comparison(A, SAMPLER, prompts), N),
            "vs_bon": rows[Comparison(A, BON, prompts), N]}
