"""AISP and best-of-N drivers on a tiny model with a simple, real text reward."""

import dataclasses
import math

import pytest
import torch

from prelogit.aisp import AISPConfig, frozen_twin, run_aisp
from prelogit.engine import prompt_generator, run_best_of_n
from prelogit.checks import ParameterError
from prelogit.rewards import RewardError
from prelogit.sampling import PrelogitSampler
from toy_rewards import VowelShare


class Broken:
    name = "broken"

    def __init__(self, kind):
        self.kind = kind

    def score(self, prompts, responses):
        if self.kind == "nan":
            return torch.full((len(responses),), float("nan"))
        return torch.zeros(len(responses) + 1)


@pytest.fixture()
def sampler(tiny_lm, tokenizer):
    return PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6)


PROMPT = "Hello there, how are you?"


@pytest.mark.parametrize("field, value", [("sigma", 0.0), ("lam", -1.0), ("alpha", 1.5), ("alpha_mode", "newton"),
                                          ("n", 0), ("K", 0), ("tau", -1), ("B", 0), ("lam_mode", "relative")])
def test_config_rejects_bad_values_naming_the_parameter(field, value):
    with pytest.raises(ParameterError, match=field):
        AISPConfig(**{field: value})


def test_aisp_record_is_consistent(sampler):
    cfg = AISPConfig(sigma=0.5, lam=0.05, n=4, K=3, tau=3)
    rec = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(0, 0))
    assert rec["samples_used"] == 12 and len(rec["iterations"]) == 3
    bests = [it["best_so_far"]["reward"] for it in rec["iterations"]]
    assert bests == sorted(bests) and rec["best"]["reward"] == bests[-1]
    all_rewards = [r for it in rec["iterations"] for r in it["rewards"][0]]
    assert rec["best"]["reward"] == max(all_rewards)
    for it in rec["iterations"]:
        w = torch.tensor(it["weights"][0])
        assert w.shape == (4,) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-5)
        assert 1 - 1e-9 <= it["ess"][0] <= 4 + 1e-9
        assert math.isclose(it["kl_control"][0], it["U_norm"][0] ** 2 / (2 * 0.5**2), rel_tol=1e-4)
    assert rec["cost"]["generations"] == 12 + 1 and rec["cost"]["reward_calls"] == 13  # + final rollout
    assert len(rec["final_rollout"]["responses"]) == 1


def test_aisp_is_deterministic_for_a_seed(sampler):
    cfg = AISPConfig(n=3, K=2, tau=2)
    a = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(5, 1))
    b = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(5, 1))
    c = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(6, 1))
    assert a["iterations"] == b["iterations"] and a["iterations"] != c["iterations"]


def test_frozen_twin_keeps_U_at_zero_and_shares_the_first_iteration(sampler):
    """The twin draws the same noise in the same order with U held at 0: its first iteration is AISP's
    own, every ||U|| is 0, and its later draws are those of U = 0 (so AISP - twin is the adaptation)."""
    cfg = AISPConfig(sigma=0.5, lam=0.05, alpha=0.5, alpha_mode="mppi", n=4, K=3, tau=3)
    twin = frozen_twin(cfg)
    assert (twin.sigma, twin.n, twin.K, twin.tau, twin.lam) == (cfg.sigma, cfg.n, cfg.K, cfg.tau, cfg.lam)
    a = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(0, 0))
    f = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, twin, prompt_generator(0, 0))
    assert f["iterations"][0]["responses"] == a["iterations"][0]["responses"]
    assert all(u == 0.0 for it in f["iterations"] for u in it["U_norm"])
    assert all(s == 0.0 for it in f["iterations"] for s in it["sd_lr_term"])
    assert any(u > 0 for it in a["iterations"] for u in it["U_norm"])  # AISP itself moves
    assert f["final_rollout"] is None


def test_one_iteration_without_control_is_best_of_n_on_the_same_samples(sampler):
    """K = 1 and tau = 0: AISP draws the very samples best-of-N draws and picks the same answer."""
    cfg = AISPConfig(n=5, K=1, tau=0, final_rollout=False)
    a = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(3, 0))
    b = run_best_of_n(sampler, VowelShare(), PROMPT, PROMPT, 5, prompt_generator(3, 0))
    assert a["iterations"][0]["responses"] == b["responses"]
    assert a["best"]["response"] == b["best"]["response"] and a["best"]["reward"] == b["best"]["reward"]


def test_small_lambda_moves_the_mean_onto_the_best_sample(sampler):
    """lam -> 0 under exact weights: U becomes the control input of the best sample (mppi, alpha = 0)."""
    cfg = AISPConfig(sigma=0.3, lam=1e-6, n=4, K=1, tau=2, final_rollout=False)
    rec = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(2, 0))
    w = torch.tensor(rec["iterations"][0]["weights"][0])
    r = torch.tensor(rec["iterations"][0]["rewards"][0])
    assert (r == r.max()).sum() == 1, "this seed must give a unique best sample"
    assert float(w.max()) > 0.999 and int(w.argmax()) == int(r.argmax())


def test_batched_chains(sampler):
    cfg = AISPConfig(n=2, K=2, tau=2, B=3)
    rec = run_aisp(sampler, VowelShare(), PROMPT, PROMPT, cfg, prompt_generator(0, 0))
    assert rec["samples_used"] == 12
    it = rec["iterations"][0]
    assert len(it["rewards"]) == 3 and len(it["weights"]) == 3 and len(it["responses"]) == 6
    assert len(rec["final_rollout"]["responses"]) == 3 and len(rec["kl_control_final"]) == 3
    assert rec["iterations"][-1]["samples_so_far"] == 12


@pytest.mark.parametrize("kind, match", [("nan", "NaN"), ("shape", "shape")])
def test_bad_rewards_stop_the_run(sampler, kind, match):
    with pytest.raises(RewardError, match=match):
        run_aisp(sampler, Broken(kind), PROMPT, PROMPT, AISPConfig(n=2, K=1, tau=1), prompt_generator(0, 0))
    with pytest.raises(RewardError, match=match):
        run_best_of_n(sampler, Broken(kind), PROMPT, PROMPT, 2, prompt_generator(0, 0))


def test_best_of_n_batches_give_the_same_accounting(sampler):
    rec = run_best_of_n(sampler, VowelShare(), PROMPT, PROMPT, 6, prompt_generator(0, 0), batch_size=4)
    assert len(rec["rewards"]) == 6 and rec["cost"]["generations"] == 6 and rec["cost"]["reward_calls"] == 6
    assert rec["best"]["reward"] == max(rec["rewards"])


# ---- many prompts in lockstep -------------------------------------------------------------------

MANY = ["Hi!", "What did you cook for dinner yesterday evening?", "I lost my keys again.", "Good morning to you."]


def _results(rec):
    """A record without its cost counters (timing, and forward passes that depend on the batching)."""
    return {k: v for k, v in rec.items() if k != "cost"}


def test_aisp_many_equals_each_prompt_alone(tiny_lm64, tokenizer):
    """Lockstep AISP over several prompts gives each prompt exactly its one-prompt record
    (float64 model and an exact text reward: no rounding can differ), also reordered and with
    micro-batches that split a prompt's rows."""
    from prelogit.aisp import run_aisp_many

    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=5)
    cfg = AISPConfig(sigma=0.5, lam=0.05, n=3, K=2, tau=2, B=2)
    keys = [f"p{i}" for i in range(len(MANY))]
    alone = [run_aisp(s, VowelShare(), p, p, cfg, prompt_generator(4, k)) for p, k in zip(MANY, keys)]
    for max_rows, order in [(1000, [0, 1, 2, 3]), (4, [2, 3, 0, 1])]:
        s.max_rows = max_rows
        recs = run_aisp_many(s, VowelShare(), [MANY[i] for i in order], [MANY[i] for i in order], cfg,
                             [prompt_generator(4, keys[i]) for i in order])
        for rec, i in zip(recs, order):
            assert _results(rec) == _results(alone[i]), (max_rows, order, i)
            assert rec["cost"]["generations"] == alone[i]["cost"]["generations"] == 2 * 3 * 2 + 2


def test_best_of_n_many_equals_each_prompt_alone(tiny_lm64, tokenizer):
    from prelogit.engine import run_best_of_n_many

    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=5, max_rows=5)
    alone = [run_best_of_n(s, VowelShare(), p, p, 6, prompt_generator(1, p)) for p in MANY]
    recs = run_best_of_n_many(s, VowelShare(), MANY, MANY, 6, [prompt_generator(1, p) for p in MANY])
    for a, b in zip(alone, recs):
        assert _results(a) == _results(b)
        assert b["cost"]["reward_calls"] == 6 and b["cost"]["new_tokens"] == sum(b["lengths"])


def test_prompt_generator_depends_on_seed_and_key_only():
    draw = lambda seed, key: torch.rand(3, generator=prompt_generator(seed, key)).tolist()
    assert draw(0, "test-001") == draw(0, "test-001")
    assert draw(0, "test-001") != draw(0, "test-002") and draw(0, "test-001") != draw(1, "test-001")


# ---- one configuration per prompt ---------------------------------------------------------------

def test_aisp_many_with_per_prompt_configs_equals_each_prompt_alone(tiny_lm64, tokenizer):
    """A list of configs (different sigma, lam, lam_mode, alpha, alpha_mode and tau; shared n, K, B):
    each prompt's record equals the one it gets alone with its own config, tau = 0 included."""
    from prelogit.aisp import run_aisp_many

    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=5, max_rows=5)
    base = dict(n=3, K=2, B=2, final_rollout=True)
    cfgs = [AISPConfig(sigma=0.5, lam=0.05, tau=2, **base),
            AISPConfig(sigma=1.5, lam=0.5, lam_mode="std", alpha=0.7, alpha_mode="step", tau=4, **base),
            AISPConfig(sigma=0.2, lam=1e-3, alpha=0.3, alpha_mode="mppi", tau=0, **base),
            AISPConfig(sigma=0.9, lam=2.0, lam_mode="std", tau=1, **base)]
    prompts = [MANY[0], MANY[1], MANY[0], MANY[3]]  # a prompt may appear twice, under two arms
    keys = ["a", "b", "a", "d"]
    recs = run_aisp_many(s, VowelShare(), prompts, prompts, cfgs, [prompt_generator(9, k) for k in keys])
    for rec, p, k, c in zip(recs, prompts, keys, cfgs):
        alone = run_aisp(s, VowelShare(), p, p, c, prompt_generator(9, k))
        assert rec["config"] == alone["config"] == dataclasses.asdict(c)
        assert _results(rec) == _results(alone), c
        for it, it_alone in zip(rec["iterations"], alone["iterations"]):
            assert it["rewards"] == it_alone["rewards"] and it["responses"] == it_alone["responses"]
            assert it["weights"] == it_alone["weights"]
        assert rec["best"] == alone["best"]
    # same prompt and generator key, different configs: the configs matter
    assert recs[0]["iterations"] != recs[2]["iterations"]


def test_aisp_many_single_config_equals_a_list_of_copies(tiny_lm64, tokenizer):
    from prelogit.aisp import run_aisp_many

    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=4)
    cfg = AISPConfig(sigma=0.5, lam=0.1, n=2, K=2, tau=2)
    one = run_aisp_many(s, VowelShare(), MANY[:2], MANY[:2], cfg, [prompt_generator(1, i) for i in range(2)])
    many = run_aisp_many(s, VowelShare(), MANY[:2], MANY[:2], [cfg, cfg], [prompt_generator(1, i) for i in range(2)])
    assert [_results(r) for r in one] == [_results(r) for r in many]


@pytest.mark.parametrize("field, value", [("n", 4), ("K", 3), ("B", 2), ("final_rollout", False)])
def test_aisp_many_configs_must_share_n_K_B_and_final_rollout(sampler, field, value):
    from prelogit.aisp import run_aisp_many

    base = AISPConfig(n=2, K=1, tau=1)
    other = dataclasses.replace(base, **{field: value})
    with pytest.raises(ParameterError, match=field):
        run_aisp_many(sampler, VowelShare(), MANY[:2], MANY[:2], [base, other],
                      [prompt_generator(0, i) for i in range(2)])


def test_aisp_many_needs_one_config_per_prompt(sampler):
    from prelogit.aisp import run_aisp_many

    cfg = AISPConfig(n=2, K=1, tau=1)
    with pytest.raises(ParameterError, match="one config per prompt: 2 prompts, 3 configs"):
        run_aisp_many(sampler, VowelShare(), MANY[:2], MANY[:2], [cfg] * 3, [prompt_generator(0, i) for i in range(2)])
    with pytest.raises(ParameterError, match="cfg"):
        run_aisp_many(sampler, VowelShare(), MANY[:2], MANY[:2], {"n": 2}, [prompt_generator(0, i) for i in range(2)])
