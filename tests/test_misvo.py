"""MISVO (per-position pre-logit steering by Fisher-regularised stochastic gradient ascent)."""

import itertools
import math

import pytest
import torch

from prelogit.engine import prompt_generator, run_best_of_n
from prelogit.checks import ParameterError
from prelogit.misvo import (MISVOConfig, fisher_vector_product, loo_advantages, run_misvo, run_misvo_many,
                            score_gradient, sequence_kl)
from prelogit.sampling import PrelogitSampler
from toy_rewards import VowelShare as Vowels

F64 = torch.float64


def _head(V=6, d=4, seed=0, scale=1.0, bias=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, d, generator=g, dtype=F64) * scale
    b = torch.randn(V, generator=g, dtype=F64) if bias else None
    return W, b, g


def _log_pi(W, b, Z, u, tokens, lengths, temperature):
    """log pi_u(y^i) per sample, (K,), by plain torch ops (for autograd)."""
    K, T, _ = Z.shape
    logits = (Z + u[:T]) @ W.T + (0 if b is None else b)
    logp = torch.log_softmax(logits / temperature, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)  # (K, T)
    mask = torch.arange(T)[None] < lengths[:, None]
    return (logp * mask).sum(-1)


# ---- config and advantages ---------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [("eta", 0.0), ("lam", -0.1), ("K", 1), ("steps", 0), ("fisher", "diag"),
                                          ("K", 2.5)])
def test_config_rejects_bad_values_naming_the_parameter(field, value):
    with pytest.raises(ParameterError, match=field):
        MISVOConfig(**{field: value})


def test_budget_is_K_times_steps():
    assert MISVOConfig(K=6, steps=5).budget == 30 and MISVOConfig().budget == 32


def test_loo_advantages_by_hand():
    A = loo_advantages(torch.tensor([1.0, 2.0, 6.0]))
    assert torch.allclose(A, torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5], dtype=F64), atol=0, rtol=0)
    r = torch.randn(7, generator=torch.Generator().manual_seed(1), dtype=F64)
    A = loo_advantages(r)
    # identity relied on: A_i = K/(K-1) (R_i - mean R), hence sum_i A_i = 0
    assert torch.allclose(A, 7 / 6 * (r - r.mean()), atol=1e-14)
    assert abs(float(A.sum())) < 1e-13
    with pytest.raises(ParameterError, match="K >= 2"):
        loo_advantages(torch.tensor([1.0]))


# ---- score-function gradient ---------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, bias", [(1.0, True), (0.7, False)])
def test_score_gradient_equals_autograd_of_weighted_log_likelihood(temperature, bias):
    K, T, V, d = 5, 4, 7, 3
    W, b, g = _head(V, d, seed=3, bias=bias)
    Z = torch.randn(K, T, d, generator=g, dtype=F64)
    u = torch.randn(T + 2, d, generator=g, dtype=F64) * 0.5  # longer than the samples: extra rows get 0
    tokens = torch.randint(0, V, (K, T), generator=g)
    lengths = torch.tensor([4, 1, 3, 4, 2])
    A = loo_advantages(torch.randn(K, generator=g, dtype=F64))
    got = score_gradient(W, b, Z, u, tokens, lengths, A, temperature)
    uu = u.clone().requires_grad_(True)
    (A * _log_pi(W, b, Z, uu, tokens, lengths, temperature)).sum().div(K).backward()
    assert got.shape == (T + 2, d)
    assert torch.allclose(got, uu.grad, atol=1e-13, rtol=1e-12), (got - uu.grad).abs().max()
    assert got[T:].abs().max() == 0
    # tokens after a sample's end do not matter
    tokens2 = tokens.clone()
    tokens2[1, 1:] = (tokens2[1, 1:] + 1) % V
    assert torch.equal(score_gradient(W, b, Z, u, tokens2, lengths, A, temperature), got)


def test_loo_estimator_is_unbiased_by_enumeration():
    """E over K i.i.d. responses of the LOO estimate = d E_{pi_u}[R] / du, exactly (all K-tuples enumerated)."""
    K, T, V, d = 2, 2, 3, 2
    W, b, g = _head(V, d, seed=5)
    z = torch.randn(T, d, generator=g, dtype=F64)  # prefix-independent pre-logits: pi_u(y) = prod_t p_t(y_t)
    u = torch.randn(T, d, generator=g, dtype=F64) * 0.3
    seqs = list(itertools.product(range(V), repeat=T))
    R = {y: float(torch.randn(1, generator=g)) for y in seqs}
    logp = torch.log_softmax((z + u) @ W.T + b, dim=-1)
    prob = {y: math.exp(sum(float(logp[t, y[t]]) for t in range(T))) for y in seqs}
    expected = torch.zeros(T, d, dtype=F64)
    for tup in itertools.product(seqs, repeat=K):
        tokens = torch.tensor(tup)
        A = loo_advantages(torch.tensor([R[y] for y in tup], dtype=F64))
        w = math.prod(prob[y] for y in tup)
        expected += w * score_gradient(W, b, z.expand(K, T, d), u, tokens, torch.full((K,), T), A)
    uu = u.clone().requires_grad_(True)
    lp = torch.log_softmax((z + uu) @ W.T + b, dim=-1)
    ER = sum(torch.exp(sum(lp[t, y[t]] for t in range(T))) * R[y] for y in seqs)
    ER.backward()
    assert torch.allclose(expected, uu.grad, atol=1e-13), (expected - uu.grad).abs().max()


# ---- Fisher -----------------------------------------------------------------------------------------------

def _explicit_fisher(W, b, z, temperature):
    p = torch.softmax((z @ W.T + b) / temperature, dim=-1)
    return W.T @ (torch.diag(p) - torch.outer(p, p)) @ W / temperature**2


@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_fisher_vector_product_equals_explicit_average(temperature):
    R, T, V, d = 4, 3, 6, 4
    W, b, g = _head(V, d, seed=7)
    Z = torch.randn(R, T, d, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    u = torch.randn(T + 1, d, generator=g, dtype=F64)  # position T: no reference row reached it
    got = fisher_vector_product(W, b, Z, mask, u, temperature)
    assert got.shape == (T + 1, d)
    pooled = []
    for t in range(T):
        Fs = [_explicit_fisher(W, b, Z[r, t], temperature) for r in range(R) if mask[r, t]]
        pooled += Fs
        assert torch.allclose(got[t], sum(Fs) / len(Fs) @ u[t], atol=1e-13), t
    assert torch.allclose(got[T], sum(pooled) / len(pooled) @ u[T], atol=1e-13)
    # it is the Fisher information: E_p[s s^T] u with the score s = W^T (e_y - p) / tau
    p = torch.softmax((Z[1, 0] @ W.T + b) / temperature, dim=-1)
    S = (torch.eye(V, dtype=F64) - p) @ W / temperature  # (V, d): score of each token
    F = (S.T * p) @ S
    one = fisher_vector_product(W, b, Z[1:2, :1], torch.ones(1, 1, dtype=torch.bool), u[:1], temperature)
    assert torch.allclose(one[0], F @ u[0], atol=1e-13)


# ---- sequence KL ---------------------------------------------------------------------------------------

def test_sequence_kl_is_zero_at_zero_positive_otherwise_and_matches_direct():
    K, T, V, d = 3, 4, 5, 3
    W, b, g = _head(V, d, seed=11)
    Z = torch.randn(K, T, d, generator=g, dtype=F64)
    lengths = torch.tensor([4, 2, 1])
    assert torch.equal(sequence_kl(W, b, Z, torch.zeros(T, d, dtype=F64), lengths), torch.zeros(K, dtype=F64))
    u = torch.randn(T, d, generator=g, dtype=F64)
    for temperature in (1.0, 1.5):
        got = sequence_kl(W, b, Z, u, lengths, temperature)
        assert got.shape == (K,) and bool((got > 0).all())
        for i in range(K):
            direct = 0.0
            for t in range(int(lengths[i])):
                p = torch.softmax(((Z[i, t] + u[t]) @ W.T + b) / temperature, dim=-1)
                q = torch.softmax((Z[i, t] @ W.T + b) / temperature, dim=-1)
                direct += float((p * (p / q).log()).sum())
            assert math.isclose(float(got[i]), direct, rel_tol=1e-12), (i, temperature)
    # positions after a sample's end do not count
    Z2 = Z.clone()
    Z2[2, 1:] += 10.0
    assert torch.equal(sequence_kl(W, b, Z2, u, lengths), sequence_kl(W, b, Z, u, lengths))


# ---- the iteration on a toy policy ---------------------------------------------------------------------

def _toy_run(lam, fisher="reference", steps=40, K=8, eta=0.5, seed=0):
    """MISVO's update with the library's pieces on a prefix-independent toy policy (V = 5, T = 2).

    Reward = number of positions where token 0 was drawn. Returns (u, p_0 at each position)."""
    T, V, d = 2, 5, 3
    W, b, g = _head(V, d, seed=13, scale=0.7)
    z = torch.randn(T, d, generator=g, dtype=F64)
    Z = z.expand(K, T, d)
    lengths = torch.full((K,), T)
    rng = torch.Generator().manual_seed(seed)
    u = torch.zeros(T, d, dtype=F64)
    ref = None
    for k in range(steps):
        p = torch.softmax((z + u) @ W.T + b, dim=-1)  # (T, V)
        tokens = torch.stack([torch.multinomial(p[t], K, replacement=True, generator=rng) for t in range(T)], 1)
        if k == 0:
            ref = (Z, torch.ones(K, T, dtype=torch.bool))
        A = loo_advantages((tokens == 0).sum(1).to(F64))
        grad = score_gradient(W, b, Z, u, tokens, lengths, A)
        Fu = u if fisher == "identity" else fisher_vector_product(W, b, *ref, u)
        u = u + eta * (grad - lam * Fu)
    p0 = torch.softmax(z @ W.T + b, dim=-1)[:, 0]
    return u, torch.softmax((z + u) @ W.T + b, dim=-1)[:, 0], p0


def test_unregularised_steering_raises_the_rewarded_token():
    u, p, p0 = _toy_run(lam=0.0)
    assert bool((p > p0 + 0.2).all()), (p0, p)


@pytest.mark.parametrize("fisher", ["reference", "identity"])
def test_large_lambda_keeps_u_near_zero(fisher):
    W, b, _ = _head(5, 3, seed=13, scale=0.7)
    lam, eta = 1.5 / (0.5 * float(torch.linalg.matrix_norm(W, 2)) ** 2), 0.5  # eta * lam * ||F|| <= 0.75 < 1
    if fisher == "identity":
        lam = 1.5
    free, _, _ = _toy_run(lam=0.0)
    reg, p, p0 = _toy_run(lam=lam * 20, eta=eta / 20, fisher=fisher, steps=200)  # same stability margin
    assert float(reg.norm()) < 0.2 * float(free.norm()), (reg.norm(), free.norm())
    assert bool(torch.isfinite(reg).all())


# ---- the driver on the tiny model ---------------------------------------------------------------------

MANY = ["Hi!", "What did you cook for dinner yesterday evening?", "I lost my keys again.", "Good morning to you."]
PROMPT = MANY[1]


def _results(rec):
    return {k: v for k, v in rec.items() if k != "cost"}


@pytest.fixture()
def sampler(tiny_lm64, tokenizer):
    return PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=5)


def test_record_is_consistent(sampler):
    cfg = MISVOConfig(eta=50.0, lam=1.0, K=3, steps=3)
    rec = run_misvo(sampler, Vowels(), PROMPT, PROMPT, cfg, prompt_generator(0, 0))
    assert rec["method"] == "misvo" and rec["samples_used"] == 9 == cfg.budget and len(rec["iterations"]) == 3
    its = rec["iterations"]
    assert [it["samples_so_far"] for it in its] == [3, 6, 9]
    bests = [it["best_so_far"]["reward"] for it in its]
    assert bests == sorted(bests) and rec["best"]["reward"] == bests[-1]
    assert rec["best"]["reward"] == max(r for it in its for r in it["rewards"])
    assert rec["best"]["response"] == its[rec["best"]["step"] - 1]["responses"][rec["best"]["index"]]
    assert its[0]["u_norm"] == 0 and its[0]["kl_sequence"] == [0.0] * 3
    for a, b in zip(its, its[1:]):
        assert b["u_norm"] == a["u_norm_next"]
    assert its[1]["u_norm"] > 0 and all(x > 0 for x in its[1]["kl_sequence"])
    assert math.isclose(its[1]["kl_sequence_mean"], sum(its[1]["kl_sequence"]) / 3, rel_tol=1e-12)
    # the final rollout (one response from the final u) is logged and costed apart from the K * N budget
    fin = rec["final_rollout"]
    assert len(fin["responses"]) == len(fin["rewards"]) == len(fin["kl_sequence"]) == 1 and fin["kl_sequence"][0] > 0
    assert fin["u_norm"] == its[-1]["u_norm_next"]
    assert rec["cost"]["generations"] == 10 and rec["cost"]["reward_calls"] == 10 and rec["cost"]["reward_batches"] == 4
    off = run_misvo(sampler, Vowels(), PROMPT, PROMPT, MISVOConfig(eta=50.0, lam=1.0, K=3, steps=3, final_rollout=False),
                    prompt_generator(0, 0))
    assert off["final_rollout"] is None and off["iterations"] == its and off["cost"]["generations"] == 9


def test_first_step_is_best_of_K_and_its_update_is_eta_times_the_gradient(sampler):
    """Step 1 draws exactly best-of-K's samples (u = 0); u after it is eta * g (F u = 0 at u = 0)."""
    cfg = MISVOConfig(eta=0.3, lam=1.0, K=4, steps=1)
    rec = run_misvo(sampler, Vowels(), PROMPT, PROMPT, cfg, prompt_generator(2, "x"))
    bon = run_best_of_n(sampler, Vowels(), PROMPT, PROMPT, 4, prompt_generator(2, "x"))
    it = rec["iterations"][0]
    assert it["responses"] == bon["responses"] and it["rewards"] == bon["rewards"]
    gen = sampler.generate(PROMPT, 4, generator=prompt_generator(2, "x"), record_prelogits=True)
    W = sampler.head.weight.detach().double()
    A = loo_advantages(torch.tensor(bon["rewards"]))
    g = score_gradient(W, None, gen.prelogits, torch.zeros(5, sampler.d, dtype=F64), gen.tokens, gen.lengths, A)
    assert float(g.norm()) > 0
    assert math.isclose(it["grad_norm"], float(g.norm()), rel_tol=1e-9)
    assert math.isclose(it["u_norm_next"], 0.3 * float(g.norm()), rel_tol=1e-9)


def test_many_equals_each_prompt_alone(sampler):
    """Lockstep over several prompts gives each prompt its one-prompt record (float64 model), also
    reordered and with micro-batches that split a prompt's rows."""
    cfg = MISVOConfig(eta=50.0, lam=1.0, K=3, steps=3)
    keys = [f"p{i}" for i in range(len(MANY))]
    alone = [run_misvo(sampler, Vowels(), p, p, cfg, prompt_generator(4, k)) for p, k in zip(MANY, keys)]
    assert alone[0]["iterations"] != alone[1]["iterations"]
    for max_rows, order in [(1000, [0, 1, 2, 3]), (2, [2, 3, 0, 1])]:
        sampler.max_rows = max_rows
        recs = run_misvo_many(sampler, Vowels(), [MANY[i] for i in order], [MANY[i] for i in order], cfg,
                              [prompt_generator(4, keys[i]) for i in order])
        for rec, i in zip(recs, order):
            assert _results(rec) == _results(alone[i]), (max_rows, order, i)
            assert rec["cost"]["generations"] == 10


def test_per_prompt_configs_and_ablations(sampler):
    base = dict(eta=50.0, K=3, steps=2)
    cfgs = [MISVOConfig(lam=1.0, **base), MISVOConfig(lam=0.0, **base), MISVOConfig(lam=1.0, fisher="identity", **base)]
    recs = run_misvo_many(sampler, Vowels(), [PROMPT] * 3, [PROMPT] * 3, cfgs,
                          [prompt_generator(1, "a") for _ in range(3)])
    for rec, c in zip(recs, cfgs):
        assert _results(rec) == _results(run_misvo(sampler, Vowels(), PROMPT, PROMPT, c, prompt_generator(1, "a")))
    # same draws at step 1, different updates: the identity penalty shrinks u by eta * lam * u = 0 at u = 0,
    # so step-1 u_norm_next agrees for all three, and the step-2 updates differ
    first = [r["iterations"][0] for r in recs]
    assert first[0]["responses"] == first[1]["responses"] == first[2]["responses"]
    assert first[0]["u_norm_next"] == first[1]["u_norm_next"] == first[2]["u_norm_next"]
    nxt = [r["iterations"][1]["u_norm_next"] for r in recs]
    assert len(set(nxt)) == 3
    with pytest.raises(ParameterError, match="must share K"):
        run_misvo_many(sampler, Vowels(), [PROMPT] * 2, [PROMPT] * 2, [cfgs[0], MISVOConfig(K=4, steps=2)],
                       [prompt_generator(1, i) for i in range(2)])


@pytest.mark.parametrize("kwargs, decode, match", [({"top_k": 50}, None, "top_k"), ({"top_p": 0.9}, None, "top_p"),
                                                    ({"decode": "greedy"}, None, "decode"), ({}, "greedy", "decode")])
def test_truncated_or_greedy_decoding_is_refused(tiny_lm64, tokenizer, kwargs, decode, match):
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=3, **kwargs)
    with pytest.raises(ParameterError, match=match):
        run_misvo(s, Vowels(), PROMPT, PROMPT, MISVOConfig(K=2, steps=1), prompt_generator(0, 0), decode=decode)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_driver_follows_the_update_rule(tiny_lm64, tokenizer, temperature):
    """An independent replay of the loop (one prompt, plain ``generate`` calls on the same generator, the
    tested pure functions): same draws, same u after every step, Fisher frozen at the first step's rollouts,
    the sampler's temperature in the score function, the Fisher and the KL."""
    sampler = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=5, temperature=temperature)
    eta, lam, K, N, T = 40.0, 10.0 * temperature**2, 3, 3, sampler.max_new_tokens
    rec = run_misvo(sampler, Vowels(), PROMPT, PROMPT, MISVOConfig(eta=eta, lam=lam, K=K, steps=N), prompt_generator(8, 0))
    W = sampler.head.weight.detach().double()
    gen = prompt_generator(8, 0)
    u = torch.zeros(T, sampler.d, dtype=F64)
    ref, penalty = None, []
    for it in rec["iterations"]:
        applied = u.float()
        g = sampler.generate(PROMPT, K, control=applied[None].expand(K, T, sampler.d), generator=gen,
                             record_prelogits=True)
        r = Vowels().score([PROMPT] * K, g.texts)
        assert it["responses"] == g.texts and it["rewards"] == r.tolist()
        if ref is None:
            ref = (g.prelogits, torch.arange(g.tokens.shape[1])[None] < g.lengths[:, None])
        assert it["kl_sequence"] == sequence_kl(W, None, g.prelogits, applied.double(), g.lengths, temperature).tolist()
        A = loo_advantages(r)
        grad = score_gradient(W, None, g.prelogits, applied.double(), g.tokens, g.lengths, A, temperature)
        Fu = fisher_vector_product(W, None, *ref, u, temperature)
        penalty.append(float((eta * lam * Fu).norm()) / max(float(u.norm()), 1e-30))
        u = u + eta * (grad - lam * Fu)
        assert math.isclose(it["u_norm_next"], float(u.norm()), rel_tol=1e-12), it["k"]
    # the Fisher term is material here (and stable: eta * lam * ||F|| < 1), so the test sees its sign and its data
    assert 0.05 < max(penalty[1:]) < 1, penalty
