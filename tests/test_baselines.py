"""The ARGS and RE-Control baselines on the tiny random Llama (and once each on the real SmolLM2)."""

from __future__ import annotations

import time

import pytest
import torch

from prelogit.args import args_generate
from prelogit.checks import ParameterError
from prelogit.recontrol import (ValueMLP, collect_training_data, load_value, recontrol_generate, save_value,
                                train_value, value_ascent, value_loss)
from prelogit.sampling import PrelogitSampler

USER_TURNS = ["Hi! How was your weekend?", "What do you like to cook?", "Any plans for the summer?",
              "Do you have a favourite book?"]


class LetterCount:
    """Reward: how often ``letter`` occurs in the response (case-insensitive); counts texts scored."""

    def __init__(self, letter: str = "e"):
        self.letter = letter
        self.name = f"count-{letter}"
        self.texts_scored = 0
        self.calls = 0

    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        assert len(prompts) == len(responses)
        self.texts_scored += len(responses)
        self.calls += 1
        return torch.tensor([float(r.lower().count(self.letter)) for r in responses])


def chat(tokenizer, user: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)


def greedy_tokens(model, tokenizer, prompt: str, T: int) -> list[int]:
    g = PrelogitSampler(model, tokenizer, max_new_tokens=T).generate(prompt, 1, decode="greedy")
    return g.tokens[0, : g.lengths[0]].tolist()


def same_greedy_or_tie(model, tokenizer, prompt: str, got: list[int], want: list[int], atol: float = 1e-5) -> bool:
    """True when two greedy decodings of ``prompt`` agree token for token.

    They come from different code paths (ARGS' own cache loop, a float32 round trip of the
    pre-logit, the sampler's batched prefill), which round differently in float32, so an argmax
    may flip where the two best logits tie to within rounding. Then this checks that the first
    differing tokens are such a tie and returns False (what follows cannot be compared). atol:
    logits of the tiny model are O(0.1-1) and each path's float32 error is about
    sqrt(d) eps |W_j| |z| < 1e-6 (d = 32), so 1e-5 admits rounding and nothing else.
    """
    if got == want:
        return True
    i = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), None)
    assert i is not None, (got, want)  # a strict prefix is no rounding flip
    ids = PrelogitSampler(model, tokenizer).encode(prompt)
    with torch.no_grad():
        logits = model(torch.cat([ids[0], torch.tensor(want[:i], dtype=torch.long)])[None]).logits[0, -1].double()
    top = float(logits.max())
    assert top - float(logits[got[i]]) <= atol and top - float(logits[want[i]]) <= atol, (i, got, want)
    return False


def teacher_forced_logits(model, tokenizer, prompt: str, tokens: torch.Tensor) -> torch.Tensor:
    """(L, V) float64 logits that predicted each of the L response ``tokens``: one uncached forward pass of
    the base model over prompt + response (an independent path from the samplers' cached loops)."""
    ids = PrelogitSampler(model, tokenizer).encode(prompt)
    P, L = ids.shape[1], len(tokens)
    with torch.no_grad():
        logits = model(torch.cat([ids[0], tokens.to(ids.device)])[None]).logits[0, P - 1: P - 1 + L]
    return logits.double()


def base_nll(model, tokenizer, prompt: str, tokens: torch.Tensor) -> float:
    """-log pi_ref(y | x) of the response ``tokens`` under the base model at temperature 1."""
    logp = torch.log_softmax(teacher_forced_logits(model, tokenizer, prompt, tokens), -1)
    return -float(logp.gather(1, tokens.view(-1, 1)).sum())


# Tolerance of a KL recorded by the cached float32 loop against the uncached float64 replay above: the two
# paths round the tiny model's float32 logits differently by ~1e-7 (logits O(0.1-1), d = 32) and both
# normalise in float64, so each token's log-probability agrees to ~1e-7; 1e-5 covers 16 tokens with margin
# (measured: at most 4e-7 on KLs of 60-100).
KL_ATOL = 1e-5


# ---- ARGS -------------------------------------------------------------------------------------

def test_args_without_reward_weight_is_greedy_decoding(tiny_lm, tokenizer):
    prompt = chat(tokenizer, USER_TURNS[0])
    res = args_generate(tiny_lm, tokenizer, prompt, USER_TURNS[0], LetterCount(), k=5, w=0.0, max_new_tokens=12)
    g = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=12).generate(prompt, 1, decode="greedy")
    # w = 0: the chosen candidate is always the top logit, exactly (same values, first maximum).
    assert res.chosen.tolist() == [0] * len(res.tokens) and res.deviation_rate == 0.0
    if same_greedy_or_tie(tiny_lm, tokenizer, prompt, res.tokens.tolist(), g.tokens[0, : g.lengths[0]].tolist()):
        assert res.text == g.texts[0]
        assert res.forward_calls == g.forward_calls


def test_args_greedy_kl_is_the_base_models_nll(tiny_lm, tokenizer):
    """ARGS-greedy is a point mass: its KL against the base model is -log pi_ref(y | x), with w = 0 (plain
    greedy decoding) and with a reward weight that moves the choice."""
    user = USER_TURNS[1]
    prompt = chat(tokenizer, user)
    for w in (0.0, 1e4):
        res = args_generate(tiny_lm, tokenizer, prompt, user, LetterCount("e"), k=10, w=w, max_new_tokens=10)
        assert res.kl_steps.dtype == torch.float64 and res.kl_steps.shape == res.tokens.shape
        assert res.kl == float(res.kl_steps.sum()) and res.as_dict()["kl_sequence"] == res.kl
        assert res.kl == pytest.approx(base_nll(tiny_lm, tokenizer, prompt, res.tokens), abs=KL_ATOL, rel=0), w
        assert (res.deviation_rate > 0) == (w > 0)


def test_args_sampling_kl_is_the_candidate_softmax_against_the_base(tiny_lm, tokenizer):
    """ARGS-stochastic's per-step KL, recomputed by hand from the recorded candidates, logits and rewards
    and the base model's full next-token distribution (uncached replay), at a sampler temperature of 0.7."""
    from prelogit.args import args_generate_many

    T, w = 0.7, 0.5
    sampler = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=8, temperature=T)
    users = USER_TURNS[2:]
    prompts = [chat(tokenizer, u) for u in users]
    results = args_generate_many(sampler, prompts, users, LetterCount("e"), k=6, w=w, decode="sample",
                                 generators=[torch.Generator().manual_seed(i) for i in range(2)], temperature=T)
    for prompt, res in zip(prompts, results):
        logp = torch.log_softmax(teacher_forced_logits(tiny_lm, tokenizer, prompt, res.tokens) / T, -1)
        logp = logp.gather(1, res.candidates)  # (steps, k) log p_t(c_j), the sampler's tempered distribution
        logq = torch.log_softmax((res.logits.double() + w * res.rewards.double()) / T, -1)
        expected = (logq.exp() * (logq - logp)).sum(-1)
        assert res.deviation_rate > 0  # the reward moved draws off the top-logit token
        torch.testing.assert_close(res.kl_steps, expected, rtol=0, atol=KL_ATOL)
        assert res.kl == pytest.approx(float(expected.sum()), abs=KL_ATOL, rel=0)


def test_args_large_weight_follows_the_reward(tiny_lm, tokenizer):
    user = USER_TURNS[1]
    prompt = chat(tokenizer, user)
    reward = LetterCount("e")
    base = args_generate(tiny_lm, tokenizer, prompt, user, reward, k=10, w=0.0, max_new_tokens=16)
    res = args_generate(tiny_lm, tokenizer, prompt, user, reward, k=10, w=1e4, max_new_tokens=16)
    T = len(res.tokens)
    # Every step takes a candidate of maximal reward; among those, the one with the highest logit.
    steps = torch.arange(T)
    best = res.rewards.max(dim=1).values
    assert torch.equal(res.rewards[steps, res.chosen], best)
    first_best = (res.rewards == best[:, None]).float().argmax(dim=1)
    assert torch.equal(res.chosen, first_best)
    assert res.deviation_rate > 0
    assert res.tokens.tolist() == res.candidates[steps, res.chosen].tolist()
    final = reward.score([user] * 2, [base.text, res.text])
    assert final[1] > final[0]


def test_args_accounting_one_batched_reward_call_per_step(tiny_lm, tokenizer):
    reward = LetterCount()
    user = USER_TURNS[2]
    res = args_generate(tiny_lm, tokenizer, chat(tokenizer, user), user, reward, k=7, w=1.0, max_new_tokens=9)
    T = len(res.tokens)
    assert T == 9 and not res.finished  # the random model does not emit EOS in 9 tokens
    assert res.reward_calls == reward.texts_scored == 7 * T
    assert res.cost.reward_batches == reward.calls == T
    assert res.forward_calls == res.cost.new_tokens == T
    assert res.candidates.shape == res.logits.shape == res.rewards.shape == (T, 7)
    # Candidates are the top-k by logit, in descending order.
    assert (res.logits[:, :-1] >= res.logits[:, 1:]).all()
    assert res.cost.time_generation_s > 0 and res.cost.time_reward_s > 0


def test_args_stops_at_eos(tiny_lm, tokenizer):
    # Raise the EOS logit of the tiny model by 100 so that EOS is the top candidate at step 1.
    eos = tokenizer.eos_token_id
    bias = torch.zeros(len(tokenizer))
    bias[eos] = 100.0
    handle = tiny_lm.get_output_embeddings().register_forward_hook(lambda mod, inp, out: out + bias)
    try:
        user = USER_TURNS[0]
        res = args_generate(tiny_lm, tokenizer, chat(tokenizer, user), user, LetterCount(), k=4, w=1.0,
                            max_new_tokens=5)
    finally:
        handle.remove()
    assert res.finished and res.tokens.tolist() == [eos] and res.text == ""
    assert res.reward_calls == 4 and res.forward_calls == 1


def test_args_sampling_is_seeded_and_low_temperature_is_greedy(tiny_lm, tokenizer):
    user = USER_TURNS[3]
    prompt = chat(tokenizer, user)
    kw = dict(k=10, w=2.0, max_new_tokens=8, decode="sample")
    a = args_generate(tiny_lm, tokenizer, prompt, user, LetterCount(), generator=torch.Generator().manual_seed(5), **kw)
    b = args_generate(tiny_lm, tokenizer, prompt, user, LetterCount(), generator=torch.Generator().manual_seed(5), **kw)
    assert a.tokens.tolist() == b.tokens.tolist()
    cold = args_generate(tiny_lm, tokenizer, prompt, user, LetterCount(), k=10, w=0.0, max_new_tokens=8,
                         decode="sample", temperature=1e-6, generator=torch.Generator().manual_seed(5))
    # temperature 1e-6: a logit 1e-5 below the top is drawn with probability below exp(-10)
    same_greedy_or_tie(tiny_lm, tokenizer, prompt, cold.tokens.tolist(), greedy_tokens(tiny_lm, tokenizer, prompt, 8))


@pytest.mark.parametrize("kw,name", [({"k": 0}, "k"), ({"w": -1.0}, "w"), ({"decode": "beam"}, "decode"),
                                     ({"temperature": 0.0}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens")])
def test_args_validates_parameters(tiny_lm, tokenizer, kw, name):
    with pytest.raises(ParameterError, match=rf"^{name} must"):
        args_generate(tiny_lm, tokenizer, "hello", "hello", LetterCount(), **kw)


def test_args_rejects_bad_reward_output(tiny_lm, tokenizer):
    class Broken:
        name = "broken"

        def score(self, prompts, responses):
            return torch.zeros(len(responses) + 1)

    with pytest.raises(ParameterError, match="broken"):
        args_generate(tiny_lm, tokenizer, "hello", "hello", Broken(), k=3, max_new_tokens=2)


# ---- RE-Control --------------------------------------------------------------------------------

def test_value_ascent_increases_the_value():
    torch.manual_seed(0)
    mlp = ValueMLP(16, hidden=32, layers=2).eval()
    z = torch.randn(6, 16)
    moved = value_ascent(mlp, z, step_size=0.05, n_steps=10)
    with torch.no_grad():
        assert (mlp(moved) > mlp(z)).all()
    assert torch.equal(value_ascent(mlp, z, 0.05, 0), z)
    zb = z.to(torch.bfloat16)
    out = value_ascent(mlp, zb, 0.05, 3)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, zb)
    assert all(p.grad is None for p in mlp.parameters())  # only z is differentiated


def test_value_loss_is_td_with_stop_gradient():
    # V(z) = z[..., 0]: row 0 has values 1, 2, 3 (length 3, reward 3); row 1 has value 4 (length 1, reward 5).
    z = torch.zeros(2, 3, 2)
    z[0, :, 0] = torch.tensor([1.0, 2.0, 3.0])
    z[1, 0, 0] = 4.0
    z[1, 1:, 0] = 100.0  # past the end: must be ignored
    z.requires_grad_(True)
    loss = value_loss(lambda x: x[..., 0], z, torch.tensor([3, 1]), torch.tensor([3.0, 5.0]))
    # TD: (1 - 2)^2 + (2 - 3)^2 = 2; final: (3 - 3)^2 + (4 - 5)^2 = 1; divided by the batch size 2.
    assert float(loss.detach()) == pytest.approx(1.5)
    loss.backward()
    g = z.grad[..., 0]
    # d/dV_1 = 2 (V_1 - V_2) / 2 = -1 (V_1 is not pulled by the term (V_0 - sg V_1)); V_2 only meets
    # the final term, whose error is 0; padded positions get nothing.
    assert g[0].tolist() == pytest.approx([-1.0, -1.0, 0.0])
    assert g[1].tolist() == pytest.approx([-1.0, 0.0, 0.0])


def test_recontrol_with_zero_steps_is_greedy_decoding(tiny_lm, tokenizer):
    sampler = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=12)
    prompt = chat(tokenizer, USER_TURNS[0])
    torch.manual_seed(0)
    g = recontrol_generate(sampler, prompt, ValueMLP(32), step_size=0.5, n_steps=0)
    same_greedy_or_tie(tiny_lm, tokenizer, prompt, g.tokens[0, : g.lengths[0]].tolist(),
                       greedy_tokens(tiny_lm, tokenizer, prompt, 12))
    assert g.meta["value_grad_steps"] == 0 and g.meta["value_before"] == g.meta["value_after"]


def test_recontrol_ascent_steers_decoding(tiny_lm, tokenizer):
    # A linear value V(z) = <w_target, z> along the LM-head row of the token with the largest row
    # norm: ascent adds a multiple of w_target to z, which raises that token's logit faster than
    # any other (<w_j, w_t> <= |w_j| |w_t| <= |w_t|^2), so enough ascent makes it the greedy choice.
    W = tiny_lm.get_output_embeddings().weight.detach().float()
    target = int(W.norm(dim=1).argmax())
    sampler = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6)
    g = recontrol_generate(sampler, chat(tokenizer, USER_TURNS[1]), lambda z: z @ W[target], step_size=100.0,
                           n_steps=10)
    n = int(g.lengths[0])
    assert g.tokens[0, :n].tolist() == [target] * n
    assert g.meta["value_grad_steps"] == 10 * n
    # greedy on moved pre-logits: the KL against the base model is -log pi_ref(y | x) of the response
    assert g.kl.dtype == torch.float64 and g.kl.shape == (1,)
    nll = base_nll(tiny_lm, tokenizer, chat(tokenizer, USER_TURNS[1]), g.tokens[0, :n])
    assert float(g.kl[0]) == pytest.approx(nll, abs=KL_ATOL, rel=0)
    assert all(a > b for a, b in zip(g.meta["value_after"], g.meta["value_before"]))


def test_recontrol_many_equals_each_prompt_alone(tiny_lm64, tokenizer):
    """RE-Control's ascent acts row by row, so batching prompts changes nothing (float64 model,
    linear value: no rounding can differ between the paths)."""
    from prelogit.recontrol import recontrol_generate_many

    W = tiny_lm64.get_output_embeddings().weight.detach()
    value = lambda z: z.double() @ W[7]  # noqa: E731
    sampler = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=6)
    prompts = [chat(tokenizer, u) for u in USER_TURNS]
    alone = [recontrol_generate(sampler, p, value, step_size=0.01, n_steps=3) for p in prompts]
    sampler.max_rows = 3
    many = recontrol_generate_many(sampler, prompts, value, step_size=0.01, n_steps=3)
    for a, b in zip(alone, many):
        assert torch.equal(a.tokens, b.tokens)
        assert a.meta["value_grad_steps"] == b.meta["value_grad_steps"]
        # V is a float64 matrix-vector product over batches of other shapes: equal to float64 rounding
        torch.testing.assert_close(torch.tensor(a.meta["value_before"]), torch.tensor(b.meta["value_before"]),
                                   rtol=1e-12, atol=1e-14)
        # the KL is taken on the float32-rounded logits the sampler uses: equal to float32 rounding (~1e-7)
        torch.testing.assert_close(a.kl, b.kl, rtol=1e-6, atol=1e-6)


def test_args_many_equals_each_prompt_alone(tiny_lm64, tokenizer):
    from prelogit.args import args_generate_many

    prompts = [chat(tokenizer, u) for u in USER_TURNS]
    alone = [args_generate(tiny_lm64, tokenizer, p, u, LetterCount(), k=5, w=2.0, max_new_tokens=6)
             for p, u in zip(prompts, USER_TURNS)]
    reward = LetterCount()
    sampler = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=6, max_rows=3)
    many = args_generate_many(sampler, prompts, USER_TURNS, reward, k=5, w=2.0)
    for a, b in zip(alone, many):
        assert a.tokens.tolist() == b.tokens.tolist() and torch.equal(a.chosen, b.chosen)
        assert torch.equal(a.rewards, b.rewards) and a.reward_calls == b.reward_calls
    # all prompts' candidates of a step share one reward call (micro-batches of 3 rows: 2 per step)
    assert reward.calls == 2 * 6 and reward.texts_scored == 5 * 6 * len(prompts)


@pytest.fixture(scope="module")
def tiny_dataset(tiny_lm, tokenizer):
    sampler = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=8)
    reward = LetterCount("e")
    data = collect_training_data(sampler, [chat(tokenizer, u) for u in USER_TURNS], USER_TURNS, reward,
                                 samples_per_prompt=4,
                                 generators=[torch.Generator().manual_seed(i) for i in range(len(USER_TURNS))])
    return data, reward


def test_collect_training_data(tiny_dataset):
    data, reward = tiny_dataset
    assert len(data) == 16 and data.prelogits.shape[0] == 16 and data.prelogits.shape[2] == 32
    assert reward.calls == 1 and reward.texts_scored == 16  # one batched call for all prompts
    assert data.prompt_index.tolist() == [i for i in range(4) for _ in range(4)]
    assert data.rewards.tolist() == [float(t.lower().count("e")) for t in data.texts]
    assert (data.prelogits[~data.mask] == 0).all() and (data.prelogits[data.mask].norm(dim=-1) > 0).all()
    assert data.cost.generations == 16 and data.cost.reward_calls == 16
    assert data.cost.new_tokens == int(data.lengths.sum())


def test_train_value_decreases_loss_and_is_deterministic(tiny_dataset):
    data, _ = tiny_dataset
    kw = dict(d=32, epochs=40, lr=3e-3, batch_size=4, seed=3, hidden=64, holdout=0.25)
    mlp_a, m_a = train_value(data, **kw)
    mlp_b, m_b = train_value(data, **kw)
    assert m_a["loss_history"] == m_b["loss_history"]
    for (ka, va), (kb, vb) in zip(mlp_a.state_dict().items(), mlp_b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert m_a["final_loss"] < 0.5 * m_a["first_loss"]
    assert m_a["n_train"] == 12 and m_a["n_heldout"] == 4 and m_a["n_heldout_prompts"] == 1
    assert m_a["train_seconds"] > 0
    _, m_c = train_value(data, **{**kw, "seed": 4})
    assert m_c["loss_history"] != m_a["loss_history"]


def test_train_value_validates(tiny_dataset):
    data, _ = tiny_dataset
    with pytest.raises(ParameterError, match="d=16"):
        train_value(data, d=16)
    with pytest.raises(ParameterError, match="holdout"):
        train_value(data.subset(torch.arange(4)), d=32, holdout=0.5)  # one prompt only


def test_value_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    mlp = ValueMLP(8, hidden=5, layers=1).eval()
    path = save_value(mlp, tmp_path / "v.safetensors", metadata={"seed": 1})
    back = load_value(path)
    z = torch.randn(3, 8)
    assert (back.d, back.hidden, back.layers) == (8, 5, 1)
    with torch.no_grad():
        # Exact: load_state_dict copies into the module's own freshly allocated (aligned) parameters,
        # so both modules run the same kernels on the same values and layouts.
        assert torch.equal(back(z), mlp(z))
    assert [p.name for p in tmp_path.iterdir()] == ["v.safetensors"]  # no temporary file left
    with pytest.raises(FileNotFoundError):
        load_value(tmp_path / "missing.safetensors")


# ---- the real SmolLM2 --------------------------------------------------------------------------

@pytest.mark.integration
def test_args_on_smollm(smollm):
    model, tokenizer = smollm
    user = USER_TURNS[0]
    reward = LetterCount("e")
    t0 = time.perf_counter()
    res = args_generate(model, tokenizer, chat(tokenizer, user), user, reward, k=10, w=1.0, max_new_tokens=16)
    elapsed = time.perf_counter() - t0
    T = len(res.tokens)
    assert 1 <= T <= 16 and res.text
    assert res.reward_calls == reward.texts_scored == 10 * T and res.forward_calls == T
    # The score as args_generate forms it (float64; w = 1): a float32 sum could round two
    # candidates to a tie that float64 breaks, and argmax would then pick another one.
    score = res.logits.double() + 1.0 * res.rewards.double()
    assert torch.equal(res.chosen, score.argmax(dim=1))
    print(f"\nARGS k=10 w=1 on SmolLM2: {T} tokens in {elapsed:.2f} s, deviation {res.deviation_rate:.2f}: {res.text!r}")


@pytest.mark.integration
def test_recontrol_on_smollm(smollm):
    model, tokenizer = smollm
    sampler = PrelogitSampler(model, tokenizer, max_new_tokens=8, temperature=0.7, top_k=50, top_p=0.95)
    users = USER_TURNS[:3]
    data = collect_training_data(sampler, [chat(tokenizer, u) for u in users], users, LetterCount("e"),
                                 samples_per_prompt=3, generators=[torch.Generator().manual_seed(i) for i in range(3)])
    mlp, metrics = train_value(data, d=sampler.d, epochs=30, lr=1e-3, batch_size=4, seed=0, holdout=0.34)
    assert metrics["final_loss"] < metrics["first_loss"]
    t0 = time.perf_counter()
    g = recontrol_generate(sampler, chat(tokenizer, USER_TURNS[0]), mlp, step_size=0.5, n_steps=30)
    elapsed = time.perf_counter() - t0
    n = int(g.lengths[0])
    assert g.meta["value_grad_steps"] == 30 * n
    assert sum(g.meta["value_after"]) > sum(g.meta["value_before"])
    print(f"\nRE-Control on SmolLM2: training {metrics['train_seconds']:.2f} s, held-out corr "
          f"{metrics['heldout_corr_last']:.2f}; {n} tokens in {elapsed:.2f} s: {g.texts[0]!r}")
