"""prelogit.comparisons: verdict rows keyed by (Comparison, N), their labels and their order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prelogit import comparisons, verdict
from prelogit.comparisons import BON, MISVO, Comparison, Curves, Method, VerdictRows, aisp, twin

ROOT = Path(__file__).resolve().parents[1]
CI = {"n_boot": 200, "level": 0.95, "seed": 0}


def curve(values_by_N: dict[int, list[float]], reading: str | None = None) -> list[dict]:
    """Curve rows for prompts p0, p1, ... with the given rewards at each N."""
    rows = [{"N": N, "prompt_id": f"p{i}", "reward": v} for N, vals in values_by_N.items() for i, v in enumerate(vals)]
    return [{**r, "reading": reading} for r in rows] if reading else rows


def test_labels_name_each_method_and_drop_the_twins_own_qualifier():
    assert aisp("greedy").label == "AISP (greedy)"
    assert twin("greedy").label == "frozen-U twin (greedy)"
    assert Method("aisp", lam=0.5).label == "AISP (literature, lambda = 0.5)"
    assert Comparison(aisp("greedy"), twin("greedy")).label == "AISP (greedy) - frozen-U twin"
    assert Comparison(twin("greedy"), BON, "questions").label == "frozen-U twin (greedy) - best-of-N [questions]"
    # another reading's twin is not the first method's own, so it keeps its qualifier
    assert Comparison(aisp("greedy"), twin("sample")).label == "AISP (greedy) - frozen-U twin (sample)"
    assert Comparison(Method("aisp", lam=0.5), Method("frozen", lam=0.5)).label == "AISP (literature, lambda = 0.5) - frozen-U twin"
    assert Comparison(aisp("greedy"), twin("greedy")).decision_names == ("AISP (greedy)", "frozen-U twin (greedy)")


def test_names_are_display_only_and_do_not_change_the_key():
    a = Comparison(aisp("greedy"), MISVO, names=("AISP", "MISVO"))
    assert a == Comparison(aisp("greedy"), MISVO) and hash(a) == hash(Comparison(aisp("greedy"), MISVO))
    assert a.decision_names == ("AISP", "MISVO")


@pytest.mark.parametrize("make", [
    lambda: Method("nope"),
    lambda: Method("bon", reading="greedy"),
    lambda: Method("aisp"),
    lambda: Method("aisp", reading="greedy", lam=0.1),
    lambda: Comparison(BON, BON),
    lambda: Comparison(aisp("greedy"), BON, prompts="validation"),
])
def test_bad_keys_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_rows_pair_on_the_prompts_both_have_and_are_found_by_key():
    rows = VerdictRows(**CI)
    first = {f"p{i}": 1.0 + 0.01 * i for i in range(40)}
    second = {f"p{i}": 0.0 for i in range(5, 45)}  # 35 prompts in common
    row = rows.add(Comparison(aisp("greedy"), BON), 16, first, second)
    assert row["comparison"] == "AISP (greedy) - best-of-N" and row["N"] == 16 and row["n_prompts"] == 35
    assert row["decision"] == "AISP (greedy) better" and row["mean"] == pytest.approx(1.0 + 0.01 * 22)
    assert rows[Comparison(aisp("greedy"), BON), 16] is row
    assert rows.get(Comparison(aisp("greedy"), BON), 32) is None
    with pytest.raises(KeyError, match="at N = 32"):
        rows[Comparison(aisp("greedy"), BON), 32]
    with pytest.raises(ValueError, match="twice"):
        rows.add(Comparison(aisp("greedy"), BON), 16, first, second)


def test_budgets_intersect():
    assert comparisons.budgets(curve({16: [1], 32: [1], 64: [1]}), curve({32: [1], 64: [1], 128: [1]})) == [32, 64]
    assert comparisons.budgets(curve({16: [1]}), []) == []


def _curves(n_prompts: int = 40) -> Curves:
    base = [0.1 * (i % 7) for i in range(n_prompts)]
    bon = curve({16: base, 32: [b + 0.1 for b in base]})
    a = {"greedy": curve({16: [b + 1 for b in base], 32: [b + 2 for b in base]}, "greedy")}
    f = {"greedy": curve({16: [b + 1 for b in base], 32: [b + 1 for b in base]}, "greedy")}
    return Curves(bon=bon, aisp=a, frozen=f, sampler=curve({32: [b + 1.5 for b in base]}), misvo=curve({32: base}),
                  baselines={"ARGS": {f"p{i}": 0.0 for i in range(n_prompts)}},
                  qa_bon=bon, qa_aisp=a, qa_frozen=f)


def test_verdict_rows_order_and_what_wins():
    rows = comparisons.verdict_rows(_curves(), ["greedy"], verdict_N=32, misvo_N=32, **CI)
    got = [(r["comparison"], r["N"]) for r in rows.rows()]
    A, F = "AISP (greedy)", "frozen-U twin (greedy)"
    assert got == [(f"{A} - best-of-N", 16), (f"{A} - best-of-N", 32),
                   (f"{A} - frozen-U twin", 16), (f"{F} - best-of-N", 16),
                   (f"{A} - frozen-U twin", 32), (f"{F} - best-of-N", 32),
                   (f"{A} - tuned sampler", 32), ("tuned sampler - best-of-N", 32),
                   ("MISVO - best-of-N", 32), (f"{A} - MISVO", 32), (f"{A} - ARGS", 32),
                   *[(f"{c} [questions]", N) for N in (16, 32)
                     for c in (f"{A} - best-of-N", f"{A} - frozen-U twin", f"{F} - best-of-N")]]
    # U = 0 at the first iteration: the twin ties AISP there
    assert rows[Comparison(aisp("greedy"), twin("greedy")), 16]["share_ties"] == 1
    assert rows[Comparison(aisp("greedy"), MISVO), 32]["decision"] == "AISP better"  # its names override
    w = comparisons.what_wins(rows, "greedy", 32)
    assert w["verdict"] == "the adaptation and the sampler"
    assert w["vs_tuned_sampler"]["mean"] == pytest.approx(0.5)
    assert comparisons.what_wins(rows, "greedy", 32, "questions")["vs_tuned_sampler"] is None


def test_what_wins_on_too_few_prompts_is_undecided():
    rows = comparisons.verdict_rows(_curves(n_prompts=8), ["greedy"], verdict_N=32, misvo_N=None, **CI)
    assert comparisons.what_wins(rows, "greedy", 32)["verdict"].startswith("undecided")


def test_markdown_has_one_line_per_row():
    rows = comparisons.verdict_rows(_curves(), ["greedy"], verdict_N=32, misvo_N=None, **CI)
    md = rows.markdown().splitlines()
    assert md[0].startswith("| comparison | N | prompts | difference (mean, 95% CI)") and len(md) == 2 + len(rows)
    assert md[2] == (f"| AISP (greedy) - best-of-N | 16 | 40 | {verdict.fmt_interval(rows.rows()[0])} | 100% | "
                     f"{rows.rows()[0]['mdd']:.2f} | AISP (greedy) better |")


def test_the_committed_verdict_table_is_what_its_rows_render():
    """verdict.md is rendered from the same rows that summary.json holds: one format, one producer."""
    summary = json.loads((ROOT / "results/figures/summary.json").read_text())
    md = comparisons.markdown(summary["verdict"], summary["ci_level"])
    assert md.strip() == (ROOT / "results/figures/verdict.md").read_text().strip()
