"""prelogit.tables: the method table (table.md) and the KL table (kl.md) from hand-made records."""

from __future__ import annotations

import math

import pytest

from prelogit import tables

CI = {"n_boot": 200, "level": 0.95, "seed": 0}
# diversity_per_response of these: 4 distinct tokens -> 0.75 * 2/3 * 1/2; all repeated -> 1/4 * 1/3 * 1/2;
# one token has no n-grams at all -> 0
HI, MID, LO = "a b c d", "a a a a", "x"
D_HI, D_MID = 0.25, 1 / 24

# best-of-N records: the argmax over the first 2 rewards differs from that over all 4
BON = {
    "p0": {"responses": [LO, HI, LO, MID], "rewards": [0.0, 5.0, 1.0, 9.0], "lengths": [3, 5, 2, 7]},
    "p1": {"responses": [HI, LO, LO, HI], "rewards": [1.0, 4.0, 2.0, 8.0], "lengths": [1, 1, 6, 1]},
    "p2": {"responses": [HI] * 4, "rewards": [0.0] * 4, "lengths": [99] * 4},  # not a search prompt: never counted
}


def search_record(lengths: list[list[int]], answers: list[str]) -> dict:
    return {"iterations": [{"samples_so_far": 2 * (k + 1), "lengths": ln, "best_so_far": {"response": a}}
                           for k, (ln, a) in enumerate(zip(lengths, answers))]}


SEARCH = {"p0": search_record([[4, 6], [8, 2]], [LO, HI]), "p1": search_record([[1, 1], [3, 1]], [HI, HI])}


def rows(values: dict[int, dict[str, float]], kind: str = "control", **extra) -> list[dict]:
    """Curve rows with the given rewards per (N, prompt); vader = reward / 10, and the KL of the
    curve's kind (its key ``kl_<kind>``, as the stages write them) = reward / 100."""
    return [{"N": N, "prompt_id": p, "reward": v, "vader": v / 10, f"kl_{kind}": v / 100, **extra}
            for N, by in values.items() for p, v in by.items()]


def test_best_of_first_looks_at_the_first_N_rewards_only():
    assert tables.best_of_first(BON["p0"], 2) == HI
    assert tables.best_of_first(BON["p0"], 4) == MID
    assert tables.best_of_first(BON["p1"], 1) == HI


def test_search_answer_is_the_best_so_far_at_exactly_N_samples():
    assert tables.search_answer(SEARCH["p0"], 2) == LO
    assert tables.search_answer(SEARCH["p0"], 4) == HI
    with pytest.raises(ValueError, match="N = 3"):  # a budget between two iterations' ends names itself
        tables.search_answer(SEARCH["p0"], 3)


def test_bon_forward_calls_count_the_longest_sample_per_chunk():
    records = {"a": {"lengths": [3, 7, 2, 5, 9, 1]}, "b": {"lengths": [1] * 6}, "c": {"lengths": [50] * 6}}
    # a: chunks [3, 7, 2, 5] and [9, 1] -> 7 + 9 = 16; b: 1 + 1 = 2
    assert tables.bon_forward_calls(records, 6, ["a", "b"], batch_size=4) == 9.0
    assert tables.bon_forward_calls(records, 5, ["a"], batch_size=4) == 16.0  # [3, 7, 2, 5] and [9]
    # the last chunk stops at N: a longer sample after it costs nothing
    assert tables.bon_forward_calls({"d": {"lengths": [3, 7, 2, 5, 1, 9]}}, 5, ["d"], batch_size=4) == 7 + 1
    assert tables.bon_forward_calls(records, 3, ["a"], batch_size=4) == 7.0
    assert tables.bon_forward_calls(records, 6, ["a"], batch_size=2) == 7 + 5 + 9


def test_search_forward_calls_count_the_iterations_up_to_N():
    assert tables.search_forward_calls(SEARCH, 2, ["p0", "p1"]) == (6 + 1) / 2
    assert tables.search_forward_calls(SEARCH, 4, ["p0", "p1"]) == (6 + 8 + 1 + 3) / 2
    assert tables.search_forward_calls(SEARCH, 3, ["p0"]) == 6


def test_method_row_keys_order_and_means():
    curve = rows({4: {"p0": 1.0, "p1": 2.0, "p2": 3.0, "p3": 6.0}})
    row = tables.method_row("AISP", 4, 4, curve, ["vader"], 0.5, "control", 10.0, 4, kl=7.0, ci=CI)
    assert list(row) == ["method", "N", "prompts", "reward", "lo", "hi", "vader", "diversity", "kl", "kl_kind",
                         "forward_calls", "reward_calls"]
    assert row["reward"] == pytest.approx(3.0) and 1.0 <= row["lo"] < 3.0 < row["hi"] <= 6.0
    assert row["vader"] == pytest.approx(0.3)
    assert (row["kl"], row["kl_kind"], row["forward_calls"], row["reward_calls"]) == (7.0, "control", 10.0, 4)
    with pytest.raises(ValueError, match="kl_kind"):
        tables.method_row("AISP", 4, 4, curve, ["vader"], 0.5, "nats", 10.0, 4, ci=CI)


def _method_table() -> list[dict]:
    bon_curve = rows({2: {"p0": 1.0, "p1": 3.0, "p2": 100.0}, 4: {"p0": 2.0, "p1": 4.0, "p2": 100.0}}, "bound")
    aisp_curve = rows({2: {"p0": 2.0, "p1": 4.0}, 4: {"p0": 5.0, "p1": 7.0}})
    frozen_curve = rows({2: {"p0": 2.0, "p1": 4.0}, 4: {"p0": 3.0, "p1": 3.0}})
    sampler_curve = rows({4: {"p0": 1.0, "p1": 1.0}, 8: {"p0": 9.0, "p1": 9.0}}, "bound")  # N = 8 is not a budget
    misvo_curve = rows({4: {"p0": 6.0, "p1": 6.0}}, "sequence")
    lit_curve = (rows({4: {"p0": 1.0, "p1": 2.0}, 2: {"p0": 9.0}}, lit_lam=0.1)
                 + rows({4: {"p0": 3.0}}, lit_lam=1.0))
    args = ({"judges": {"vader": 0.7}, "diversity": 0.6, "kl_sequence": {"mean": 20.0},
             "cost_per_prompt": {"forward_calls": 16.0, "reward_calls": 160.0}}, [{"reward": 1.0}, {"reward": 3.0}])
    return tables.method_table(
        budgets=[2, 4], judges=["vader"], batch_size=2, ci=CI, bon=(bon_curve, BON),
        searches=[("AISP (greedy)", aisp_curve, SEARCH), ("frozen-U twin", frozen_curve, SEARCH)],
        sampler=("tuned sampler", sampler_curve, BON), misvo=([4], misvo_curve, SEARCH),
        literature=(4, [0.1, 1.0], lit_curve), baselines={"ARGS": args})


def test_method_table_rows_in_order_with_their_costs():
    table = _method_table()
    assert [(r["method"], r["N"]) for r in table] == [
        ("best-of-N", 2), ("AISP (greedy)", 2), ("frozen-U twin", 2),
        ("best-of-N", 4), ("AISP (greedy)", 4), ("frozen-U twin", 4),
        ("tuned sampler", 4), ("MISVO", 4),
        ("AISP (literature, lambda = 0.1)", 4), ("AISP (literature, lambda = 1.0)", 4), ("ARGS", None)]
    bon2, aisp2, _, bon4, aisp4, frozen4, sampler, misvo, lit1, lit2, args = table
    # best-of-N on the first search's prompts only (p2 would add 100 to the rewards and 99 to the passes)
    assert (bon2["prompts"], bon2["reward"], bon2["kl"], bon2["kl_kind"]) == (2, pytest.approx(2.0), pytest.approx(0.02), "bound")
    assert bon2["forward_calls"] == (5 + 1) / 2 and bon4["forward_calls"] == (5 + 7 + 1 + 6) / 2
    assert bon2["diversity"] == pytest.approx((D_HI + 0) / 2) and bon4["diversity"] == pytest.approx((D_MID + D_HI) / 2)
    assert (bon2["reward_calls"], bon4["reward_calls"]) == (2, 4)
    assert aisp2["forward_calls"] == 3.5 and aisp4["forward_calls"] == 9.0 and aisp2["kl_kind"] == "control"
    assert aisp2["diversity"] == pytest.approx(D_HI / 2) and aisp4["diversity"] == pytest.approx(D_HI)
    assert aisp4["reward"] == pytest.approx(6.0) and aisp4["kl"] == pytest.approx(0.06) and frozen4["reward"] == pytest.approx(3.0)
    assert (sampler["reward"], sampler["kl"], sampler["kl_kind"], sampler["forward_calls"]) == (pytest.approx(1.0), None, "sequence", None)
    assert sampler["diversity"] == pytest.approx((D_MID + D_HI) / 2)
    assert misvo["forward_calls"] == 9.0 and misvo["kl"] == pytest.approx(0.06) and misvo["kl_kind"] == "sequence"
    assert (lit1["prompts"], lit1["reward"], lit2["prompts"], lit1["diversity"]) == (2, pytest.approx(1.5), 1, None)
    assert args["reward"] == pytest.approx(2.0) and args["lo"] <= 2.0 <= args["hi"]
    assert (args["vader"], args["diversity"], args["kl"], args["forward_calls"], args["reward_calls"]) == (0.7, 0.6, 20.0, 16.0, 160.0)


@pytest.mark.parametrize(("kl", "kind", "text"), [
    (3.1749, "bound", "<= 3.17 (bound)"), (1234.6, "control", "1235 (control space)"),
    (0.456, "sequence", "0.46 (sequence)"), (None, "sequence", "n/a")])
def test_kl_cell_formats_each_kind(kl, kind, text):
    assert tables.kl_cell({"kl": kl, "kl_kind": kind}) == text


def test_method_table_markdown_has_a_header_and_one_line_per_row():
    table = _method_table()
    md = tables.method_table_markdown(table, ["vader"], 0.9).splitlines()
    assert len(md) == 2 + len(table)
    assert md[0].startswith("| method | N | prompts | reward (mean, 90% CI) | vader (held out) | diversity |")
    assert md[1] == "|---|---:|---:|---|" + "---:|" * 5
    assert md[8] == "| tuned sampler | 4 | 2 | +1.00 [+1.00, +1.00] | +0.100 | 0.146 | n/a | n/a | 4 |"
    assert md[-1].startswith("| ARGS | - | 2 | +2.00 [")


def _kl_table() -> list[dict]:
    bon_samples = [{"rewards": [1.0, 2.0, 3.0, 4.0, 100.0]}, {"rewards": [0.0, 0.0, 0.0, 4.0, 100.0]}]
    bon_curve = rows({1: {"p0": 1.0, "p1": 0.0}, 2: {"p0": 2.0, "p1": 0.0}, 4: {"p0": 4.0, "p1": 4.0}})
    finals = [("AISP: final U", [{"final_rollout": {"rewards": [1.0], "kl_sequence": [10.0]}},
                                 {"final_rollout": {"rewards": [3.0], "kl_sequence": [20.0]}}, {"prompt_id": "p2"}]),
              ("never rolled out", [{"final_rollout": None}, {}])]
    return tables.kl_table(ci=CI, bon_samples=bon_samples, bon_curve=bon_curve, full_budgets=[1, 2, 4], finals=finals,
                           baselines={"ARGS": [{"reward": 1.0, "kl_sequence": 2.0}, {"reward": 3.0, "kl_sequence": 4.0}]})


def test_kl_table_rows():
    table = _kl_table()
    assert [(r["policy"], r["kind"], r["prompts"]) for r in table] == [
        ("base model (one sample)", "exact", 2), ("best-of-2 (selection)", "upper bound", 2),
        ("best-of-4 (selection)", "upper bound", 2), ("AISP: final U", "Monte Carlo", 2),
        ("ARGS (greedy: -log pi_ref(y))", "exact per response", 2)]
    base, bon2, bon4, final, args = table
    assert base["kl"] == (0.0, 0.0, 0.0) and base["reward"][0] == pytest.approx((2.5 + 1.0) / 2)  # first 4 rewards
    assert bon2["kl"] == (pytest.approx(math.log(2) - 0.5), None, None) and bon2["reward"][0] == pytest.approx(1.0)
    assert bon4["kl"][0] == pytest.approx(math.log(4) - 0.75) and bon4["reward"][0] == pytest.approx(4.0)
    assert final["reward"][0] == pytest.approx(2.0) and final["kl"][0] == pytest.approx(15.0)
    assert args["kl"][0] == pytest.approx(3.0) and args["kl"][1] <= 3.0 <= args["kl"][2]
    assert tables.point([], CI) is None


def test_kl_table_markdown_lines():
    table = _kl_table()
    md = tables.kl_table_markdown(table, 0.95).splitlines()
    assert len(md) == 2 + len(table) and "(mean, 95% CI)" in md[0] and md[1] == "|---|---:|---|---|---|"
    assert md[2] == "| base model (one sample) | 2 | +1.75 [+1.00, +2.50] | 0.00 [0.00, 0.00] | exact |"
    assert md[3] == "| best-of-2 (selection) | 2 | +1.00 [+0.00, +2.00] | <= 0.19 | upper bound |"


def test_misvo_steps_average_over_prompts():
    samples = [{"iterations": [{"rewards": [1.0, 3.0], "kl_sequence_mean": 0.0}, {"rewards": [4.0, 4.0], "kl_sequence_mean": 0.2}]},
               {"iterations": [{"rewards": [0.0, 0.0], "kl_sequence_mean": 0.0}, {"rewards": [2.0, 0.0], "kl_sequence_mean": 0.4}]}]
    steps = tables.misvo_steps(samples)
    assert [s["step"] for s in steps] == [1, 2]
    assert steps[0]["reward"] == pytest.approx(1.0) and steps[1]["reward"] == pytest.approx(2.5)
    assert steps[0]["kl_sequence"] == 0.0 and steps[1]["kl_sequence"] == pytest.approx(0.3)
