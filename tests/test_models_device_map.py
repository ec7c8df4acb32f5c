"""``load_model(device_map="auto")`` and the sampler on a model placed by accelerate, on the CPU.

A tiny Llama (the recipe of tests/conftest.py, float32) is saved with ``save_pretrained`` and loaded
both ways. Without a GPU, accelerate's big-model loading puts every layer on the CPU: the same
weights and the same kernels as ``device_map=None``, i.e. the same computation, so logits and
generations are compared bit for bit.

A model spread over several devices needs GPUs; its code path (accelerate's hooks on every
module, the LM head's weights somewhere else than where it runs) is exercised here by
offloading the tiny Llama with accelerate's ``cpu_offload``: every module's weights then wait on
the meta device and its hook brings them in for each forward pass, so a sampler that took its
device from the LM head's weights would put its inputs on ``meta``.
"""

from __future__ import annotations

import pytest
import torch

from prelogit.checks import ParameterError
from prelogit.models import device_map_argument, load_model
from prelogit.sampling import PrelogitSampler, execution_device

PROMPTS = ["Hi there!", "What did you cook yesterday evening?"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_lm, tokenizer):
    """The tiny Llama of conftest.py in float32, written by save_pretrained with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def _generate(model, tokenizer, **kwargs):
    """Three sampled and one steered-and-recorded continuation per prompt (seeded per prompt)."""
    sampler = PrelogitSampler(model, tokenizer, max_new_tokens=6, max_rows=2)
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    control = [torch.full((3, 2, sampler.d), 0.5), None]
    return sampler, sampler.generate_many(PROMPTS, [3, 3], controls=control, generators=gens,
                                          record_prelogits=True, record_kl=True, **kwargs)


def _same(a, b) -> None:
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens) and x.texts == y.texts
        assert torch.equal(x.prelogits, y.prelogits) and torch.equal(x.kl, y.kl)


def test_device_map_argument():
    assert device_map_argument(None, "cuda") is None
    assert device_map_argument("auto", "cuda") == "auto"
    assert device_map_argument("auto", "cpu") == {"": "cpu"}  # device: cpu keeps the model off any GPU
    with pytest.raises(ParameterError, match="device_map must be null or 'auto'"):
        device_map_argument("balanced", "cuda")


def test_auto_device_map_gives_the_same_logits_and_samples(tiny_dir):
    plain, tok = load_model(str(tiny_dir), dtype="float32", device="cpu")
    auto, tok_auto = load_model(str(tiny_dir), dtype="float32", device="cpu", device_map="auto")
    assert not auto.training and tok_auto.padding_side == "left"
    assert {p.device.type for p in auto.parameters()} == {"cpu"}
    # One device, same weights, same kernels: the very same computation, hence bit-equal.
    assert torch.equal(_logits(plain, tok), _logits(auto, tok_auto))
    s_plain, g_plain = _generate(plain, tok)
    s_auto, g_auto = _generate(auto, tok_auto)
    assert s_auto.device == s_plain.device == torch.device("cpu")
    _same(g_plain, g_auto)
    assert all(g.tokens.shape[0] == 3 for g in g_auto)


def test_sampler_on_a_model_dispatched_with_hooks_matches_the_plain_model(tiny_dir):
    from accelerate import cpu_offload

    plain, tok = load_model(str(tiny_dir), dtype="float32", device="cpu")
    dispatched, _ = load_model(str(tiny_dir), dtype="float32", device="cpu")
    # Every module hooked, its weights on the meta device until its forward pass (what accelerate does
    # with the layers that do not fit on the GPUs under device_map="auto").
    dispatched = cpu_offload(dispatched, execution_device=torch.device("cpu"))
    head = dispatched.get_output_embeddings()
    assert hasattr(head, "_hf_hook") and head.weight.device.type == "meta"
    assert execution_device(head) == execution_device(dispatched.get_input_embeddings()) == torch.device("cpu")
    # The hooks reload the same weights before each pass: the same computation, hence bit-equal.
    assert torch.equal(_logits(plain, tok), _logits(dispatched, tok))
    _, g_plain = _generate(plain, tok)
    sampler, g_dispatched = _generate(dispatched, tok)
    assert sampler.device == torch.device("cpu")
    _same(g_plain, g_dispatched)
    # rows finishing at different steps go through the cache's row selection too
    _, greedy_plain = _generate(plain, tok, decode="greedy", max_new_tokens=12)
    _, greedy_dispatched = _generate(dispatched, tok, decode="greedy", max_new_tokens=12)
    _same(greedy_plain, greedy_dispatched)
