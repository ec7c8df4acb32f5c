"""Shared fixtures.

Unit tests use a tiny randomly initialised Llama built from a config (no weights) with the real
SmolLM2 tokenizer; integration tests (marked ``integration``) use the real embedded SmolLM2.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE = Path(os.environ.get("PRELOGIT_CACHE", ROOT / "models"))


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole session, as the pipeline uses (``model.threads``).

    Token-by-token decoding and the toy estimators run many small operations; with two threads
    on a busy 2-core machine each one waits for a thread hand-off (milliseconds).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The embedded SmolLM2 converted to an HF folder (converted once, about 25 s)."""
    from prelogit.models import convert_embedded_model

    return convert_embedded_model(MODEL_CACHE, "bfloat16")


@pytest.fixture(scope="session")
def tokenizer(smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir, local_files_only=True)
    tok.padding_side = "left"
    return tok


@pytest.fixture(scope="session")
def tiny_lm(tokenizer):
    """A 2-layer Llama with d = 32 and random weights (seeded), sharing SmolLM2's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="session")
def tiny_lm64(tiny_lm):
    """The tiny Llama in float64: there, two code paths that round differently cannot flip a draw,
    so token-for-token equality across batch compositions is a fair test."""
    import copy

    return copy.deepcopy(tiny_lm).double()


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    """The real SmolLM2-135M-Instruct (bf16) and its tokenizer."""
    from prelogit.models import load_model

    return load_model(str(smollm_dir), dtype="bfloat16")
