"""The tune stage's search: candidate arms, their configs, successive halving and batched runs."""

import math
from dataclasses import replace

import pytest

from prelogit.aisp import AISPConfig, run_aisp_many
from prelogit.engine import prompt_generator
from prelogit.checks import ParameterError
from prelogit.sampling import PrelogitSampler
from toy_rewards import VowelShare

from prelogit.misvo import MISVOConfig, run_misvo_many
from prelogit.tune import (FACTORS, arm_config, candidate_arms, claim_arms, halving_within, one_factor_arms,
                           reading_arms, run_arms, run_pairs, selected_variants, successive_halving)

CENTER = {"sigma_rms": 0.25, "lam": 0.1, "lam_mode": "absolute", "alpha": 0.0, "alpha_mode": "mppi", "tau": 8,
          "n": 16, "decode": "sample"}
SWEEPS = {"sigma_rms": [0.1, 0.5], "lam_absolute": [0.001, 0.1], "lam_std": [1.0], "alpha_mppi": [0.9],
          "alpha_step": [0.5, 0.9], "tau": [4, "full"], "n": [8, 32], "decode": ["greedy"]}


# ---- arms ---------------------------------------------------------------------------------------

def test_center_first_then_one_factor_variations_with_labels():
    arms = candidate_arms(CENTER, SWEEPS, n_random=0, seed=0)
    assert arms[0] == {"label": "center", **CENTER}
    labels = [a["label"] for a in arms]
    # lam(absolute)=0.1 is the center itself and is dropped
    assert labels == ["center", "sigma_rms=0.1", "sigma_rms=0.5", "lam(absolute)=0.001", "lam(std)=1.0",
                      "alpha(mppi)=0.9", "alpha(step)=0.5", "alpha(step)=0.9", "tau=4", "tau=full", "n=8", "n=32",
                      "decode=greedy"]
    by_label = {a["label"]: a for a in arms}
    assert by_label["lam(std)=1.0"] == dict(CENTER, label="lam(std)=1.0", lam=1.0, lam_mode="std")
    assert by_label["alpha(step)=0.9"] == dict(CENTER, label="alpha(step)=0.9", alpha=0.9, alpha_mode="step")
    for a in arms[1:]:  # exactly one factor (or one mode and its value) differs from the center
        changed = {f for f in FACTORS if a[f] != CENTER[f]}
        assert len(changed) == 1 or changed in ({"lam", "lam_mode"}, {"alpha", "alpha_mode"}), a


def test_random_arms_are_seeded_distinct_and_use_only_allowed_values():
    a = candidate_arms(CENTER, SWEEPS, n_random=40, seed=3)
    assert a == candidate_arms(CENTER, SWEEPS, n_random=40, seed=3)
    assert a != candidate_arms(CENTER, SWEEPS, n_random=40, seed=4)
    keys = [tuple(x[f] for f in FACTORS) for x in a]
    assert len(keys) == len(set(keys)), "duplicates are dropped"
    randoms = [x for x in a if x["label"].startswith("random-")]
    assert 0 < len(randoms) <= 40 and len(a) > 13
    assert all(int(x["label"].split("-")[1]) in range(1, 41) for x in randoms)
    for x in randoms:
        assert x["sigma_rms"] in (0.25, 0.1, 0.5) and x["tau"] in (8, 4, "full") and x["n"] in (16, 8, 32)
        assert x["decode"] in ("sample", "greedy")
        assert (x["lam_mode"], x["lam"]) in {("absolute", 0.1), ("absolute", 0.001), ("std", 1.0)}
        assert (x["alpha_mode"], x["alpha"]) in {("mppi", 0.0), ("mppi", 0.9), ("step", 0.5), ("step", 0.9)}
    # random arms mix factors: some differ from the center in more than one factor
    assert any(sum(x[f] != CENTER[f] for f in FACTORS) > 2 for x in randoms)


def test_random_arms_with_no_sweeps_are_the_center():
    assert candidate_arms(CENTER, {}, n_random=5, seed=0) == [{"label": "center", **CENTER}]


def test_duplicate_sweep_values_are_dropped_keeping_the_first():
    arms = candidate_arms(CENTER, {"sigma_rms": [0.5, 0.25, 0.5]}, n_random=0, seed=0)
    assert [a["label"] for a in arms] == ["center", "sigma_rms=0.5"]


def test_unknown_sweep_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ParameterError, match=r"'lam'.*sigma_rms, lam_absolute, lam_std, alpha_mppi"):
        candidate_arms(CENTER, {"lam": [0.1]}, n_random=0, seed=0)


@pytest.mark.parametrize("center, sweeps, match", [
    ({k: v for k, v in CENTER.items() if k != "tau"}, {}, "missing key.*tau"),
    (dict(CENTER, lam_mode="relative"), {}, "lam_mode"),
    (CENTER, {"alpha_step": [1.5]}, "alpha"),
    (CENTER, {"tau": ["all"]}, "tau"),
    (CENTER, {"n": 8}, "list"),
])
def test_bad_arms_are_refused(center, sweeps, match):
    with pytest.raises(ParameterError, match=match):
        candidate_arms(center, sweeps, n_random=0, seed=0)


# ---- arm configs --------------------------------------------------------------------------------

def test_arm_config():
    arm = dict(CENTER, label="x", tau="full", n=8, lam_mode="std", alpha_mode="step", alpha=0.5)
    cfg = arm_config(arm, rms=2.0, max_new_tokens=24, N=64)
    assert cfg == AISPConfig(sigma=0.5, lam=0.1, lam_mode="std", alpha=0.5, alpha_mode="step", n=8, K=8, tau=24,
                             B=1, final_rollout=False)
    assert cfg.budget == 64
    assert arm_config(dict(arm, tau=5), 2.0, 24, 64).tau == 5
    assert arm_config(dict(arm, tau=0), 2.0, 24, 64).tau == 0


def test_arm_config_errors():
    with pytest.raises(ParameterError, match="tau must be at most max_new_tokens = 6.*tau = 8"):
        arm_config(dict(CENTER, label="c"), rms=1.0, max_new_tokens=6, N=64)
    with pytest.raises(ParameterError, match="N = 40 is not a multiple of n = 16"):
        arm_config(dict(CENTER, label="c"), rms=1.0, max_new_tokens=8, N=40)
    with pytest.raises(ParameterError, match="rms"):
        arm_config(dict(CENTER, label="c"), rms=0.0, max_new_tokens=8, N=64)


# ---- successive halving -------------------------------------------------------------------------

def fake_evaluate(quality, calls):
    """Score = the arm's quality + a prompt effect shared by all arms + a small deterministic noise."""
    def evaluate(arms, prompts):
        calls.append((list(arms), list(prompts)))
        out = {}
        for a in arms:
            for p in prompts:
                j = int(p[1:])
                out[(a, p)] = quality[a] + math.sin(j) + 0.05 * math.cos(7 * a + 3 * j)
        return out
    return evaluate


def test_successive_halving_selects_the_best_arm_on_the_schedule():
    quality = [0.1, 0.4, -0.2, 0.9, 0.3, 0.0, 0.5, 0.2, 0.35, 0.6]  # arm 3 is the best, then 9, 6, 1
    prompts = [f"p{j}" for j in range(40)]
    calls = []
    res = successive_halving(len(quality), prompts, [3, 8, 16, 32], 3, fake_evaluate(quality, calls))
    assert res["selected"] == 3
    alive = [r["arms"] for r in res["rungs"]]
    assert [len(a) for a in alive] == [10, 4, 2, 1]  # ceil(10/3), ceil(4/3), ceil(2/3)
    assert alive[1] == [1, 3, 6, 9] and alive[2] == [3, 9] and alive[3] == [3]
    assert [r["prompts"] for r in res["rungs"]] == [3, 8, 16, 32]
    assert res["evaluations"] == 10 * 3 + 4 * 5 + 2 * 8 + 1 * 16
    # one evaluate call per rung, with the alive arms and only the rung's new prompts
    assert calls == [(alive[0], prompts[:3]), (alive[1], prompts[3:8]), (alive[2], prompts[8:16]),
                     (alive[3], prompts[16:32])]
    # the arms alive at a rung are among those of the rung before, so all have seen the same prompts
    for before, after in zip(alive, alive[1:]):
        assert set(after) <= set(before)
    for a in range(len(quality)):
        last = max(i for i, arms in enumerate(alive) if a in arms)
        assert sorted(res["scores"][a]) == sorted(prompts[:res["rungs"][last]["prompts"]])
    for r in res["rungs"]:
        for a in r["arms"]:
            vals = [res["scores"][a][p] for p in prompts[:r["prompts"]]]
            assert math.isclose(r["means"][a], sum(vals) / len(vals))
    assert sorted(res["scores"][3]) == sorted(prompts[:32])  # the selected arm covers the whole last rung
    assert sum(len(s) for s in res["scores"].values()) == res["evaluations"]


def test_reading_arms_give_each_reading_its_own_block_of_the_same_arms():
    center = {k: v for k, v in CENTER.items() if k != "decode"}
    sweeps = {k: v for k, v in SWEEPS.items() if k != "decode"}
    arms, blocks = reading_arms(center, sweeps, ["sample", "greedy"], n_random=3, seed=1)
    assert list(blocks) == ["sample", "greedy"]
    assert blocks["sample"] + blocks["greedy"] == list(range(len(arms)))  # contiguous, in the order given
    for reading, block in blocks.items():
        alone = candidate_arms({**center, "decode": reading}, sweeps, n_random=3, seed=1)
        assert [arms[i] for i in block] == [{**a, "label": f"{reading}: {a['label']}"} for a in alone]
        assert all(arms[i]["decode"] == reading for i in block)
        assert arms[block[0]]["label"] == f"{reading}: center"
    # the same variations in both readings: only the decoding differs between the blocks
    strip = lambda a: {k: v for k, v in a.items() if k not in ("label", "decode")}
    assert [strip(arms[i]) for i in blocks["sample"]] == [strip(arms[i]) for i in blocks["greedy"]]


@pytest.mark.parametrize("readings, sweeps, match", [
    (["sample", "sample"], {}, "distinct"), ([], {}, "distinct"), (["beam"], {}, "distinct"),
    (["greedy"], {"decode": ["sample"]}, "reading"),
])
def test_reading_arms_reject_bad_readings(readings, sweeps, match):
    center = {k: v for k, v in CENTER.items() if k != "decode"}
    with pytest.raises(ParameterError, match=match):
        reading_arms(center, sweeps, readings, n_random=0, seed=0)


def test_halving_within_a_block_is_successive_halving_on_those_arms_only():
    quality = [5.0, 0.1, 0.4, -0.2, 0.9, 0.3, 0.0]  # arm 0 is the best overall but outside the block
    block = [1, 2, 3, 4, 5, 6]
    prompts = [f"p{j}" for j in range(8)]
    seen = []

    def evaluate(arms, ps):
        seen.append(list(arms))
        return {(a, p): quality[a] for a in arms for p in ps}

    res = halving_within(block, prompts, [2, 4, 8], 2, evaluate)
    assert all(set(arms) <= set(block) for arms in seen)  # never evaluates an arm of another reading
    assert res["selected"] == 4 and set(res["scores"]) <= set(block)
    local = successive_halving(len(block), prompts, [2, 4, 8], 2,
                               lambda js, ps: {(j, p): quality[block[j]] for j in js for p in ps})
    assert [[block[j] for j in r["arms"]] for r in local["rungs"]] == [r["arms"] for r in res["rungs"]]
    assert res["evaluations"] == local["evaluations"]
    assert res["rungs"][0]["means"] == {block[j]: m for j, m in local["rungs"][0]["means"].items()}


def test_successive_halving_ties_go_to_the_lower_index_and_eta_2():
    equal = lambda arms, ps: {(a, p): 1.0 for a in arms for p in ps}
    res = successive_halving(5, ["p1", "p2", "p3"], [1, 2, 3], 2, equal)
    assert [r["arms"] for r in res["rungs"]] == [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1]] and res["selected"] == 0
    assert res["evaluations"] == 5 + 3 + 2
    # ranks come from the means, not from the indices
    res = successive_halving(4, ["p1", "p2"], [1, 2], 2, lambda arms, ps: {(a, p): -a for a in arms for p in ps})
    assert res["rungs"][1]["arms"] == [0, 1] and res["selected"] == 0
    res = successive_halving(4, ["p1", "p2"], [1, 2], 2, lambda arms, ps: {(a, p): a for a in arms for p in ps})
    assert res["rungs"][1]["arms"] == [2, 3] and res["selected"] == 3


def test_successive_halving_with_one_rung_or_one_arm():
    res = successive_halving(3, ["a", "b"], [2], 3, lambda arms, ps: {(x, p): float(x == 1) for x in arms for p in ps})
    assert res["selected"] == 1 and res["evaluations"] == 6 and len(res["rungs"]) == 1
    one = successive_halving(1, ["a", "b", "c"], [1, 3], 2, lambda arms, ps: {(x, p): 0.5 for x in arms for p in ps})
    assert one["selected"] == 0 and one["evaluations"] == 3 and one["rungs"][1]["means"] == {0: 0.5}


@pytest.mark.parametrize("rungs, eta, match", [
    ([3, 3], 2, "increase strictly"), ([4, 2], 2, "increase strictly"), ([2, 5], 2, "at most"),
    ([], 2, "rungs"), ([0, 2], 2, r"rungs\[0\]"), ([1, 2], 1, "eta"), ([1, 2], 2.5, "eta")])
def test_bad_rungs_or_eta_raise(rungs, eta, match):
    with pytest.raises(ParameterError, match=match):
        successive_halving(3, ["a", "b", "c", "d"], rungs, eta, lambda arms, ps: {})


def test_missing_or_bad_scores_raise():
    with pytest.raises(ValueError, match="no score for arm 1"):
        successive_halving(2, ["a"], [1], 2, lambda arms, ps: {(0, "a"): 1.0})
    with pytest.raises(ValueError, match="finite"):
        successive_halving(2, ["a"], [1], 2, lambda arms, ps: {(x, "a"): float("nan") for x in arms})


# ---- batched runs of the arms -------------------------------------------------------------------

def _results(rec):
    return {k: v for k, v in rec.items() if k != "cost"}


def test_run_arms_equals_each_pair_alone(tiny_lm64, tokenizer):
    """Arms of two (n, K) groups and both decodes, on shared prompts: each pair's record is the one
    run_aisp_many gives that prompt alone with that config, decode and generator."""
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=4, max_rows=6)
    arms = [dict(CENTER, label="c", n=2, tau=2),
            dict(CENTER, label="s", n=2, tau="full", sigma_rms=1.0, lam=0.5, lam_mode="std"),
            dict(CENTER, label="k", n=4, tau=1, alpha=0.5, alpha_mode="step"),
            dict(CENTER, label="g", n=2, tau=3, decode="greedy"),
            dict(CENTER, label="l", n=2, tau=2, lam=1.0)]
    configs = [(arm_config(a, rms=1.5, max_new_tokens=4, N=4), a["decode"]) for a in arms]
    rows = [{"id": f"q{i}", "prompt": t, "text": t} for i, t in enumerate(["Hi!", "I lost my keys again.", "Good day."])]
    pairs = [(0, "q0"), (1, "q0"), (2, "q0"), (3, "q0"), (4, "q0"), (0, "q1"), (1, "q2"), (2, "q2"), (3, "q1"),
             (1, "q0")]
    out = run_arms(s, VowelShare(), configs, rows, pairs, seed=7)
    assert set(out) == set(pairs)
    text = {r["id"]: r["prompt"] for r in rows}
    for (i, pid), rec in out.items():
        cfg, decode = configs[i]
        alone = run_aisp_many(s, VowelShare(), [text[pid]], [text[pid]], cfg, [prompt_generator(7, pid)],
                              decode=decode)[0]
        assert _results(rec) == _results(alone), (i, pid)
        assert rec["config"] == alone["config"] and rec["samples_used"] == 4 and rec["final_rollout"] is None
    # the records depend neither on the order of the pairs nor on how calls are split
    again = run_arms(s, VowelShare(), configs, rows, list(reversed(pairs)), seed=7, max_prompts=2)
    assert {p: _results(r) for p, r in again.items()} == {p: _results(r) for p, r in out.items()}
    # common random numbers: arms 0 and 4 differ only in lambda, so their first iteration (U = 0) is
    # the same draw on the same prompt; the second iteration moves U differently
    first = lambda rec: {k: rec["iterations"][0][k] for k in ("rewards", "responses")}
    assert first(out[(0, "q0")]) == first(out[(4, "q0")])
    assert out[(0, "q0")]["iterations"][0]["lam_eff"] != out[(4, "q0")]["iterations"][0]["lam_eff"]
    other = run_arms(s, VowelShare(), configs, rows, [(0, "q0")], seed=8)
    assert _results(other[(0, "q0")]) != _results(out[(0, "q0")])


def test_run_arms_runs_misvo_arms_beside_aisp_ones(tiny_lm64, tokenizer):
    """MISVO configs of two (K, N) groups mixed with an AISP arm: each pair's record is the one its own
    driver gives that prompt alone; MISVO arms that differ only in eta share their first step (CRN)."""
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=4, max_rows=5)
    configs = [(MISVOConfig(eta=20.0, lam=1.0, K=2, steps=2, final_rollout=False), "sample"),
               (MISVOConfig(eta=60.0, lam=1.0, K=2, steps=2, final_rollout=False), "sample"),
               (MISVOConfig(eta=20.0, lam=0.0, K=4, steps=1, fisher="identity", final_rollout=False), "sample"),
               (arm_config(dict(CENTER, n=2, tau=2), rms=1.5, max_new_tokens=4, N=4), "sample")]
    rows = [{"id": f"q{i}", "prompt": t, "text": t} for i, t in enumerate(["Hi!", "I lost my keys again."])]
    pairs = [(i, pid) for i in range(4) for pid in ("q0", "q1")]
    out = run_arms(s, VowelShare(), configs, rows, pairs, seed=3, max_prompts=3)
    text = {r["id"]: r["prompt"] for r in rows}
    for (i, pid), rec in out.items():
        cfg, decode = configs[i]
        run = run_misvo_many if isinstance(cfg, MISVOConfig) else run_aisp_many
        alone = run(s, VowelShare(), [text[pid]], [text[pid]], cfg, [prompt_generator(3, pid)], decode=decode)[0]
        assert _results(rec) == _results(alone), (i, pid)
        assert rec["method"] == ("misvo" if i < 3 else "aisp")
    a, b = out[(0, "q0")]["iterations"], out[(1, "q0")]["iterations"]
    assert a[0]["responses"] == b[0]["responses"] and a[0]["u_norm_next"] != b[0]["u_norm_next"]


def test_one_factor_arms_vary_one_factor_at_a_time():
    center = {"eta": 0.1, "lam": 1.0, "K": 16, "fisher": "reference", "label": "x"}
    arms = one_factor_arms(center, {"eta": [0.3, 0.1], "lam": [0.0], "fisher": ["identity"]})
    assert [a["label"] for a in arms] == ["center", "eta=0.3", "lam=0.0", "fisher=identity"]  # eta=0.1 = center
    assert arms[1] == {"label": "eta=0.3", "eta": 0.3, "lam": 1.0, "K": 16, "fisher": "reference"}
    for a in arms[1:]:
        assert sum(a[k] != arms[0][k] for k in ("eta", "lam", "K", "fisher")) == 1
    with pytest.raises(ParameterError, match="unknown sweep key 'sigma'"):
        one_factor_arms(center, {"sigma": [1.0]})
    with pytest.raises(ParameterError, match="must be a list"):
        one_factor_arms(center, {"eta": 0.3})


def test_run_arms_rejects_unknown_prompts_and_configs(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=2)
    configs = [(AISPConfig(n=2, K=1, tau=1, final_rollout=False), "sample")]
    rows = [{"id": "a", "prompt": "Hi", "text": "Hi"}]
    with pytest.raises(ParameterError, match="'b'"):
        run_arms(s, VowelShare(), configs, rows, [(0, "b")], seed=0)
    with pytest.raises(ParameterError, match="config index 1"):
        run_arms(s, VowelShare(), configs, rows, [(1, "a")], seed=0)
    with pytest.raises(ParameterError, match="twice"):
        run_arms(s, VowelShare(), configs, rows * 2, [(0, "a")], seed=0)


def test_claim_arms_are_the_center_and_its_sigma_alpha_and_lambda_extremes():
    center = {"sigma_rms": 0.25, "lam": 0.1, "lam_mode": "absolute", "alpha": 0.0, "alpha_mode": "mppi", "tau": 8,
              "n": 16, "decode": "sample"}
    arms = candidate_arms(center, {"sigma_rms": [0.1, 0.5], "lam_absolute": [0.001, 1.0], "lam_std": [1.0],
                                   "alpha_mppi": [0.5, 0.999], "alpha_step": [0.1, 0.5, 0.999], "tau": [4],
                                   "decode": ["greedy"]}, n_random=2, seed=0)
    labels = [arms[i]["label"] for i in claim_arms(arms)]
    assert labels == ["center", "sigma_rms=0.1", "sigma_rms=0.5", "lam(absolute)=0.001", "alpha(mppi)=0.999",
                      "alpha(step)=0.1", "alpha(step)=0.999"]


def test_run_pairs_in_one_process_is_run_arms(tiny_lm64, tokenizer):
    """One process: run_pairs gives run_arms' records, in run_arms' order (lockstep groups sorted), and it
    checks every pair before anything runs, with run_arms' messages."""
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=4, max_rows=6)
    configs = [(arm_config(dict(CENTER, n=2, tau=2), rms=1.5, max_new_tokens=4, N=4), "sample"),
               (arm_config(dict(CENTER, n=4, tau=1), rms=1.5, max_new_tokens=4, N=4), "sample"),
               (MISVOConfig(eta=20.0, lam=1.0, K=2, steps=2, final_rollout=False), "sample")]
    rows = [{"id": f"q{i}", "prompt": t, "text": t} for i, t in enumerate(["Hi!", "I lost my keys again."])]
    pairs = [(2, "q1"), (1, "q0"), (0, "q1"), (2, "q0"), (0, "q0"), (1, "q0")]
    want = run_arms(s, VowelShare(), configs, rows, pairs, seed=5)
    got = run_pairs(s, VowelShare(), configs, {r["id"]: r for r in rows}, pairs, seed=5)
    assert list(got) == list(want)
    assert {p: _results(r) for p, r in got.items()} == {p: _results(r) for p, r in want.items()}
    by_id = {r["id"]: r for r in rows}
    with pytest.raises(ParameterError, match="prompt id 'q9' is not in prompt_rows"):
        run_pairs(s, VowelShare(), configs, by_id, [(0, "q0"), (0, "q9")], seed=5)
    with pytest.raises(ParameterError, match="config index 3"):
        run_pairs(s, VowelShare(), configs, by_id, [(3, "q0")], seed=5)


SELECTED = {"readings": {
    "sample": {"label": "sample: center", "rms": 2.0, "decode": "sample",
               "arm": {"sigma_rms": 0.25, "lam": 0.1, "lam_mode": "absolute", "alpha": 0.5, "alpha_mode": "mppi", "tau": 8,
                       "n": 16, "decode": "sample"}},
    "greedy": {"label": "greedy: center", "rms": 2.0, "decode": "greedy",
               "arm": {"sigma_rms": 0.5, "lam": 0.1, "lam_mode": "absolute", "alpha": 0.99, "alpha_mode": "mppi",
                       "tau": "full", "n": 8, "decode": "greedy"}}}}


def test_selected_variants_are_the_tuned_configs_and_aisp_sigma_pins_sigma_alone():
    tuned = selected_variants(SELECTED, 16, 64, final_rollout=True)
    assert list(tuned) == ["sample", "greedy"]  # the file's order: the first reading is the detailed one
    for reading, v in tuned.items():
        sel = SELECTED["readings"][reading]
        assert v["decode"] == sel["decode"] and v["selected"] is sel
        assert v["cfg"] == replace(arm_config(sel["arm"], sel["rms"], 16, 64), final_rollout=True)
    assert tuned["greedy"]["cfg"].sigma == 0.5 * 2.0 and tuned["greedy"]["cfg"].tau == 16  # sigma_rms x RMS; full
    pinned = selected_variants(SELECTED, 16, 64, final_rollout=True, sigma=0.3)
    for reading, v in pinned.items():
        assert v["cfg"].sigma == 0.3  # the one key that sets the test runs' sigma, in pre-logit units
        assert replace(v["cfg"], sigma=tuned[reading]["cfg"].sigma) == tuned[reading]["cfg"]  # and nothing else
    with pytest.raises(ParameterError, match="aisp.sigma"):
        selected_variants(SELECTED, 16, 64, final_rollout=True, sigma=0.0)
