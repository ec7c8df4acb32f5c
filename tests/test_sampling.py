"""The controlled sampler: exact agreement with transformers when uncontrolled, and control that works."""

import pytest
import torch

from prelogit.checks import ParameterError
from prelogit.sampling import PrelogitSampler

PROMPTS = ["Hi! How was your weekend?", "What is your favourite food?", "I just lost my job."]


def _ref_greedy(model, ids, T):
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=T)
    return out[0, ids.shape[1]:].tolist()


def _tokens(g, i):
    return g.tokens[i, : g.lengths[i]].tolist()


def test_greedy_equals_generate_tiny(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=12, decode="greedy")
    for p in PROMPTS:
        ids = s.encode(p, chat=True)
        assert _tokens(s.generate(ids, 1), 0) == _ref_greedy(tiny_lm, ids, 12)


def test_sampling_equals_generate_with_same_seed_tiny(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=10)
    ids = s.encode(PROMPTS[0], chat=True)
    for n in (1, 3):
        g = s.generate(ids, n, generator=torch.Generator().manual_seed(7))
        torch.manual_seed(7)
        ref = tiny_lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                               temperature=1.0, max_new_tokens=10, num_return_sequences=n)[:, ids.shape[1]:]
        for i in range(n):
            assert _tokens(g, i) == ref[i, : g.lengths[i]].tolist()


def test_top_k_top_p_temperature_match_generate(tiny_lm, tokenizer):
    s = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=8, temperature=0.7, top_k=20, top_p=0.9)
    ids = s.encode(PROMPTS[1], chat=True)
    g = s.generate(ids, 2, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    ref = tiny_lm.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=20, top_p=0.9,
                           temperature=0.7, max_new_tokens=8, num_return_sequences=2)[:, ids.shape[1]:]
    for i in range(2):
        assert _tokens(g, i) == ref[i, : g.lengths[i]].tolist()


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
    assert _tokens(g0, 0) == _ref_greedy(tiny_lm, ids, 6)


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
def test_smollm_greedy_and_sampling_equal_generate(smollm):
    model, tok = smollm
    s = PrelogitSampler(model, tok, max_new_tokens=16, decode="greedy")
    for p in PROMPTS:
        ids = s.encode(p, chat=True)
        assert _tokens(s.generate(ids, 1), 0) == _ref_greedy(model, ids, 16)
    s = PrelogitSampler(model, tok, max_new_tokens=16)
    ids = s.encode(PROMPTS[0], chat=True)
    g = s.generate(ids, 4, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(3)
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0, top_p=1.0,
                         temperature=1.0, max_new_tokens=16, num_return_sequences=4)[:, ids.shape[1]:]
    for i in range(4):
        assert _tokens(g, i) == ref[i, : g.lengths[i]].tolist()


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
    # at bf16 resolution (relative L2 error), not element by element.
    rel = (g.prelogits[0, : g.lengths[0]] - expected).norm(dim=-1) / expected.norm(dim=-1)
    # (measured: 0 at the prefill, about 0.01-0.02 after, from rounding through 30 bf16 layers)
    assert float(rel[0]) == 0.0 and float(rel.max()) < 0.05, rel
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
