"""prelogit.pooling: the verdict over seeds, on hand-made curves whose answers are known."""

import numpy as np
import pytest

from prelogit import pooling, verdict
from prelogit.comparisons import BON, SAMPLER, Comparison, Curves, aisp, twin

N = 64
P = 40  # above verdict.MIN_PROMPTS


def curve(values: dict[str, float], N: int = N) -> list[dict]:
    return [{"N": N, "prompt_id": pid, "reward": v} for pid, v in values.items()]


def seed_curves(gain: float, noise_seed: int, prompts: int = P, twin_gain: float = 0.0) -> Curves:
    """best-of-N at a prompt-specific level; AISP ``gain`` above it (plus small noise), its twin ``twin_gain``."""
    rng = np.random.default_rng(noise_seed)
    ids = [f"p{i}" for i in range(prompts)]
    base = {p: float(i % 7) for i, p in enumerate(ids)}
    a = {p: base[p] + gain + float(rng.normal(0, 0.1)) for p in ids}
    f = {p: base[p] + twin_gain for p in ids}
    return Curves(bon=curve(base), aisp={"greedy": curve(a)}, frozen={"greedy": curve(f)},
                  sampler=curve({p: base[p] + 0.5 for p in ids}))


A = Comparison(aisp("greedy"), BON)


def test_every_seed_above_and_the_pooled_interval_too_is_held():
    by_seed = {1: seed_curves(1.0, 1), 2: seed_curves(0.8, 2), 3: seed_curves(1.2, 3)}
    row = pooling.pool(by_seed, A, N, n_boot=500)
    assert row["prompts"] == P and row["seeds"] == [1, 2, 3]
    # the pooled mean is the mean of the seeds' means (every seed has the same prompts)
    assert row["pooled"]["mean"] == pytest.approx(np.mean([c["mean"] for c in row["per_seed"].values()]))
    assert row["pooled"]["mean"] == pytest.approx(1.0, abs=0.05)
    assert row["seeds_agree"] and row["grade"] == verdict.HELD


def test_a_seed_of_the_other_sign_makes_it_inconclusive_even_when_the_pooled_interval_excludes_zero():
    by_seed = {1: seed_curves(1.5, 1), 2: seed_curves(1.5, 2), 3: seed_curves(-0.3, 3)}
    row = pooling.pool(by_seed, A, N, n_boot=500)
    assert row["pooled"]["lo"] > 0  # pooled alone would say held
    assert not row["seeds_agree"] and row["grade"] == verdict.INCONCLUSIVE
    claim = pooling.claim([row], A, N, "AISP > best-of-N, over seeds")
    assert claim["verdict"] == verdict.INCONCLUSIVE and "disagree in sign" in claim["evidence"]


def test_every_seed_below_is_not_held():
    by_seed = {s: seed_curves(-0.7, s) for s in (1, 2, 3)}
    assert pooling.pool(by_seed, A, N, n_boot=500)["grade"] == verdict.NOT_HELD


def test_two_seeds_are_too_few_whatever_the_numbers():
    by_seed = {1: seed_curves(2.0, 1), 2: seed_curves(2.0, 2)}
    row = pooling.pool(by_seed, A, N, n_boot=500)
    assert row["pooled"]["lo"] > 0 and row["grade"] == verdict.INCONCLUSIVE
    assert "Fewer than 3 seeds" in pooling.claim([row], A, N, "x")["evidence"]


def test_only_the_prompts_every_seed_ran_are_pooled():
    # the main seed on 40 prompts, the others on the first 32 of them: 32 shared
    by_seed = {1: seed_curves(1.0, 1), 2: seed_curves(1.0, 2, prompts=32), 3: seed_curves(1.0, 3, prompts=32)}
    row = pooling.pool(by_seed, A, N, n_boot=200)
    assert row["prompts"] == 32 and all(c["n_prompts"] == 32 for c in row["per_seed"].values())
    # no budget the seeds share: no row
    assert pooling.pool(by_seed, A, 32) is None


def test_rows_cover_every_contrast_of_a_reading_and_the_twin_and_sampler_are_paired_right():
    by_seed = {s: seed_curves(1.0, s, twin_gain=0.25) for s in (1, 2, 3)}
    rows = pooling.pooled_rows(by_seed, ["greedy"], [16, N], n_boot=200)
    assert [r["comparison"] for r in rows] == [c.label for c in pooling.contrasts("greedy")]  # only N = 64 exists
    adaptation = pooling.find(rows, Comparison(aisp("greedy"), twin("greedy")), N)
    sampler = pooling.find(rows, Comparison(twin("greedy"), BON), N)
    vs_tuned = pooling.find(rows, Comparison(aisp("greedy"), SAMPLER), N)
    assert adaptation["pooled"]["mean"] == pytest.approx(0.75, abs=0.05)
    assert sampler["pooled"]["mean"] == pytest.approx(0.25) and sampler["grade"] == verdict.HELD
    assert vs_tuned["pooled"]["mean"] == pytest.approx(0.5, abs=0.05)
    table = pooling.markdown(rows)
    assert table.splitlines()[0].startswith("| comparison | N | prompts | seed 1 | seed 2 | seed 3 | pooled")
    assert len(table.splitlines()) == 2 + len(rows)


def test_selections_count_each_arm_over_the_seeds():
    sel = pooling.selections({1: {"greedy": "a", "sample": "x"}, 2: {"greedy": "b", "sample": "x"},
                              3: {"greedy": "a", "sample": "x"}})
    assert sel["greedy"] == {"by_seed": {"1": "a", "2": "b", "3": "a"}, "counts": {"a": 2, "b": 1}, "seeds": 3,
                             "distinct": 2}
    assert sel["sample"]["counts"] == {"x": 3} and sel["sample"]["distinct"] == 1


def test_a_method_that_is_not_pooled_is_named():
    with pytest.raises(ValueError, match="MISVO is not pooled"):
        pooling.values(seed_curves(1.0, 1), pooling.Method("misvo"), N)


def test_what_wins_over_seeds_needs_each_part_held():
    both = pooling.pooled_rows({s: seed_curves(1.0, s, twin_gain=0.25) for s in (1, 2, 3)}, ["greedy"], [N], n_boot=200)
    assert pooling.what_wins(both, "greedy", N) == "the adaptation and the sampler"
    none = pooling.pooled_rows({s: seed_curves(0.0, s) for s in (1, 2, 3)}, ["greedy"], [N], n_boot=200)
    assert pooling.what_wins(none, "greedy", N) == "neither"
    assert pooling.what_wins(none, "greedy", 32) is None
