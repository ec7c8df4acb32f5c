"""Non-adaptive sampler arms (prelogit.samplers) on the tiny random Llama with a toy text reward."""

import pytest
import torch

from prelogit.engine import prompt_generator, run_best_of_n_many
from prelogit.checks import ParameterError
from prelogit.samplers import SamplerArm, budgets_up_to, candidate_arms, pair_generator, run_arm_many, run_pairs
from prelogit.sampling import PrelogitSampler
from toy_rewards import VowelShare

MANY = ["Hi!", "What did you cook for dinner yesterday evening?", "I lost my keys again.", "Good morning to you."]


def _results(rec):
    """A record without its cost counters (timing, and forward passes that depend on the batching)."""
    return {k: v for k, v in rec.items() if k != "cost"}


@pytest.fixture()
def s64(tiny_lm64, tokenizer):
    return PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=5, max_rows=5)


def test_candidate_arms_labels_are_unique_and_stable():
    arms = candidate_arms([0.5, 0.7, 1.0], [0.9, 1.0], [0.125, 0.25], tau=4)
    labels = [a.label for a in arms]
    assert len(arms) == 3 * 2 + 2 and len(set(labels)) == len(labels)
    assert labels[:2] == ["T=0.5,top_p=0.9", "T=0.5,top_p=1"]
    assert labels[-2:] == ["greedy|V,sigma=0.125rms", "greedy|V,sigma=0.25rms"]
    assert all(SamplerArm.from_dict(a.as_dict()) == a for a in arms)
    assert len(candidate_arms([1.0, 1.0], [1.0], [], tau=4)) == 1  # repeats dropped


@pytest.mark.parametrize("kwargs, key", [({"kind": "beam"}, "kind"), ({"temperature": 0.0}, "temperature"),
                                         ({"top_p": 1.5}, "top_p"), ({"kind": "noisy_greedy", "tau": 2}, "sigma_rms"),
                                         ({"kind": "noisy_greedy", "sigma_rms": 0.5, "tau": 0}, "tau")])
def test_bad_arm_names_the_field(kwargs, key):
    with pytest.raises(ParameterError, match=key):
        SamplerArm(**kwargs)


def test_callers_sampler_is_untouched(s64):
    before = (s64.decode, s64.temperature, s64.top_p, s64.top_k, s64.max_new_tokens)
    arm = SamplerArm("temperature", temperature=0.5, top_p=0.8)
    recs = run_arm_many(s64, VowelShare(), MANY[:2], MANY[:2], arm, 3, [prompt_generator(0, p) for p in MANY[:2]], 1.0)
    assert (s64.decode, s64.temperature, s64.top_p, s64.top_k, s64.max_new_tokens) == before
    assert [r["arm"] for r in recs] == [arm.label] * 2 and all(r["method"] == "sampler" for r in recs)


def test_temperature_one_equals_best_of_n(s64):
    gens = lambda: [prompt_generator(1, p) for p in MANY]
    bon = run_best_of_n_many(s64, VowelShare(), MANY, MANY, 6, gens(), batch_size=4)
    arm = run_arm_many(s64, VowelShare(), MANY, MANY, SamplerArm("temperature", 1.0, 1.0), 6, gens(), 1.0, batch_size=4)
    for a, b in zip(arm, bon):
        assert a.pop("method") == "sampler" and a.pop("arm") == "T=1,top_p=1"
        assert {k: v for k, v in a.items() if k not in ("method", "cost")} == \
               {k: v for k, v in b.items() if k not in ("method", "cost")}
        assert {k: v for k, v in a["cost"].items() if not k.startswith("time_")} == \
               {k: v for k, v in b["cost"].items() if not k.startswith("time_")}


@pytest.mark.parametrize("arm", [SamplerArm("temperature", 0.7, 0.9), SamplerArm("noisy_greedy", sigma_rms=0.5, tau=3)])
def test_a_prompts_record_does_not_depend_on_its_batch_mates(s64, arm):
    alone = {p: run_arm_many(s64, VowelShare(), [p], [p], arm, 6, [prompt_generator(2, p)], 0.8)[0] for p in MANY}
    for order, batch_size in [([0, 1, 2, 3], None), ([3, 1, 0, 2], 4)]:
        ps = [MANY[i] for i in order]
        recs = run_arm_many(s64, VowelShare(), ps, ps, arm, 6, [prompt_generator(2, p) for p in ps], 0.8, batch_size)
        for p, rec in zip(ps, recs):
            assert _results(rec) == _results(alone[p]), (order, batch_size, p)
            assert rec["cost"]["reward_calls"] == 6 and rec["cost"]["new_tokens"] == sum(rec["lengths"])


def test_noisy_greedy_with_tiny_sigma_is_greedy(s64):
    arm = SamplerArm("noisy_greedy", sigma_rms=1e-9, tau=5)
    recs = run_arm_many(s64, VowelShare(), MANY, MANY, arm, 3, [prompt_generator(0, p) for p in MANY], 1.0)
    greedy = s64.generate_many(MANY, [3] * len(MANY), decode="greedy")
    for rec, g in zip(recs, greedy):
        assert rec["responses"] == g.texts and rec["lengths"] == g.lengths.tolist()
    # a real sigma moves the greedy decoding
    noisy = run_arm_many(s64, VowelShare(), MANY, MANY, SamplerArm("noisy_greedy", sigma_rms=5.0, tau=5), 3,
                         [prompt_generator(0, p) for p in MANY], 1.0)
    assert any(r["responses"] != g.texts for r, g in zip(noisy, greedy))


def test_noisy_greedy_rejects_tau_beyond_max_new_tokens(s64):
    with pytest.raises(ParameterError, match="tau = 9 exceeds the sampler's max_new_tokens = 5"):
        run_arm_many(s64, VowelShare(), MANY[:1], MANY[:1], SamplerArm("noisy_greedy", sigma_rms=0.5, tau=9), 2,
                     [prompt_generator(0, 0)], 1.0)


def test_run_pairs_keeps_the_order_and_each_pairs_record(s64):
    arms = candidate_arms([0.7], [1.0], [0.5], tau=2)
    rows = {f"p{i}": {"prompt": p, "text": p} for i, p in enumerate(MANY)}
    pairs = [(1, "p2"), (0, "p0"), (1, "p0"), (0, "p3")]
    recs = run_pairs(s64, VowelShare(), arms, rows, pairs, 3, 4, 0.9)
    assert [r["arm"] for r in recs] == [arms[i].label for i, _ in pairs]
    alone = run_pairs(s64, VowelShare(), arms, rows, [(1, "p0")], 3, 4, 0.9)[0]
    assert _results(recs[2]) == _results(alone)
    # the arms' generators on one prompt differ (no shared draws by accident)
    draw = lambda arm: torch.rand(4, generator=pair_generator(3, arm, "p0")).tolist()
    assert draw(arms[0]) != draw(arms[1])

def test_budgets_up_to():
    assert budgets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert budgets_up_to(1) == [1] and budgets_up_to(12) == [1, 2, 4, 8, 12]
