"""The controlled sampler: agreement with transformers and with a naive reference, control that works, and
results that do not depend on a prompt's batch-mates, the micro-batch size or the order of prompts."""

import pytest
import torch

from prelogit.checks import ParameterError
from prelogit.sampling import PrelogitSampler, inverse_cdf_sample

PROMPTS = ["Hi! How was your weekend?", "What is your favourite food?", "I just lost my job."]


def _ref_greedy(model, ids, T):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=T)
    return out[0, ids.shape[1]:].tolist()


def _assert_greedy_agrees(model, ids, tokens, T, tie=1e-4):
    """Greedy tokens of the sampler against ``generate``: two code paths (cache layout, kernels), so
    equality is required except where generate's own top two logits are within ``tie`` of each
    other at the first differing step; there float rounding may legitimately pick either."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=T,
                         output_scores=True, return_dict_in_generate=True)
    ref = out.sequences[0, ids.shape[1]:].tolist()
    for t, (a, b) in enumerate(zip(tokens, ref)):
        if a != b:
            top2 = torch.topk(out.scores[t][0].float(), 2).values
            assert float(top2[0] - top2[1]) <= tie, (t, tokens, ref)
            return
    assert len(tokens) == len(ref), (tokens, ref)


def _tokens(g, i):
    return g.tokens[i, : g.lengths[i]].tolist()


def test_greedy_equals_generate_tiny(tiny_lm64, tokenizer):
    # float64: the two code paths cannot round a greedy choice differently
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=12, decode="greedy")
    for p in PROMPTS:
        ids = s.encode(p, chat=True)
        assert _tokens(s.generate(ids, 1), 0) == _ref_greedy(tiny_lm64, ids, 12)


def _reference_sample(model, sampler, ids, n, T, generator, control=None):
    """Uncached, one row at a time: full forward over prompt + tokens so far, then the sampler's
    distribution and the inverse-CDF draw of the same per-(row, step) uniforms the sampler uses."""
    u = torch.rand(n, T, generator=generator, dtype=torch.float64)
    eos = set(sampler.eos_ids.tolist())
    out = []
    for i in range(n):
        seq = ids[0].tolist()
        toks = []
        for t in range(T):
            with torch.no_grad():
                z = model(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][:, -1]
            if control is not None and t < control.shape[1]:
                z = z + control[i, t].to(z.dtype)
            logits = model.lm_head(z)
            tok = int(inverse_cdf_sample(sampler.next_token_probs(logits), u[i, t : t + 1])[0])
            toks.append(tok)
            seq.append(tok)
            if tok in eos:
                break
        out.append(toks)
    return out


def test_sampling_equals_uncached_reference_with_the_same_uniforms(tiny_lm64, tokenizer):
    """The cached, batched loop draws exactly what a naive loop draws from the same uniforms
    (float64, so rounding differences between the two paths cannot flip a draw)."""
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=8, temperature=0.8, top_k=50, top_p=0.95)
    ids = s.encode(PROMPTS[0], chat=True)
    V = 2.0 * torch.randn(3, 4, s.d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    g = s.generate(ids, 3, control=V, generator=torch.Generator().manual_seed(7))
    ref = _reference_sample(tiny_lm64, s, ids, 3, 8, torch.Generator().manual_seed(7), control=V)
    assert [_tokens(g, i) for i in range(3)] == ref


def test_next_token_probs_equal_transformers_warpers(tiny_lm, tokenizer):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = 3 * torch.randn(4, 1000, generator=torch.Generator().manual_seed(0))
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 20, 0.9), (1.3, 0, 0.5), (0.5, 5, 1.0)]:
        s = PrelogitSampler(tiny_lm, tokenizer, temperature=temperature, top_k=top_k, top_p=top_p)
        ref = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            ref = TopKLogitsWarper(top_k)(None, ref)
        if top_p < 1:
            ref = TopPLogitsWarper(top_p)(None, ref)
        # the same float32 operations in the same order: equal to float32 rounding of a softmax
        torch.testing.assert_close(s.next_token_probs(logits), torch.softmax(ref, -1), rtol=1e-6, atol=1e-7)


def test_inverse_cdf_sample_has_the_right_frequencies():
    probs = torch.tensor([[0.1, 0.0, 0.45, 0.05, 0.4]]).expand(200_000, -1)
    u = torch.rand(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(inverse_cdf_sample(probs, u), minlength=5).double()
    expected = probs[0].double() * 200_000
    assert counts[1] == 0  # a token of probability zero is never drawn
    # binomial standard deviations: sqrt(N p (1-p)) <= 223; 5 of them is a 1e-6 false alarm
    assert ((counts - expected).abs() <= 5 * (expected * (1 - probs[0].double())).sqrt() + 1e-9).all(), counts
    # interval edges (dyadic probabilities, exact in float): u * total in [cdf[j-1], cdf[j]) -> token j
    dyadic = torch.tensor([[0.125, 0.0, 0.5, 0.125, 0.25]]).expand(4, -1)
    edges = inverse_cdf_sample(dyadic, torch.tensor([0.0, 0.1249, 0.125, 0.999999], dtype=torch.float64))
    assert edges.tolist() == [0, 0, 2, 4]


def test_recorded_prelogits_are_last_hidden_states(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6, decode="greedy")
    ids = s.encode(PROMPTS[2], chat=True)
    g = s.generate(ids, 1, record_prelogits=True)
    full = torch.cat([ids[0], g.tokens[0, : g.lengths[0]]])[None]
    with torch.no_grad():
        hs = tiny_lm(full, output_hidden_states=True).hidden_states[-1][0]
    P = ids.shape[1]
    # the pre-logit of generated token t sits at position P - 1 + t
    expected = hs[P - 1: P - 1 + int(g.lengths[0])]
    torch.testing.assert_close(g.prelogits[0, : g.lengths[0]], expected.float(), atol=1e-4, rtol=1e-4)


def _steer(model, token_id, scale):
    """A control input along the LM-head row of ``token_id`` and the token it forces.

    For a large scale the logits are dominated by W v, so greedy decoding picks argmax_j W_j . v:
    usually ``token_id`` itself, but not always for random weights, so the test uses the token
    the direction really forces.
    """
    W = model.get_output_embeddings().weight.detach().float()
    v = scale * W[token_id] / W[token_id].norm()
    return v, int(torch.argmax(W @ v))


def test_control_steers_only_the_first_tau_tokens(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6, decode="greedy")
    ids = s.encode(PROMPTS[0], chat=True)
    v, target = _steer(tiny_lm, tokenizer.convert_tokens_to_ids("Hello"), 500.0)
    V = v.expand(2, 3, -1).clone()
    g = s.generate(ids, 2, control=V)
    assert (g.tokens[:, :3] == target).all()
    # tau = 0 is no control at all
    g0 = s.generate(ids, 2, control=torch.zeros(2, 0, s.d))
    _assert_greedy_agrees(tiny_lm, ids, _tokens(g0, 0), 6)


def test_eos_ends_a_row_and_the_others_continue(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=8, decode="greedy")
    ids = s.encode(PROMPTS[0], chat=True)
    V = torch.zeros(3, 2, s.d)
    V[1, 1], stop = _steer(tiny_lm, tokenizer.eos_token_id, 500.0)  # row 1 ends at its 2nd token
    s.eos_ids = torch.tensor([stop])  # the token this direction forces plays the end of sequence
    g = s.generate(ids, 3, control=V)
    assert g.lengths[1] == 2 and bool(g.finished[1])
    assert (g.tokens[1, 2:] == s.pad_id).all()
    assert g.lengths[0] == g.lengths[2] and _tokens(g, 0) == _tokens(g, 2)


def test_same_seed_same_samples(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=8)
    a = s.generate(PROMPTS[0], 4, generator=torch.Generator().manual_seed(1))
    b = s.generate(PROMPTS[0], 4, generator=torch.Generator().manual_seed(1))
    c = s.generate(PROMPTS[0], 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("kwargs, name", [({"decode": "beam"}, "decode"), ({"temperature": 0.0}, "temperature"),
                                          ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_p": 1.5}, "top_p")])
def test_bad_sampler_parameters(tiny_lm, tokenizer, kwargs, name):
    with pytest.raises(ParameterError, match=name):
        PrelogitSampler(tiny_lm, tokenizer, **kwargs)


def test_bad_control_shape_and_n(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=4)
    with pytest.raises(ParameterError, match="control"):
        s.generate(PROMPTS[0], 2, control=torch.zeros(3, 2, s.d))
    with pytest.raises(ParameterError, match="control"):
        s.generate(PROMPTS[0], 2, control=torch.zeros(2, 2, s.d + 1))
    with pytest.raises(ParameterError, match="n must"):
        s.generate(PROMPTS[0], 0)


@pytest.mark.integration
def test_smollm_greedy_equals_generate(smollm):
    model, tok = smollm
    s = PrelogitSampler(model, tok, max_new_tokens=16, decode="greedy")
    for p in PROMPTS:
        ids = s.encode(p, chat=True)
        # bf16: a logit of size ~16 is rounded in steps of 0.06, so a near-tie may go either way
        _assert_greedy_agrees(model, ids, _tokens(s.generate(ids, 1), 0), 16, tie=0.125)


@pytest.mark.integration
def test_smollm_hook_sees_last_hidden_state(smollm):
    model, tok = smollm
    s = PrelogitSampler(model, tok, max_new_tokens=8, decode="greedy")
    ids = s.encode(PROMPTS[1], chat=True)
    g = s.generate(ids, 1, record_prelogits=True)
    full = torch.cat([ids[0], g.tokens[0, : g.lengths[0]]])[None]
    with torch.no_grad():
        out = model(full, output_hidden_states=True)
    P = ids.shape[1]
    expected = out.hidden_states[-1][0, P - 1: P - 1 + int(g.lengths[0])].float()
    # bf16: cached (token by token) and uncached attention round differently, so compare per token
    # at bf16 resolution (relative L2 error), not element by element. The prefill too: it runs on the
    # prompt alone, the reference on prompt + continuation, and whether the CPU's bf16 kernels round a
    # row the same way in a longer matrix depends on the CPU and its kernels (exactly 0 where this test
    # was written, 0.012 on a Xeon with AVX-512 and AMX bf16 units); the rest is rounding through 30 bf16 layers.
    rel = (g.prelogits[0, : g.lengths[0]] - expected).norm(dim=-1) / expected.norm(dim=-1)
    # (measured: at most 0.025 on either machine)
    assert float(rel.max()) < 0.05, rel
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    # On one and the same forward pass the hook sees hidden_states[-1] exactly.
    from prelogit.sampling import _HeadHook

    hook = _HeadHook(model.get_output_embeddings())
    try:
        with torch.no_grad():
            out = model(full, output_hidden_states=True, logits_to_keep=1)
    finally:
        hook.remove()
    assert torch.equal(hook.last, out.hidden_states[-1][:, -1])


# ---- many prompts in one batch ------------------------------------------------------------------

MIXED = ["Hi!", "What is your favourite food, and why do you like it so much?", "I just lost my job.",
         "Tell me about the weather where you live today, please."]


def _many(s, prompts, counts, seed, controls=None, order=None):
    """generate_many over ``prompts`` in ``order``, with per-prompt generators keyed by the prompt."""
    order = order or list(range(len(prompts)))
    gens = s.generate_many([prompts[i] for i in order], [counts[i] for i in order],
                           controls=None if controls is None else [controls[i] for i in order],
                           generators=[torch.Generator().manual_seed(seed + i) for i in order])
    out = [None] * len(prompts)
    for g, i in zip(gens, order):
        out[i] = g
    return out


@pytest.mark.parametrize("decode", ["sample", "greedy"])
def test_a_prompts_tokens_do_not_depend_on_its_batch(tiny_lm64, tokenizer, decode):
    """Alone, together, reordered, and at micro-batch sizes that split prompts across passes:
    the same tokens, row for row (float64, where rounding cannot flip a draw)."""
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=7, decode=decode)
    prompts = [s.encode(p, chat=True)[0].tolist() for p in MIXED]
    counts = [3, 1, 4, 2]
    V = [1.5 * torch.randn(c, 3, s.d, generator=torch.Generator().manual_seed(50 + i), dtype=torch.float64)
         for i, c in enumerate(counts)]
    alone = [_many(s, [p], [c], 10 + i, [v])[0] for i, (p, c, v) in enumerate(zip(prompts, counts, V))]
    for max_rows, order in [(1000, None), (1, [3, 1, 0, 2]), (3, [2, 0, 3, 1]), (5, None)]:
        s.max_rows = max_rows
        together = _many(s, prompts, counts, 10, V, order)
        for a, b in zip(alone, together):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.lengths, b.lengths), (max_rows, order)
            assert a.texts == b.texts


def test_finished_rows_leave_and_prompts_keep_their_own_lengths(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=8, decode="greedy")
    V = torch.zeros(2, 2, s.d)
    V[0, 1], stop = _steer(tiny_lm, tokenizer.eos_token_id, 500.0)  # row 0 of prompt 0 ends at token 2
    s.eos_ids = torch.tensor([stop])
    g0, g1 = s.generate_many([MIXED[0], MIXED[1]], [2, 3], controls=[V, None])
    assert g0.lengths.tolist()[0] == 2 and bool(g0.finished[0]) and (g0.tokens[0, 2:] == s.pad_id).all()
    assert g1.tokens.shape[0] == 3 and g1.lengths.tolist() == [8, 8, 8]
    # the forward passes each prompt took part in: the prefill plus one per decoded step after the first
    assert g1.forward_calls == 1 + 7 and g0.forward_calls == 1 + 7


def test_a_reused_prefill_gives_the_same_samples(tiny_lm64, tokenizer):
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=6)
    pre = s.prefill(MIXED[:3])
    a = s.generate_many(pre, [2, 2, 2], generators=[torch.Generator().manual_seed(i) for i in range(3)])
    b = s.generate_many(MIXED[:3], [2, 2, 2], generators=[torch.Generator().manual_seed(i) for i in range(3)])
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens)
    assert a[0].forward_calls == y.forward_calls - 1  # a reused prefill is not charged again


def test_bad_batch_arguments(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=4)
    with pytest.raises(ParameterError, match="one count per prompt"):
        s.generate_many(MIXED[:2], [1])
    with pytest.raises(ParameterError, match="one generator per prompt"):
        s.generate_many(MIXED[:2], [1, 1], generators=[None])
    with pytest.raises(ParameterError, match="one control"):
        s.generate_many(MIXED[:2], [1, 1], controls=[None])
    with pytest.raises(ParameterError, match="counts"):
        s.generate_many(MIXED[:2], [1, 0])
    with pytest.raises(ParameterError, match="non-empty list"):
        s.prefill([])
    with pytest.raises(ParameterError, match="max_rows"):
        PrelogitSampler(tiny_lm, tokenizer, max_rows=0)


@pytest.mark.integration
def test_smollm_float32_batched_greedy_equals_one_prompt_path(smollm_dir):
    """SmolLM2 in float32, prompts of different lengths in one left-padded batch: the greedy
    tokens equal the one-prompt path, and every step's logits agree to 1e-4."""
    from prelogit.models import load_model

    model, tok = load_model(str(smollm_dir), dtype="float32")
    s = PrelogitSampler(model, tok, max_new_tokens=12, decode="greedy")
    prompts = [s.encode(p, chat=True)[0].tolist() for p in MIXED]
    assert len({len(p) for p in prompts}) == len(prompts)  # really different lengths: real padding
    alone = [s.generate(p, 1, record_prelogits=True) for p in prompts]
    together = s.generate_many(prompts, [1] * len(prompts), record_prelogits=True)
    head = model.get_output_embeddings()
    for a, b in zip(alone, together):
        assert _tokens(a, 0) == _tokens(b, 0)
        with torch.no_grad():
            la, lb = head(a.prelogits[0, : a.lengths[0]]), head(b.prelogits[0, : b.lengths[0]])
        # float32 logits of magnitude up to ~30 (one ulp there is 2e-6): the padded batch runs 30
        # layers with other matrix shapes, so sums round in another order. Measured on the project's
        # CPU, one thread: at most 7.6e-5 absolute. The bound is 1e-4, absolute plus relative.
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)



@pytest.mark.integration
def test_smollm_bfloat16_batched_greedy_agrees_with_one_prompt_path_up_to_near_ties(smollm_dir):
    """SmolLM2 in bfloat16 (the embedded default), prompts of different lengths in one left-padded
    batch. The padded batch rounds in another order, so bit-equality is not guaranteed: until the
    paths' tokens first differ, every step's logits agree within bfloat16's rounding, and where they
    differ the two tokens were a near-tie of the one-prompt path's own logits."""
    from prelogit.models import load_model

    model, tok = load_model(str(smollm_dir), dtype="bfloat16")
    s = PrelogitSampler(model, tok, max_new_tokens=12, decode="greedy")
    prompts = [s.encode(p, chat=True)[0].tolist() for p in MIXED]
    alone = [s.generate(p, 1, record_prelogits=True) for p in prompts]
    together = s.generate_many(prompts, [1] * len(prompts), record_prelogits=True)
    head = model.get_output_embeddings()
    # Logits reach ~35, where one bfloat16 ulp is 0.25; 30 layers rounding in another order move the largest
    # of the 49k logits of a step by a few ulps (measured on a Xeon with AMX, one left-padded batch of 4:
    # at most 1.16, typically 0.5). The bound is 2.0; a flipped choice must have been within twice that.
    tol = 2.0
    for a, b in zip(alone, together):
        ta, tb = _tokens(a, 0), _tokens(b, 0)
        same = next((j for j, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
        with torch.no_grad():
            la = head(a.prelogits[0, : len(ta)].to(model.dtype)).float()
            lb = head(b.prelogits[0, : len(tb)].to(model.dtype)).float()
        n = min(same + 1, len(ta), len(tb))  # the logits of the steps with a common prefix
        assert (la[:n] - lb[:n]).abs().max() <= tol
        if same < min(len(ta), len(tb)):  # a flipped greedy choice: a near-tie, not a bug
            assert abs(float(la[same, ta[same]] - la[same, tb[same]])) <= 2 * tol


# ---- the recorded KL against the unsteered model -------------------------------------------------

def _teacher_forced_nll(model, ids, tokens):
    """-sum_t log p_ref(y_t | x, y_<t) of ``tokens`` (L,) after the prompt ``ids`` (1, P): one uncached
    forward pass of the base model over prompt + response, log-softmax of its logits in float64."""
    full = torch.cat([ids[0], tokens.to(ids.device)])[None]
    P, L = ids.shape[1], len(tokens)
    with torch.no_grad():
        logits = model(full).logits[0, P - 1: P - 1 + L].double()
    return -float(torch.log_softmax(logits, -1).gather(1, tokens.view(-1, 1)).sum())


def _controls(n, tau, d, scale, seed, dtype=torch.float32):
    return scale * torch.randn(n, tau, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_kl_without_control_is_zero(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6, temperature=0.8, top_k=40, top_p=0.9)
    g0, g1 = s.generate_many(PROMPTS[:2], [3, 2], generators=[torch.Generator().manual_seed(i) for i in range(2)],
                             record_kl=True)
    for g in (g0, g1):
        assert g.kl.dtype == torch.float64 and g.kl.shape == (g.tokens.shape[0],)
        assert g.kl.tolist() == [0.0] * g.tokens.shape[0]  # q and p are the same distribution, bit for bit


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_kl_of_controlled_sampling_equals_sequence_kl(tiny_lm, tokenizer, temperature):
    """The sampler's KL against :func:`prelogit.misvo.sequence_kl` on the recorded pre-logits, row by row
    (each row its own control; tau = 3 of 7 tokens, so steps past tau add nothing)."""
    from prelogit.misvo import sequence_kl

    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=7, temperature=temperature)
    V = _controls(4, 3, s.d, 5.0, 3)
    g = s.generate(PROMPTS[1], 4, control=V, generator=torch.Generator().manual_seed(4), record_prelogits=True,
                   record_kl=True)
    W = tiny_lm.get_output_embeddings().weight.detach().double()
    ref = torch.cat([sequence_kl(W, None, g.prelogits[i: i + 1], V[i].double(), g.lengths[i: i + 1], temperature)
                     for i in range(4)])
    assert (ref > 0.01).all(), ref  # the control is material
    # The sampler's logits are float32 matrix products (W z and W (z + v): sums of d = 32 terms of size
    # ~|W_j| |z| ~ 1, each rounded to ~6e-8 relative) where sequence_kl works in float64; a logit error e
    # moves a token-level KL by at most about 2 e / temperature, so over <= 3 steered tokens 1e-5 leaves a
    # wide margin (measured: at most 1.5e-7 on KLs of 0.4-1.5).
    torch.testing.assert_close(g.kl, ref, rtol=1e-5, atol=1e-5)


def test_kl_of_controlled_greedy_is_the_base_models_nll(tiny_lm, tokenizer):
    """Greedy decoding is a point mass: each row's KL is -log pi_ref(y | x) of its own response."""
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6, decode="greedy")
    ids = s.encode(PROMPTS[2], chat=True)
    V = _controls(3, 6, s.d, 5.0, 5)
    g = s.generate(ids, 3, control=V, record_kl=True)
    plain = s.generate(ids, 1)
    assert any(_tokens(g, i) != _tokens(plain, 0) for i in range(3))  # the control changed the responses
    for i in range(3):
        nll = _teacher_forced_nll(tiny_lm, ids, g.tokens[i, : g.lengths[i]])
        # float32 logits, cached vs uncached forward (other shapes, other rounding): each log-probability
        # (about -10.7 = -log V for the near-uniform random model) is off by ~1e-8 (float32 rounding of the
        # logits; both sides normalise in float64); 6 tokens within 1e-5 (measured: at most 1e-7 on KLs of ~64).
        assert g.kl[i] == pytest.approx(nll, abs=1e-5, rel=0), (i, float(g.kl[i]), nll)


def test_kl_of_plain_greedy_is_the_nll_of_the_greedy_response(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=5, decode="greedy")
    ids = s.encode(PROMPTS[0], chat=True)
    g = s.generate(ids, 1, record_kl=True)
    # as above: float32 cached vs uncached logits, 5 tokens
    assert g.kl[0] == pytest.approx(_teacher_forced_nll(tiny_lm, ids, g.tokens[0, : g.lengths[0]]), abs=1e-5, rel=0)


@pytest.mark.parametrize("decode", ["sample", "greedy"])
def test_record_kl_does_not_change_the_tokens(tiny_lm, tokenizer, decode):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6, decode=decode, temperature=0.9)
    V = [_controls(3, 4, s.d, 3.0, 6), None]
    kw = dict(controls=V, record_prelogits=True)
    a = s.generate_many(PROMPTS[:2], [3, 2], generators=[torch.Generator().manual_seed(i) for i in range(2)], **kw)
    b = s.generate_many(PROMPTS[:2], [3, 2], generators=[torch.Generator().manual_seed(i) for i in range(2)],
                        record_kl=True, **kw)
    for x, y in zip(a, b):
        assert x.kl is None and y.kl is not None
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.lengths, y.lengths)
        assert torch.equal(x.prelogits, y.prelogits)


def test_token_kl_with_truncation_matches_a_float64_hand_computation(tiny_lm, tokenizer):
    """top-k on both sides: q lives on the steered top k, p on the base top k; a token q keeps and p drops
    makes the KL infinite."""
    s = PrelogitSampler(tiny_lm, tokenizer, temperature=0.7, top_k=5)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 50, generator=g)
    steered = base.clone()
    steered[0] += 0.3 * torch.randn(50, generator=g)  # row 0: shifted, maybe another top 5
    steered[1, base[1].argsort()[:5]] += 100.0  # row 1: q's top 5 are p's bottom 5
    kl = s.token_kl(steered, base)

    def hand(x):
        x = x.double() / 0.7
        keep = x >= x.topk(5).values[-1]
        return torch.where(keep, x - torch.logsumexp(x[keep], 0), torch.tensor(float("-inf"), dtype=torch.float64))

    lq, lp = hand(steered[0]), hand(base[0])
    expected = float(sum(lq[j].exp() * (lq[j] - lp[j]) for j in range(50) if lq[j] > float("-inf")))
    assert kl[0] == pytest.approx(expected, rel=1e-6, abs=1e-9)  # float32 truncation, float64 sums
    assert kl[1] == float("inf") and kl[2] == 0.0
    chosen = base[2].argsort()[:1]  # greedy on a token top-k removes from p: infinitely unlikely
    assert s.token_kl(steered[2:], base[2:], chosen)[0] == float("inf")


def test_record_kl_with_a_chooser_is_refused(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=3)
    with pytest.raises(ParameterError, match="record_kl"):
        s.generate_many(PROMPTS[:1], [1], chooser=lambda logits, t, rows, prefix: logits.argmax(-1), record_kl=True)


@pytest.mark.parametrize("decode", ["sample", "greedy"])
def test_a_prompts_kl_does_not_depend_on_its_batch(tiny_lm64, tokenizer, decode):
    s = PrelogitSampler(tiny_lm64, tokenizer, max_new_tokens=6, decode=decode)
    prompts = [s.encode(p, chat=True)[0].tolist() for p in MIXED]
    counts = [3, 1, 4, 2]
    V = [_controls(c, 3, s.d, 3.0, 60 + i, torch.float64) for i, c in enumerate(counts)]
    V[1] = None  # one prompt without control among controlled ones: its sampling KL stays 0

    def run(ps, cs, vs, seeds):
        return s.generate_many(ps, cs, controls=vs, generators=[torch.Generator().manual_seed(x) for x in seeds],
                               record_kl=True)

    alone = [run([p], [c], [v], [10 + i])[0] for i, (p, c, v) in enumerate(zip(prompts, counts, V))]
    if decode == "sample":
        assert alone[1].kl.tolist() == [0.0]
    for max_rows, order in [(1000, [0, 1, 2, 3]), (3, [2, 0, 3, 1])]:
        s.max_rows = max_rows
        together = run([prompts[i] for i in order], [counts[i] for i in order], [V[i] for i in order],
                       [10 + i for i in order])
        for i, b in zip(order, together):
            a = alone[i]
            assert torch.equal(a.tokens, b.tokens)
            # float64 model, but the KL is taken on the float32-rounded logits the sampler draws from: a
            # batch of another shape may round a logit to the neighbouring float32 (~6e-8 relative), so
            # KLs of size O(1) agree to ~1e-7, not bit for bit.
            torch.testing.assert_close(a.kl, b.kl, rtol=1e-6, atol=1e-6)
