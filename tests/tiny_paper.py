"""Tiny stand-ins for the paper-scale assets, built from configs in a given folder (not a test module).

:func:`build` writes, under a folder:

- ``lm/``: a 2-layer Llama causal LM (d = 32, random seeded weights, float32) with SmolLM2's
  tokenizer, as ``save_pretrained`` writes a hub checkpoint;
- ``reward/``: a 2-layer ``LlamaForSequenceClassification`` with one label (the reward) and the
  same tokenizer, its pad token set (decoder classifiers find each row's last token through it);
- ``hh-rlhf.jsonl``: made-up dialogues in Anthropic/hh-rlhf's format (``chosen``/``rejected``
  transcripts of "\\n\\nHuman: ...\\n\\nAssistant: ..." turns), read by ``prepare.source: hh_rlhf``;
- ``params.yaml``: every section, from the notebooks' smoke parameters, pointed at the three.

With them ``python -m prelogit.paper --params <folder>/params.yaml --no-hub-check`` runs the
paper-scale path (hub-format model and reward, HH-RLHF prompts) on a CPU in minutes.
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import torch
import yaml

#: Made-up HH-RLHF-style exchanges: (earlier turns, the last human turn, chosen reply, rejected reply).
DIALOGUES = [
    ([], "How do I keep basil alive on a windowsill?", "Water it when the soil is dry and give it sun.", "Buy more."),
    ([], "What is a good name for a grey cat?", "Maybe Smokey or Ash.", "Cat."),
    ([], "Can you suggest a quick breakfast?", "Oats with banana take five minutes.", "No."),
    ([("Human", "I want to start running."), ("Assistant", "Great, how far can you run now?")],
     "About one kilometre.", "Add a few hundred metres each week.", "Run a marathon tomorrow."),
    ([], "Why is the sky blue?", "Air scatters blue light more than red light.", "It just is."),
    ([], "How do I say thank you in Italian?", "Grazie.", "Thank you."),
    ([], "What should I pack for a day hike?", "Water, snacks, a map and a jacket.", "Nothing."),
    ([("Human", "My code has a bug."), ("Assistant", "What does the error say?")],
     "It says index out of range.", "A loop probably runs one step too far.", "Delete the code."),
    ([], "Is it safe to eat raw cookie dough?", "Raw eggs and flour carry some risk, so better not.", "Sure."),
    ([], "How many legs does a spider have?", "Eight.", "Six."),
    ([], "Give me a tip for better sleep.", "Keep the same bedtime every night.", "Drink coffee late."),
    ([], "What rhymes with moon?", "Spoon, tune and June.", "Sun."),
    ([], "How do I boil an egg?", "Cover it with water, boil, then simmer nine minutes.", "Microwave it."),
    ([], "Recommend a board game for four people.", "Ticket to Ride is easy to learn.", "Chess."),
]


def _transcript(turns: list[tuple[str, str]], human: str, reply: str) -> str:
    """An hh-rlhf transcript: every turn as "\\n\\nRole: text", ending with the assistant's reply."""
    return "".join(f"\n\n{role}: {text}" for role, text in [*turns, ("Human", human), ("Assistant", reply)])


def write_hh_rlhf(path: Path) -> Path:
    """The dialogues of :data:`DIALOGUES` as hh-rlhf JSONL rows ``{"chosen", "rejected"}``."""
    with open(path, "w", encoding="utf-8") as f:
        for turns, human, chosen, rejected in DIALOGUES:
            f.write(json.dumps({"chosen": _transcript(turns, human, chosen),
                                "rejected": _transcript(turns, human, rejected)}) + "\n")
    return path


def _config(tokenizer, **extra):
    """The tiny Llama of tests/conftest.py (2 layers, d = 32) over the tokenizer's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, **extra)


def write_tiny_lm(folder: Path, tokenizer_dir: str | Path, seed: int = 0) -> Path:
    """A tiny random Llama causal LM in float32 with the tokenizer of ``tokenizer_dir``, saved to ``folder``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(tok, tie_word_embeddings=True)).to(torch.float32).eval()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_tiny_reward(folder: Path, tokenizer_dir: str | Path, seed: int = 1) -> Path:
    """A tiny random LlamaForSequenceClassification (one label: the reward) with the tokenizer, pad token set.

    Two choices make its rewards differ between responses as a trained reward model's do (the
    stages check, e.g., that RE-Control's value function fits them better than their mean):
    the tokenizer has no chat template, so a pair is read as "Human: ...\n\nAssistant: ..." and the
    score is taken at the response's own last token (a template would end every pair with the same
    "<|im_end|>" token, whose state a random 2-layer model barely changes with the context); and
    the score head's weights have standard deviation 1 rather than 0.02, so rewards are O(1).
    """
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = None
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_config(tok, num_labels=1)).to(torch.float32).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_params(smoke: dict, lm: Path, reward: Path, data: Path) -> dict:
    """The smoke parameters (every section) pointed at the tiny model, reward and HH-RLHF file.

    The splits take 4 + 4 + 3 of the 14 dialogues (the tune stage reads its smoke 2 + 2 held out); 96 prompt tokens leave room for SmolLM2's chat
    template and its system prompt (about 30 tokens) and a two-turn dialogue.
    """
    p = copy.deepcopy(smoke)
    p["model"].update({"name": str(lm), "dtype": "float32", "device": "cpu", "threads": 1, "device_map": None})
    p["reward"] = {"kind": "hf", "name": str(reward), "dtype": "float32"}
    p["prepare"].update({"source": "hh_rlhf", "source_path": str(data), "n_train": 4, "n_val": 4, "n_test": 3,
                         "max_prompt_tokens": 96})
    p["launch"] = {"launcher": "python", "num_processes": 1, "config_file": None}
    return p


def build(folder: Path, tokenizer_dir: str | Path, smoke: dict) -> Path:
    """Write the tiny model, reward model, data file and ``params.yaml`` under ``folder``; return the params file."""
    folder.mkdir(parents=True, exist_ok=True)
    lm = write_tiny_lm(folder / "lm", tokenizer_dir)
    reward = write_tiny_reward(folder / "reward", tokenizer_dir)
    data = write_hh_rlhf(folder / "hh-rlhf.jsonl")
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(tiny_params(smoke, lm, reward, data), sort_keys=False))
    return path


def commit_all(repo: Path) -> None:
    """``git init`` and one commit of everything: DVC experiments are recorded against a commit."""
    for cmd in (["init", "-q"], ["config", "user.name", "prelogit tests"], ["config", "user.email", "tests@localhost"],
                ["add", "-A"], ["commit", "-q", "-m", "the repository under test"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)
