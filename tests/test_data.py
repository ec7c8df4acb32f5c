"""Prompts: chit-chat opening turns and utterances, splits, chat templating, and the HH-RLHF and
SHP loaders on small fixture files written in those datasets' own formats."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pytest

from prelogit.checks import ParameterError
from prelogit.data import (DataError, _chitchat, _normalise, _opening_text, chat_prompt, chitchat_opening_turns,
                           chitchat_openings, chitchat_utterances, dialogue_prompt, filter_by_length, load_hh_rlhf,
                           load_shp, parse_hh_dialogue, split_prompts)


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A real tokenizer without a chat template (MiniLM's BERT tokenizer)."""
    from transformers import AutoTokenizer

    from prelogit.rewards import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


# --- chit-chat ----------------------------------------------------------------------------------

def test_opening_turns_filtered_deduplicated_deterministic():
    turns = chitchat_opening_turns()
    assert len(turns) == 3650
    assert all(3 <= len(t.split()) <= 30 for t in turns)
    assert len({_normalise(t) for t in turns}) == len(turns)
    assert chitchat_opening_turns() == turns
    ids = [cid for cid, _ in chitchat_openings()]
    assert ids == sorted(ids)
    # The opening turn joins the first speaker's first message group.
    data = _chitchat()
    multi = next(cid for cid in ids if len(data[cid]["messages"][0]) > 1)
    group = data[multi]["messages"][0]
    assert _opening_text(data[multi]) == " ".join(" ".join(u["text"].split()) for u in group)
    short = chitchat_opening_turns(min_words=3, max_words=8)
    assert set(short) <= set(turns) and all(len(t.split()) <= 8 for t in short)
    with pytest.raises(ParameterError, match="max_words"):
        chitchat_opening_turns(min_words=5, max_words=4)


def test_chatterbot_questions_are_questions_deduplicated_deterministic_and_not_chitchat():
    from prelogit.data import chatterbot_questions

    qs = chatterbot_questions()
    assert qs == chatterbot_questions()  # the same order every time
    texts = [q for _, q in qs]
    assert len(texts) >= 128  # enough for the transfer stage's 128 test prompts
    assert all(t.endswith("?") and 3 <= len(t.split()) <= 30 and t == " ".join(t.split()) for t in texts)
    assert len({_normalise(t) for t in texts}) == len(texts)
    assert {"trivia", "coding"} <= {topic for topic, _ in qs}
    # a different distribution: hardly any question is also a chit-chat opening turn
    openings = {_normalise(t) for t in chitchat_opening_turns()}
    assert sum(_normalise(t) in openings for t in texts) <= len(texts) // 20
    short = chatterbot_questions(min_words=3, max_words=5)
    assert set(short) < set(qs) and all(len(q.split()) <= 5 for _, q in short)
    with pytest.raises(ParameterError, match="max_words"):
        chatterbot_questions(min_words=5, max_words=3)


def test_utterances_seeded_and_exclude_prompt_conversations():
    a = chitchat_utterances(500, seed=0)
    assert len(a) == 500 == len({t.lower() for t in a})
    assert a == chitchat_utterances(500, seed=0) and a != chitchat_utterances(500, seed=1)
    assert all(3 <= len(t.split()) <= 60 for t in a)

    # An utterance that occurs once in the whole corpus, in a conversation that opens with a prompt,
    # must be left out by default and come back when nothing is excluded.
    data = _chitchat()
    counts = Counter(" ".join(u["text"].split()).lower() for c in data.values() for g in c["messages"] for u in g)
    cid, prompt = chitchat_openings()[0]
    unique = next(" ".join(u["text"].split()) for g in data[cid]["messages"][1:] for u in g
                  if counts[" ".join(u["text"].split()).lower()] == 1 and 3 <= len(u["text"].split()) <= 60)
    default_pool = set(chitchat_utterances(None, seed=0))
    assert unique not in default_pool
    assert unique in set(chitchat_utterances(None, seed=0, exclude_prompts=()))
    assert unique not in set(chitchat_utterances(None, seed=0, exclude_prompts=[prompt.upper()]))
    with pytest.raises(DataError, match="only .* eligible"):
        chitchat_utterances(len(default_pool) + 1, seed=0)


# --- splits -------------------------------------------------------------------------------------

def test_split_prompts_disjoint_deterministic_nested():
    prompts = [f"prompt {i}" for i in range(100)]
    s = split_prompts(prompts, n_train=30, n_val=10, n_test=20, seed=7)
    assert [len(s[k]) for k in ("train", "val", "test")] == [30, 10, 20]
    assert not (set(s["train"]) & set(s["val"]) or set(s["train"]) & set(s["test"]) or set(s["val"]) & set(s["test"]))
    assert split_prompts(prompts, 30, 10, 20, seed=7) == s
    assert split_prompts(prompts, 30, 10, 20, seed=8)["test"] != s["test"]
    # The test set is drawn first: it does not move when the other splits change size.
    assert split_prompts(prompts, 70, 0, 20, seed=7)["test"] == s["test"]
    items = [{"id": str(i), "dialogue": []} for i in range(10)]
    assert len(split_prompts(items, 5, 0, 5, seed=0)["test"]) == 5


def test_split_prompts_errors():
    with pytest.raises(DataError, match="30 train \\+ 10 val \\+ 20 test = 60 prompts but only 50"):
        split_prompts([str(i) for i in range(50)], 30, 10, 20, seed=0)
    with pytest.raises(DataError, match="duplicates"):
        split_prompts(["a", "b", "a"], 1, 0, 1, seed=0)
    with pytest.raises(ParameterError, match="n_test"):
        split_prompts(["a"], 0, 0, -1, seed=0)


# --- templating -----------------------------------------------------------------------------------

def test_chat_prompt_uses_template(tokenizer):
    text = chat_prompt(tokenizer, "How was your weekend?")
    assert "<|im_start|>user\nHow was your weekend?<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    with_system = chat_prompt(tokenizer, "Hi", system="Be cheerful.")
    assert with_system.startswith("<|im_start|>system\nBe cheerful.<|im_end|>")


def test_chat_prompt_fallback_without_template(plain_tokenizer):
    assert chat_prompt(plain_tokenizer, "hello there") == "Human: hello there\n\nAssistant:"
    dialogue = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"}]
    assert dialogue_prompt(plain_tokenizer, dialogue) == "Human: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"


def test_dialogue_prompt_all_turns_in_order(tokenizer):
    dialogue = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "second question"}]
    text = dialogue_prompt(tokenizer, dialogue)
    positions = [text.index(t["content"]) for t in dialogue]
    assert positions == sorted(positions)
    assert "<|im_start|>assistant\nfirst answer<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(DataError, match="end with a user turn"):
        dialogue_prompt(tokenizer, dialogue[:2])
    with pytest.raises(DataError, match="role"):
        dialogue_prompt(tokenizer, [{"role": "bot", "content": "x"}, {"role": "user", "content": "y"}])


def test_filter_by_length_counts_the_templated_prompt(tokenizer, plain_tokenizer):
    items = [{"id": "short", "dialogue": [{"role": "user", "content": "hi"}]},
             {"id": "long", "dialogue": [{"role": "user", "content": "word " * 200}]}]
    n_short = len(tokenizer(chat_prompt(tokenizer, "hi"), add_special_tokens=False)["input_ids"])
    assert n_short > 5  # the template (system prompt included) is counted, not just "hi"
    assert [i["id"] for i in filter_by_length(items, tokenizer, n_short)] == ["short"]
    assert filter_by_length(items, tokenizer, n_short - 1) == []
    assert len(filter_by_length(items, tokenizer, 10_000)) == 2
    # Plain strings are user turns; the fallback format counts with the tokenizer's special tokens.
    n_plain = len(plain_tokenizer("Human: hi\n\nAssistant:")["input_ids"])
    assert filter_by_length(["hi", "hello " * 50], plain_tokenizer, n_plain) == ["hi"]


# --- HH-RLHF --------------------------------------------------------------------------------------

HH_ROWS = [
    {"chosen": "\n\nHuman: What is a good pasta recipe?\n\nAssistant: Try carbonara.\n\nHuman: How do I make it?"
               "\n\nAssistant: Cook the pasta, then mix eggs and cheese.",
     "rejected": "\n\nHuman: What is a good pasta recipe?\n\nAssistant: Try carbonara.\n\nHuman: How do I make it?"
                 "\n\nAssistant: I don't know."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?", "rejected": "\n\nHuman: Hi\n\nAssistant: What?"},
    {"chosen": "no markers here at all", "rejected": "nor here"},
]


def _write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text + "\n")  # a trailing blank line must be harmless


def test_parse_hh_cuts_at_last_assistant():
    dialogue, prompt_text = parse_hh_dialogue(HH_ROWS[0]["chosen"])
    assert prompt_text == ("\n\nHuman: What is a good pasta recipe?\n\nAssistant: Try carbonara."
                           "\n\nHuman: How do I make it?\n\nAssistant:")
    assert HH_ROWS[0]["chosen"].startswith(prompt_text)
    assert dialogue == [{"role": "user", "content": "What is a good pasta recipe?"},
                        {"role": "assistant", "content": "Try carbonara."},
                        {"role": "user", "content": "How do I make it?"}]
    assert parse_hh_dialogue(HH_ROWS[2]["chosen"]) is None
    assert parse_hh_dialogue("\n\nAssistant: a\n\nAssistant: b") is None  # no human turn before the cut


def test_load_hh_rlhf_file_folder_and_limit(tmp_path):
    _write_jsonl(tmp_path / "one.jsonl", HH_ROWS)
    with pytest.warns(UserWarning, match="skipped 1"):
        items = load_hh_rlhf(tmp_path / "one.jsonl")
    assert [i["id"] for i in items] == ["one:0", "one:1"]
    assert items[1]["prompt_text"] == "\n\nHuman: Hi\n\nAssistant:"
    assert items[1]["dialogue"] == [{"role": "user", "content": "Hi"}]

    # The hub repository's layout: one folder per subset, gzipped splits; only the split asked for is read.
    root = tmp_path / "hh"
    _write_jsonl(root / "helpful-base" / "test.jsonl.gz", HH_ROWS[:2], gz=True)
    _write_jsonl(root / "harmless-base" / "test.jsonl.gz", HH_ROWS[1:2], gz=True)
    _write_jsonl(root / "harmless-base" / "train.jsonl.gz", HH_ROWS[:2] * 5, gz=True)
    items = load_hh_rlhf(root, split="test")
    assert [i["id"] for i in items] == ["harmless-base/test:0", "helpful-base/test:0", "helpful-base/test:1"]
    assert len(load_hh_rlhf(root, split="train")) == 10
    assert len(load_hh_rlhf(root, split="train", limit=3)) == 3


def test_load_hh_rlhf_errors(tmp_path):
    with pytest.raises(DataError, match="no test file"):
        load_hh_rlhf(tmp_path)
    with pytest.raises(DataError, match="neither an existing file"):
        load_hh_rlhf(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="neither an existing file"):
        load_shp("data/test.json")  # relative, looks like org/name, but is a file name
    _write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match="no 'chosen' field"):
        load_hh_rlhf(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"chosen": "a"}\n{not json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_hh_rlhf(tmp_path / "broken.jsonl")
    # A hub id: without the datasets package, or with it but the hub unreachable, a clear error.
    with pytest.raises(DataError, match="datasets|hub"):
        load_hh_rlhf("Anthropic/hh-rlhf-not-here")


# --- SHP ------------------------------------------------------------------------------------------

def _shp_row(post_id, history, a="ref A", b="ref B", domain="askculinary"):
    return {"post_id": post_id, "domain": domain, "upvote_ratio": 0.98, "history": history,
            "c_root_id_A": "x", "c_root_id_B": "y", "created_at_utc_A": 1, "created_at_utc_B": 2,
            "score_A": 10, "score_B": 3, "human_ref_A": a, "human_ref_B": b, "labels": 1,
            "seconds_difference": 1.0, "score_ratio": 3.3}


def test_load_shp_deduplicates_by_post(tmp_path):
    rows = [_shp_row("p1", "  How long do I boil an egg? "), _shp_row("p1", "DUPLICATE", a="other"),
            _shp_row("p2", "Why does bread go stale?"), _shp_row("p1", "DUPLICATE again")]
    _write_jsonl(tmp_path / "askculinary" / "test.json", rows)
    _write_jsonl(tmp_path / "askphysics" / "test.json", [_shp_row("p3", "Why is the sky blue?", domain="askphysics")])
    _write_jsonl(tmp_path / "askphysics" / "validation.json", [_shp_row("p4", "not in test")])
    items = load_shp(tmp_path / "askculinary" / "test.json")
    assert [i["id"] for i in items] == ["p1", "p2"]
    assert items[0]["prompt_text"] == "Human: How long do I boil an egg? Assistant:"
    assert items[0]["dialogue"] == [{"role": "user", "content": "How long do I boil an egg?"}]
    assert [i["id"] for i in load_shp(tmp_path)] == ["p1", "p2", "p3"]
    assert [i["id"] for i in load_shp(tmp_path, limit=1)] == ["p1"]
    assert [i["id"] for i in load_shp(tmp_path, split="validation")] == ["p4"]
    # A file holding one JSON array is read too.
    (tmp_path / "array.json").write_text(json.dumps(rows))
    assert [i["id"] for i in load_shp(tmp_path / "array.json")] == ["p1", "p2"]
    _write_jsonl(tmp_path / "bad" / "test.json", [{"post_id": "p"}])
    with pytest.raises(DataError, match="lacks 'post_id' or 'history'"):
        load_shp(tmp_path / "bad")


def test_loaders_feed_the_templates(tmp_path, tokenizer):
    _write_jsonl(tmp_path / "hh.jsonl", HH_ROWS[:2])
    items = load_hh_rlhf(tmp_path / "hh.jsonl")
    text = dialogue_prompt(tokenizer, items[0]["dialogue"])
    assert "Try carbonara." in text and text.endswith("<|im_start|>assistant\n")
    assert [i["id"] for i in filter_by_length(items, tokenizer, 40)] == ["hh:1"]
