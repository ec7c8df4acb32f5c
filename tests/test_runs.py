"""The pipeline glue of prelogit.runs (and the stage drivers beside it: tune.selected_variants,
args.args_records, recontrol.recontrol_records), on synthetic records, fake drivers, toy rewards and
the tiny random Llama of conftest.py.

Fake ``run`` drivers pin what :func:`prelogit.runs.prompt_records` adds around a method; the real drivers
run on the tiny model with a few tokens, a couple of prompts and tiny budgets, so each test takes seconds.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from prelogit.aisp import AISPConfig, frozen_twin
from prelogit.engine import prompt_generator
from prelogit.metrics import distinct_ngram_diversity
from prelogit.runs import (COST_KEYS, aisp_and_twins, aisp_curve, aisp_records, build_models, build_sampler, build_scorers,
                           one_response_lines, one_response_summary, prompt_records, reading_curve)
from prelogit.sampling import PrelogitSampler
from toy_rewards import VowelShare


class LetterCount:
    """Reward: how often ``letter`` occurs in the response (exact small integers, so equality is fair)."""

    def __init__(self, letter: str = "e"):
        self.letter = letter
        self.name = f"count-{letter}"

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return torch.tensor([float(r.lower().count(self.letter)) for r in responses])


class Length:
    """Judge: the response's length in characters (it reads the response, not the prompt)."""

    name = "length"

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return torch.tensor([float(len(r)) for r in responses])


JUDGES = {"vowels": VowelShare(), "length": Length()}
USERS = ["Hi! How was your weekend?", "What do you like to cook?", "Any plans for the summer?"]


def chat(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def rows_of(tokenizer, users=USERS, prefix="test") -> list[dict]:
    """``load_prompts`` rows ({id, split, text, prompt}) for the user turns."""
    return [{"id": f"{prefix}-{i:03d}", "split": "test", "text": u, "prompt": chat(tokenizer, u)}
            for i, u in enumerate(users)]


def without_times(rec: dict) -> dict:
    """A record without the wall-clock fields of its cost (the only thing two identical runs may differ in)."""
    out = dict(rec)
    out["cost"] = {k: v for k, v in rec["cost"].items() if not k.startswith("time_")}
    return out


# ---- one_response_summary ------------------------------------------------------------------------

# Dyadic rewards, KLs and judge scores: exact in float32 and in every partial sum, so the summary's means
# (one divides an exact sum by n, as the hand computation does) can be compared for equality, no tolerance.
REWARDS = [0.5, 1.25, -2.0, 3.0, 0.75, 1.5, -0.25, 2.5, 0.0, 1.0, -1.5, 2.25]
GREEDY = [0.25, 1.25, -1.0, 2.0, 1.75, 0.5, -0.25, 1.5, -0.5, 1.0, -2.0, 1.5]  # sums to 6: its float32 mean is exact
KLS = [1.0, 2.5, 0.5, 4.0, 3.25, 0.0, 1.75, 2.0, 0.25, 1.5, 3.0, 0.75]
RESPONSES = ["the cat sat on the mat", "good good good good good", "a b c d e", "yes yes yes",
             "I had a lovely day", "we went to the sea and the sea was calm", "no", "fine thanks",
             "it was great great great", "cooking pasta tonight", "hello there friend", "ok ok ok ok ok ok"]


def summary_records() -> list[dict]:
    recs = []
    for i, (r, g, kl, resp) in enumerate(zip(REWARDS, GREEDY, KLS, RESPONSES)):
        recs.append({
            "reward": r, "greedy_reward": g, "kl_sequence": kl, "response": resp,
            "judges": {"a": r / 2, "b": float(i), "unused": 100.0},
            "deviation_rate": [0.0, 0.25, 0.5, 1.0][i % 4], "finished": i % 3 == 0,
            # extra cost keys (generations, the times) must not reach cost_per_prompt
            "cost": {"forward_calls": 4 + i, "new_tokens": 2 * i, "reward_calls": 10, "reward_batches": i % 2,
                     "generations": 1, "time_generation_s": 0.1 * i, "time_reward_s": 0.0, "time_total_s": 0.1 * i},
        })
    return recs


def test_one_response_summary_details_are_the_hand_computed_means():
    """details: every mean and share equals its hand computation over the 12 prompts, only the named judges
    are averaged, only COST_KEYS are averaged, and both CIs bracket their means."""
    recs = summary_records()
    n = len(recs)
    details, _ = one_response_summary(recs, ["a", "b"], seed=0)
    assert details["n_prompts"] == n
    assert details["reward"] == sum(REWARDS) / n
    lo, hi = details["reward_ci"]
    assert lo < details["reward"] < hi  # 12 distinct rewards: the 95% interval has width
    assert details["kl_sequence"]["mean"] == sum(KLS) / n
    assert details["kl_sequence"]["lo"] < details["kl_sequence"]["mean"] < details["kl_sequence"]["hi"]
    assert details["judges"] == {"a": sum(REWARDS) / 2 / n, "b": sum(range(n)) / n}
    assert details["diversity"] == distinct_ngram_diversity(RESPONSES)
    assert 0 < details["diversity"] < 1  # some responses repeat n-grams, some do not
    assert details["deviation_rate"] == sum([0.0, 0.25, 0.5, 1.0] * 3) / n
    assert details["finished_share"] == 4 / n  # i = 0, 3, 6, 9
    assert details["greedy_reward"] == sum(GREEDY) / n
    diffs = [r - g for r, g in zip(REWARDS, GREEDY)]
    vs = details["vs_greedy"]
    assert vs["mean"] == sum(diffs) / n and vs["lo"] < vs["mean"] < vs["hi"]
    assert vs["share_a_greater"] == sum(d > 0 for d in diffs) / n
    assert vs["share_ties"] == sum(d == 0 for d in diffs) / n and vs["n_prompts"] == n
    assert details["cost_per_prompt"] == {"forward_calls": sum(4 + i for i in range(n)) / n,
                                          "new_tokens": sum(2 * i for i in range(n)) / n,
                                          "reward_calls": 10.0, "reward_batches": 0.5}
    assert tuple(details["cost_per_prompt"]) == COST_KEYS


def test_one_response_summary_headline_repeats_the_details():
    """headline: the keys ``dvc metrics show`` prints, each the same number as in details."""
    details, headline = one_response_summary(summary_records(), ["a"], seed=3)
    assert set(headline) == {"n_prompts", "reward", "reward_lo", "reward_hi", "greedy_reward", "vs_greedy", "kl_sequence",
                             "judges", "deviation_rate", "diversity"}
    assert [headline["reward_lo"], headline["reward_hi"]] == details["reward_ci"]
    assert headline["reward"] == details["reward"] and headline["greedy_reward"] == details["greedy_reward"]
    assert headline["vs_greedy"] == {k: details["vs_greedy"][k] for k in ("mean", "lo", "hi")}
    assert headline["kl_sequence"] == {"mean": details["kl_sequence"]["mean"]} and headline["judges"] == details["judges"] == {"a": 0.375}
    assert (headline["deviation_rate"], headline["diversity"]) == (details["deviation_rate"], details["diversity"])


def test_one_response_summary_is_deterministic_for_a_seed():
    """The bootstrap resamples with the seed: the same seed gives the same summary, another seed other CIs
    (the means stay)."""
    recs = summary_records()
    a, b, c = (one_response_summary(recs, ["a"], seed=s) for s in (7, 7, 8))
    assert a == b
    assert c[0]["reward"] == a[0]["reward"]
    assert c[0]["reward_ci"] != a[0]["reward_ci"]
    assert (c[0]["kl_sequence"]["lo"], c[0]["kl_sequence"]["hi"]) != (a[0]["kl_sequence"]["lo"], a[0]["kl_sequence"]["hi"])
    assert (c[0]["vs_greedy"]["lo"], c[0]["vs_greedy"]["hi"]) != (a[0]["vs_greedy"]["lo"], a[0]["vs_greedy"]["hi"])


# ---- prompt_records ------------------------------------------------------------------------------

PLAIN_ROWS = [{"id": "test-007", "split": "test", "text": "Hello there, friend", "prompt": "<u>Hello there, friend</u>"},
              {"id": "test-013", "split": "test", "text": "What is for dinner?", "prompt": "<u>What is for dinner?</u>"}]


class FakeRun:
    """A method that records what it was called with and draws 3 numbers from each prompt's generator;
    its records have ``responses`` (``judged="samples"``) and ``iterations`` (``"best_so_far"``)."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, user_texts, generators):
        self.calls.append((list(prompts), list(user_texts)))
        out = []
        for prompt, user, g in zip(prompts, user_texts, generators):
            draw = torch.rand(3, generator=g).tolist()
            responses = [f"{user} {'a' * (i + 1)}" for i in range(3)]
            out.append({"templated": prompt, "draw": draw, "responses": responses,
                        "iterations": [{"best_so_far": {"response": r}} for r in responses[:2]]})
        return out


def test_prompt_records_fill_ids_and_judge_every_sample():
    """judged="samples": the records come back in row order with prompt_id and prompt (the raw user turn),
    ``run`` got the templated prompts and user turns, and each judge scored every sample against its own
    prompt."""
    run = FakeRun()
    recs = prompt_records(PLAIN_ROWS, run, seed=4, judges=JUDGES, judged="samples")
    assert run.calls == [([r["prompt"] for r in PLAIN_ROWS], [r["text"] for r in PLAIN_ROWS])]
    assert [(r["prompt_id"], r["prompt"], r["templated"]) for r in recs] == \
        [(r["id"], r["text"], r["prompt"]) for r in PLAIN_ROWS]
    for rec, row in zip(recs, PLAIN_ROWS):
        assert set(rec["judges"]) == set(JUDGES)
        assert rec["judges"]["length"] == [float(len(row["text"]) + 2 + i) for i in range(3)]  # text, " ", i + 1 a's
        assert rec["judges"]["vowels"] == VowelShare().score([row["text"]] * 3, rec["responses"]).tolist()
        assert "best_so_far_judges" not in rec


def test_prompt_records_judge_each_iterations_best_so_far():
    """judged="best_so_far": one dict of judge scores per iteration, of that iteration's best-so-far answer."""
    recs = prompt_records(PLAIN_ROWS, FakeRun(), seed=4, judges=JUDGES, judged="best_so_far")
    for rec, row in zip(recs, PLAIN_ROWS):
        assert "judges" not in rec
        answers = [it["best_so_far"]["response"] for it in rec["iterations"]]
        vowels = VowelShare().score([row["text"]] * 2, answers).tolist()
        assert rec["best_so_far_judges"] == [{"vowels": vowels[k], "length": float(len(answers[k]))} for k in range(2)]


def test_prompt_records_give_each_prompt_its_own_generator():
    """Each prompt draws from prompt_generator(seed, its id): the draws equal a fresh such generator's,
    change with the seed, and a prompt's record does not depend on which other rows run with it."""
    both = prompt_records(PLAIN_ROWS, FakeRun(), seed=4, judges=JUDGES, judged="samples")
    for rec, row in zip(both, PLAIN_ROWS):
        assert rec["draw"] == torch.rand(3, generator=prompt_generator(4, row["id"])).tolist()
    assert both[0]["draw"] != both[1]["draw"]
    alone = prompt_records(PLAIN_ROWS[1:], FakeRun(), seed=4, judges=JUDGES, judged="samples")
    assert alone == both[1:]
    other_seed = prompt_records(PLAIN_ROWS, FakeRun(), seed=5, judges=JUDGES, judged="samples")
    assert [r["draw"] for r in other_seed] != [r["draw"] for r in both]


def test_prompt_records_reject_an_unknown_judged_before_running():
    run = FakeRun()
    with pytest.raises(ValueError, match="judged must be 'samples' or 'best_so_far'"):
        prompt_records(PLAIN_ROWS, run, seed=0, judges=JUDGES, judged="other")
    assert run.calls == []


# ---- aisp_and_twins and reading_curve -------------------------------------------------------------

SEED = 11
# two configs (different sigma, lam and tau; the n, K, final_rollout they must share in lockstep)
CFG_A = AISPConfig(sigma=0.5, lam=0.05, alpha=0.5, alpha_mode="mppi", n=2, K=2, tau=2)
CFG_B = AISPConfig(sigma=1.0, lam=0.1, n=2, K=2, tau=3)


@pytest.fixture(scope="module")
def aisp_run(tiny_lm, tokenizer):
    """aisp_and_twins on two readings, each with two groups of prompts (one with its own config) and an
    empty group, on the tiny model with 4 tokens."""
    sampler = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=4)
    rows = rows_of(tokenizer)
    variants = {"sample": {"decode": "sample", "cfgs": (CFG_A, CFG_B)},
                "greedy": {"decode": "greedy", "cfgs": (CFG_B, CFG_A)}}

    def groups(v):
        return [(rows[:2], v["cfgs"][0]), ([], v["cfgs"][0]), (rows[2:], v["cfgs"][1])]

    records, frozen, seconds = aisp_and_twins(sampler, VowelShare(), JUDGES, variants, groups, SEED)
    return sampler, rows, variants, groups, records, frozen, seconds


def test_aisp_and_twins_label_records_in_variant_and_group_order(aisp_run):
    _, rows, _, _, records, frozen, seconds = aisp_run
    order = [("sample", r["id"]) for r in rows] + [("greedy", r["id"]) for r in rows]
    assert [(r["reading"], r["prompt_id"]) for r in records] == order
    assert [(r["reading"], r["prompt_id"]) for r in frozen] == order
    assert set(seconds) == {"aisp", "frozen"} and all(s > 0 for s in seconds.values())


def test_aisp_and_twins_are_aisp_records_of_each_group(aisp_run):
    """Each group's records are exactly aisp_records with the variant's config, seed and decode (same code
    path and inputs: bit-equal, the wall-clock times aside); the twins are those of frozen_twin(config)."""
    sampler, _, variants, groups, records, frozen, _ = aisp_run
    want, want_frozen = [], []
    for v in variants.values():
        for rows, cfg in groups(v):
            if rows:
                want += aisp_records(sampler, VowelShare(), JUDGES, rows, cfg, SEED, v["decode"])
                want_frozen += aisp_records(sampler, VowelShare(), JUDGES, rows, frozen_twin(cfg), SEED, v["decode"])
    strip = lambda recs: [without_times({k: x for k, x in r.items() if k != "reading"}) for r in recs]  # noqa: E731
    assert strip(records) == strip(want)
    assert strip(frozen) == strip(want_frozen)
    # the decode matters here, so the comparison above pins it: the greedy reading's first group under "sample"
    rows, cfg = groups(variants["greedy"])[0]
    sampled = aisp_records(sampler, VowelShare(), JUDGES, rows, cfg, SEED, "sample")
    assert [r["iterations"] for r in sampled] != [r["iterations"] for r in records[3:5]]


def test_frozen_twins_hold_U_at_zero_on_the_same_first_draws(aisp_run):
    *_, records, frozen, _ = aisp_run
    for a, f in zip(records, frozen):
        assert all(u == 0.0 for it in f["iterations"] for u in it["U_norm"])
        assert f["iterations"][0]["rewards"] == a["iterations"][0]["rewards"]
        assert f["iterations"][0]["responses"] == a["iterations"][0]["responses"]
        assert f["config"]["alpha"] == 0.0 and f["final_rollout"] is None
    assert any(u > 0 for a in records for it in a["iterations"] for u in it["U_norm"])  # AISP itself moves U


def test_reading_curve_is_aisp_curve_per_record_with_its_reading(aisp_run):
    """One row per record and iteration, record by record: aisp_curve's row (N = n k, the best-so-far
    reward and judges) plus the record's reading, which tells apart the two rows of a prompt at one N."""
    *_, records, _, _ = aisp_run
    rows = reading_curve(records)
    K = CFG_A.K
    assert len(rows) == K * len(records)
    for i, rec in enumerate(records):
        mine = rows[i * K:(i + 1) * K]
        assert [r["reading"] for r in mine] == [rec["reading"]] * K
        assert [{k: v for k, v in r.items() if k != "reading"} for r in mine] == aisp_curve([rec])
        assert [r["N"] for r in mine] == [CFG_A.n * k for k in range(1, K + 1)]
        assert [r["reward"] for r in mine] == [it["best_so_far"]["reward"] for it in rec["iterations"]]
        assert [r["length"] for r in mine] == [j["length"] for j in rec["best_so_far_judges"]]
    assert {(r["prompt_id"], r["N"], r["reading"]) for r in rows} == \
        {(r["prompt_id"], CFG_A.n * k, r["reading"]) for r in records for k in range(1, K + 1)}


# ---- tune.selected_variants ----------------------------------------------------------------------

def _arm(decode: str, tau, n: int, label: str) -> dict:
    return {"alpha": 0.5, "alpha_mode": "mppi", "decode": decode, "lam": 0.1, "lam_mode": "absolute", "n": n,
            "sigma_rms": 0.25, "tau": tau, "label": label}


def test_selected_variants_rebuild_each_readings_config():
    """Each reading's cfg is arm_config(arm, rms, T, N) with final_rollout set, its decode and entry are the
    file's, and the readings keep the file's order (here not alphabetical)."""
    from prelogit.tune import arm_config, selected_variants

    selected = {"N": 8, "readings": {
        "sample": {"arm": _arm("sample", 3, 4, "sample: center"), "rms": 2.0, "decode": "sample", "label": "sample: center"},
        "greedy": {"arm": _arm("greedy", "full", 2, "greedy: tau=full"), "rms": 1.5, "decode": "greedy",
                   "label": "greedy: tau=full"}}}
    for final_rollout in (True, False):
        out = selected_variants(selected, max_new_tokens=6, N=8, final_rollout=final_rollout)
        assert list(out) == ["sample", "greedy"]
        for reading, sel in selected["readings"].items():
            v = out[reading]
            assert v["selected"] == sel and v["decode"] == sel["decode"]
            assert v["cfg"] == dataclasses.replace(arm_config(sel["arm"], sel["rms"], 6, 8), final_rollout=final_rollout)
    out = selected_variants(selected, max_new_tokens=6, N=8, final_rollout=True)
    s, g = out["sample"]["cfg"], out["greedy"]["cfg"]
    assert (s.sigma, s.n, s.K, s.tau, s.final_rollout) == (0.5, 4, 2, 3, True)
    assert (g.sigma, g.n, g.K, g.tau) == (0.375, 2, 4, 6)  # tau "full" is max_new_tokens


# ---- args.args_records ---------------------------------------------------------------------------

ARGS_KW = dict(k=5, w=2.0, decode="sample", temperature=0.7)


@pytest.fixture(scope="module")
def args_run(tiny_lm64, tokenizer):
    """args_records on two prompts with the float64 tiny model: a prompt's ARGS and greedy decoding then
    cannot depend on the batch it ran in (no rounding differs), so each can be recomputed alone."""
    from prelogit.args import args_records

    sampler = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=5)
    rows = rows_of(tokenizer, USERS[:2], prefix="args")
    recs = args_records(sampler, LetterCount(), JUDGES, rows, seed=3, **ARGS_KW)
    return sampler, rows, recs


def test_args_records_are_args_and_greedy_per_prompt(args_run):
    """One record per row, in order: the response is args_generate_many's on that prompt alone with
    prompt_generator(seed, id), the greedy response the sampler's greedy decoding, each with its reward,
    and the judges score the ARGS response."""
    from prelogit.args import args_generate_many

    sampler, rows, recs = args_run
    assert [(r["prompt_id"], r["prompt"]) for r in recs] == [(p["id"], p["text"]) for p in rows]
    for rec, p in zip(recs, rows):
        res = args_generate_many(sampler, [p["prompt"]], [p["text"]], LetterCount(),
                                 generators=[prompt_generator(3, p["id"])], **ARGS_KW)[0]
        assert rec["response"] == res.text and rec["tokens"] == res.tokens.tolist()
        assert rec["chosen"] == res.chosen.tolist() and rec["deviation_rate"] == res.deviation_rate
        assert rec["kl_sequence"] == res.kl and math.isfinite(rec["kl_sequence"]) and rec["kl_sequence"] >= 0
        assert rec["reward"] == float(rec["response"].lower().count("e"))
        assert rec["judges"] == {"vowels": float(VowelShare().score([p["text"]], [res.text])[0]),
                                 "length": float(len(res.text))}
        greedy = sampler.generate(p["prompt"], 1, decode="greedy").texts[0]
        assert rec["greedy_response"] == greedy and rec["greedy_reward"] == float(greedy.lower().count("e"))
        assert rec["config"] == {"k": 5, "w": 2.0, "decode": "sample", "temperature": 0.7, "max_new_tokens": 5}
        assert rec["cost"]["reward_calls"] == 5 * len(rec["tokens"])


def test_args_records_draw_with_the_seed(args_run, tokenizer):
    """The seed reaches the draws: another seed changes some response (so the comparison above with
    prompt_generator(3, id) could fail), while the greedy responses stay."""
    from prelogit.args import args_records

    sampler, rows, recs = args_run
    other = args_records(sampler, LetterCount(), JUDGES, rows, seed=4, **ARGS_KW)
    assert [r["tokens"] for r in other] != [r["tokens"] for r in recs]
    assert [r["greedy_response"] for r in other] == [r["greedy_response"] for r in recs]


# ---- recontrol.recontrol_records -----------------------------------------------------------------

def test_recontrol_records_steer_and_keep_greedy_as_reference(tiny_lm64, tokenizer):
    """A linear value along the LM-head row of largest norm, with a large step, steers every token to that
    row's token (see test_baselines.test_recontrol_ascent_steers_decoding); the records keep the plain
    greedy response beside it, and n_steps = 0 is plain greedy decoding with no deviation."""
    from prelogit.recontrol import recontrol_records

    W = tiny_lm64.get_output_embeddings().weight.detach()
    target = int(W.norm(dim=1).argmax())
    value = lambda z: z.double() @ W[target]  # noqa: E731  (the ascent hands V a float32 copy of z)
    sampler = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=4)
    rows = rows_of(tokenizer, USERS[:2], prefix="rc")
    steered = recontrol_records(sampler, LetterCount(), JUDGES, rows, value, step_size=100.0, n_steps=3)
    plain = recontrol_records(sampler, LetterCount(), JUDGES, rows, value, step_size=100.0, n_steps=0)
    for recs, n_steps in ((steered, 3), (plain, 0)):
        assert [(r["prompt_id"], r["prompt"]) for r in recs] == [(p["id"], p["text"]) for p in rows]
        for rec, p in zip(recs, rows):
            greedy = sampler.generate(p["prompt"], 1, decode="greedy").texts[0]
            assert rec["greedy_response"] == greedy
            assert rec["value_grad_steps"] == n_steps * len(rec["tokens"])
            assert rec["reward"] == float(rec["response"].lower().count("e"))
            assert rec["judges"] == {"vowels": float(VowelShare().score([p["text"]], [rec["response"]])[0]),
                                     "length": float(len(rec["response"]))}
            assert math.isfinite(rec["kl_sequence"]) and rec["kl_sequence"] >= 0
            assert rec["config"] == {"step_size": 100.0, "n_steps": n_steps, "max_new_tokens": 4}
    for rec in plain:
        assert rec["deviation_rate"] == 0.0 and rec["response"] == rec["greedy_response"]
        assert not rec["differs_from_greedy"] and rec["value_before"] == rec["value_after"]
    for rec in steered:
        assert rec["tokens"] == [target] * len(rec["tokens"])
        assert rec["deviation_rate"] > 0 and rec["differs_from_greedy"]
        assert rec["replay_agreement"] == 1.0  # the replayed ascent reproduces every generated token
        assert rec["value_gain"] > 0


# ---- build_sampler and build_scorers --------------------------------------------------------------

def test_build_sampler_loads_the_model_section_and_decodes_as_the_generation_section(tmp_path, tiny_lm, tokenizer):
    """The tiny Llama saved to a folder stands for model.name: the sampler wraps those weights with the
    generation section's decoding and model.max_rows, and generates what a sampler on the original does."""
    from prelogit.params import Generation, Model

    folder = tmp_path / "tiny"
    tiny_lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = Model(name=str(folder), dtype="float32", device="cpu", cache_dir=str(tmp_path / "cache"), threads=1,
                  max_rows=3, device_map=None)
    gen = Generation(max_new_tokens=5, decode="greedy", temperature=0.7, top_k=7, top_p=0.9)
    sampler, seconds = build_sampler(model, gen)
    assert seconds > 0 and torch.get_num_threads() == 1
    assert (sampler.max_new_tokens, sampler.decode, sampler.temperature, sampler.top_k, sampler.top_p,
            sampler.max_rows) == (5, "greedy", 0.7, 7, 0.9, 3)
    assert torch.equal(sampler.head.weight, tiny_lm.get_output_embeddings().weight)
    prompt = chat(tokenizer, USERS[0])
    ref = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=5, decode="greedy")
    assert sampler.generate(prompt, 1).texts == ref.generate(prompt, 1).texts


def test_build_scorers_embedded_reads_the_head_and_shares_the_encoder(tmp_path):
    """kind "embedded": the reward is the sentiment head of ``reward_head_path`` on the packaged MiniLM,
    which the judges share; the head file decides the scores."""
    from prelogit.params import Reward
    from prelogit.rewards import EmbeddingHeadReward, RelevanceJudge, VaderJudge, save_head

    head = {"weight": torch.linspace(-1, 1, 384), "bias": torch.tensor([0.5])}
    save_head(head, tmp_path / "head.safetensors")
    save_head({"weight": -head["weight"], "bias": torch.tensor([0.0])}, tmp_path / "other.safetensors")
    spec = Reward(kind="embedded", name=None, dtype="float32")
    reward, judges, encoder = build_scorers(spec, tmp_path / "head.safetensors", device="cpu")
    assert isinstance(reward, EmbeddingHeadReward) and reward.encoder is encoder
    assert set(judges) == {"vader", "relevance"}
    assert isinstance(judges["vader"], VaderJudge) and isinstance(judges["relevance"], RelevanceJudge)
    assert judges["relevance"].encoder is encoder
    texts = ["What a lovely day, thank you!", "This is awful."]
    got = reward.score(texts, texts)
    assert torch.equal(got, EmbeddingHeadReward(encoder, head).score(texts, texts))
    other, _, _ = build_scorers(spec, tmp_path / "other.safetensors")
    assert not torch.equal(other.score(texts, texts), got)


def test_build_models_builds_the_sections_sampler_and_the_scorers_of_its_reward_head(tmp_path, tiny_lm, tokenizer):
    """build_models(P): the sampler of P.model and P.generation, the reward of P.reward with P.reward_head_path,
    the judges on the same encoder: what build_sampler and build_scorers give one by one."""
    from types import SimpleNamespace

    from prelogit.params import Generation, Model, Reward
    from prelogit.rewards import save_head

    folder = tmp_path / "tiny"
    tiny_lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_head({"weight": torch.linspace(-1, 1, 384), "bias": torch.tensor([0.5])}, tmp_path / "head.safetensors")
    P = SimpleNamespace(model=Model(name=str(folder), dtype="float32", device="cpu", cache_dir=str(tmp_path / "cache"),
                                    threads=1, max_rows=3, device_map=None),
                        generation=Generation(max_new_tokens=4, decode="greedy", temperature=1.0, top_k=0, top_p=1.0),
                        reward=Reward(kind="embedded", name=None, dtype="float32"), reward_head_path=tmp_path / "head.safetensors")
    sampler, seconds, reward, judges, encoder = build_models(P)
    assert seconds > 0 and (sampler.max_new_tokens, sampler.decode, sampler.max_rows) == (4, "greedy", 3)
    assert reward.encoder is encoder and judges["relevance"].encoder is encoder
    texts = ["What a lovely day, thank you!"]
    alone, _, _ = build_scorers(P.reward, P.reward_head_path)
    assert torch.equal(reward.score(texts, texts), alone.score(texts, texts))


def test_one_response_lines_read_the_summary():
    details, _ = one_response_summary(summary_records(), ["a"], seed=0)
    first, second = one_response_lines("ARGS-greedy", details)
    lo, hi = details["reward_ci"]
    assert first.startswith(f"ARGS-greedy: mean reward {details['reward']:+.3f} [{lo:+.3f}, {hi:+.3f}] over 12 prompts; ")
    assert f"ARGS-greedy - greedy {details['vs_greedy']['mean']:+.3f}" in first
    kl = details["kl_sequence"]
    assert second.startswith("judges: {'a': ") and second.endswith(f"KL to the base model {kl['mean']:.2f} [{kl['lo']:.2f}, {kl['hi']:.2f}] nats")
