"""The embedded reward's training (:mod:`prelogit.reward_training`): VADER-labelled utterances, the
logistic head's fit (determinism, weight decay, input checks), a trained head's save/load round
trip and its agreement with VADER. Everything runs offline on the packaged MiniLM.
"""

from __future__ import annotations

import math

import pytest
import torch

from prelogit.checks import ParameterError
from prelogit.reward_training import train_reward_head, vader_labelled_utterances
from prelogit.rewards import EmbeddingHeadReward, MiniLMEncoder, load_head, vader_compound

POSITIVE = "I love this, what a wonderful and happy day! Thank you so much."
NEGATIVE = "This is awful. I hate it, everything is terrible and sad."


@pytest.fixture(scope="module")
def encoder() -> MiniLMEncoder:
    return MiniLMEncoder()


@pytest.fixture(scope="module")
def small_labelled(encoder):
    """200 VADER-labelled utterances and their embeddings (a few seconds to embed)."""
    texts, labels, compounds = vader_labelled_utterances(200, seed=0)
    return texts, labels, compounds, encoder.embed(texts)


# --- labelled utterances --------------------------------------------------------------------

def test_vader_labelled_utterances_balanced_thresholded_seeded():
    texts, labels, comp = vader_labelled_utterances(200, seed=3, threshold=0.4)
    assert len(texts) == 200 == len(set(texts)) and labels.shape == comp.shape == (200,)
    assert int(labels.sum()) == 100
    assert bool((comp[labels == 1] >= 0.4).all()) and bool((comp[labels == 0] <= -0.4).all())
    assert torch.allclose(comp, vader_compound(texts))
    again = vader_labelled_utterances(200, seed=3, threshold=0.4)
    assert again[0] == texts and torch.equal(again[1], labels)
    assert vader_labelled_utterances(200, seed=4, threshold=0.4)[0] != texts
    with pytest.raises(ParameterError, match="even"):
        vader_labelled_utterances(201, seed=0)


# --- the head's fit -----------------------------------------------------------------------------

def test_train_reward_head_is_deterministic(small_labelled, encoder):
    texts, labels, _, emb = small_labelled
    h1, m1 = train_reward_head(None, labels, None, seed=1, embeddings=emb)
    h2, m2 = train_reward_head(None, labels, None, seed=1, embeddings=emb)
    assert torch.equal(h1["weight"], h2["weight"]) and torch.equal(h1["bias"], h2["bias"])
    drop = ("embed_seconds", "fit_seconds")
    assert {k: v for k, v in m1.items() if k not in drop} == {k: v for k, v in m2.items() if k not in drop}
    assert m1["n_train"] + m1["n_val"] == 200 and m1["n_val"] == 40
    assert m1["train_positive_fraction"] == m1["val_positive_fraction"] == 0.5  # stratified split
    h3, _ = train_reward_head(None, labels, None, seed=2, embeddings=emb)
    assert not torch.equal(h1["weight"], h3["weight"])  # another seed, another split
    # Embedding the texts inside gives the same head as passing the embeddings.
    h4, _ = train_reward_head(texts[:60], labels[:60], encoder, seed=1)
    h5, _ = train_reward_head(None, labels[:60], None, seed=1, embeddings=emb[:60])
    # Not bit-equal: embedding 60 texts differs from embedding them among 200 (other batch-mates,
    # other padding) by float32 rounding, about 2e-7, which the fit amplifies to about 2e-6 on
    # weights of size up to ~4 (measured); 1e-4 leaves a wide margin.
    assert torch.allclose(h4["weight"], h5["weight"], atol=1e-4)


def test_train_reward_head_weight_decay_shrinks_logits(small_labelled):
    _, labels, _, emb = small_labelled
    _, loose = train_reward_head(None, labels, None, seed=0, weight_decay=1e-4, embeddings=emb)
    _, tight = train_reward_head(None, labels, None, seed=0, weight_decay=1e-2, embeddings=emb)
    assert tight["weight_norm"] < loose["weight_norm"] and tight["val_logit_std"] < loose["val_logit_std"]
    assert loose["val_logit_min"] < 0 < loose["val_logit_max"]


def test_train_reward_head_rejects_bad_input(small_labelled):
    _, labels, _, emb = small_labelled
    with pytest.raises(ParameterError, match="0 \\(negative\\) or 1"):
        train_reward_head(None, labels + 1, None, seed=0, embeddings=emb)
    with pytest.raises(ParameterError, match="shape"):
        train_reward_head(None, labels, None, seed=0, embeddings=emb[:10])
    with pytest.raises(ParameterError, match="class 1"):
        train_reward_head(None, torch.zeros(200, dtype=torch.long), None, seed=0, embeddings=emb)
    with pytest.raises(ParameterError, match="texts and an encoder"):
        train_reward_head(None, labels, None, seed=0)


def test_head_save_load_round_trip(small_labelled, encoder, tmp_path):
    _, labels, _, emb = small_labelled
    head, _ = train_reward_head(None, labels, None, seed=0, embeddings=emb)
    reward = EmbeddingHeadReward(encoder, head)
    path = reward.save_head(tmp_path / "sub" / "head.safetensors", metadata={"val_accuracy": 0.9})
    assert [p.name for p in path.parent.iterdir()] == ["head.safetensors"]  # no temporary left behind
    loaded = load_head(path)
    assert torch.equal(loaded["weight"], head["weight"]) and torch.equal(loaded["bias"], head["bias"])
    # safetensors hands back views into the file's buffer at arbitrary alignment; load_head copies
    # them into fresh storage, the layout of a head fresh from training (see rewards.head_logits).
    assert all(v.is_contiguous() and v.data_ptr() % 64 == 0 for v in loaded.values())
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["val_accuracy"] == "0.9" and f.metadata()["encoder"] == "all-MiniLM-L6-v2"
    prompts, responses = ["hi", "hi", "yo"], [POSITIVE, NEGATIVE, "fine I guess"]
    s = reward.score(prompts, responses)
    assert s.shape == (3,) and s.dtype == torch.float32
    # Exact: the loaded head has the same values and the same (aligned) layout, the same texts are
    # embedded in the same batches, and head_logits runs the same kernel. Before the heads were
    # copied into aligned storage this failed in the last bits (MKL's sgemv depends on alignment).
    assert torch.equal(EmbeddingHeadReward(encoder, str(path)).score(prompts, responses), s)
    # The prompt is ignored: only the response is scored.
    assert torch.equal(reward.score(["something else"] * 3, responses), s)
    # A text scored alone runs other kernels (encoder and head) than in a batch: equal up to float32
    # rounding. |s - s'| <= |w| |x - x'| + the rounding of a d-term dot product, about
    # sqrt(d) eps |w| |x| with |x| = 1; the embeddings' L2 distance measured <= 1.5e-6, allow 1e-5.
    single = torch.cat([reward.score(["hi"], [r]) for r in responses])
    tol = float(head["weight"].norm()) * (1e-5 + math.sqrt(encoder.dim) * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(single, s, rtol=0, atol=tol)



@pytest.mark.integration
def test_reward_head_agrees_with_vader_on_held_out(encoder):
    """1,000 balanced utterances, 200 held out. Measured 0.81-0.83 over four seeds (0.85 with 8,000)."""
    texts, labels, _ = vader_labelled_utterances(1000, seed=0)
    head, m = train_reward_head(texts, labels, encoder, seed=0)
    assert m["n_val"] == 200 and m["val_accuracy"] >= 0.75
    assert m["train_accuracy"] >= m["val_accuracy"] - 0.05
    reward = EmbeddingHeadReward(encoder, head)
    s = reward.score(["hi"] * 2, [POSITIVE, NEGATIVE])
    assert s[0] > 1.0 and s[1] < -1.0


# --- the dependency direction -------------------------------------------------------------------

def test_rewards_does_not_import_reward_training():
    """Only the prepare stage trains: a stage that scores with a trained head must not depend on the training."""
    from prelogit import deps

    names = {p.name for p in deps.closure(["prelogit.rewards"])}
    assert "rewards.py" in names and "reward_training.py" not in names
    assert "reward_training.py" in {p.name for p in deps.closure(["prelogit.reward_training"])}
