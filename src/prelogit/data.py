"""Prompts: chit-chat opening turns (the embedded default), ChatterBot questions (the second
distribution) and the paper's HH-RLHF and SHP.

The embedded prompts come from the PyPI package ``chitchat-dataset`` (7,168 conversations): the
opening turn of the first speaker of each conversation, as a user would open a chat. The second
distribution's come from ``chatterbot-corpus``: the questions that open its English Q/A
conversations (trivia, programming, computers, ...), which are not chit-chat.

HH-RLHF and SHP are read in their public formats, from a local file or folder (no network), or
through the ``datasets`` package from the hub when that package is installed and the hub is
reachable. Every loader returns items ``{"id", "dialogue", "prompt_text"}``: ``dialogue`` is a list
of ``{"role", "content"}`` turns ending with a user turn, to be rendered per model with
:func:`dialogue_prompt`; ``prompt_text`` is the dataset's own "Human: ... Assistant:" text.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .checks import ParameterError, check_number

HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


class DataError(ParameterError):
    """A data source is missing, malformed or too small; the message says how to fix it."""


# ---------------------------------------------------------------------------------------------
# Chit-chat (embedded)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _chitchat() -> dict[str, dict]:
    """conversation id -> conversation, loaded once (about 0.7 s). Treat as read-only."""
    try:
        import chitchat_dataset
    except ImportError as err:
        raise DataError("the embedded prompts need the PyPI package chitchat-dataset; "
                        "install it with: pip install chitchat-dataset==0.9.0") from err
    return dict(chitchat_dataset.Dataset())


def _normalise(text: str) -> str:
    """Case- and whitespace-insensitive key for deduplication."""
    return " ".join(text.lower().split())


def _opening_text(conversation: dict) -> str:
    """The first speaker's first message group, its utterances joined with a space."""
    messages = conversation.get("messages") or []
    if not messages:
        return ""
    return " ".join(" ".join(u["text"].split()) for u in messages[0] if u.get("text", "").strip())


def chitchat_openings(min_words: int = 3, max_words: int = 30) -> list[tuple[str, str]]:
    """``(conversation_id, opening turn)`` for every conversation whose opening turn qualifies.

    The opening turn is the first message group of the first speaker, its utterances joined with a
    space. It qualifies when it has between ``min_words`` and ``max_words`` words (dropping bare
    greetings such as "Hello?" and multi-paragraph stories); case-insensitive duplicates keep the
    first conversation in id order. Sorted by conversation id, so the order never changes.
    """
    check_number("min_words", min_words, low=1, integer=True)
    check_number("max_words", max_words, low=min_words, integer=True)
    return list(_openings(min_words, max_words))


@functools.lru_cache(maxsize=4)
def _openings(min_words: int, max_words: int) -> tuple[tuple[str, str], ...]:
    data = _chitchat()
    seen: set[str] = set()
    out = []
    for cid in sorted(data):
        text = _opening_text(data[cid])
        if not min_words <= len(text.split()) <= max_words:
            continue
        key = _normalise(text)
        if key in seen:
            continue
        seen.add(key)
        out.append((cid, text))
    return tuple(out)


def chitchat_opening_turns(min_words: int = 3, max_words: int = 30) -> list[str]:
    """Opening user turns of chit-chat conversations (3,650 with the defaults), deterministic order.

    See :func:`chitchat_openings` for the rule.
    """
    return [text for _, text in chitchat_openings(min_words, max_words)]


def chitchat_utterances(n: int | None, seed: int, exclude_prompts: Iterable[str] | None = None,
                        min_words: int = 3, max_words: int = 60) -> list[str]:
    """A seeded random sample of single chit-chat utterances, for training the reward head.

    Leakage rule: utterances are drawn only from conversations that do not open with a prompt.
    With ``exclude_prompts=None`` (default) the excluded prompts are all of
    :func:`chitchat_opening_turns` with its default filter, i.e. every conversation that could
    supply a prompt under default settings is left out, whatever the split (2,985 conversations
    and 89,831 distinct utterances remain). Pass the prompts actually used to exclude exactly
    their conversations, or ``()`` to use every conversation. A conversation is excluded when its
    opening turn matches an excluded prompt case- and whitespace-insensitively.

    Args:
        n: utterances to return; None returns the whole eligible pool, shuffled.
        seed: fixes the draw.
        exclude_prompts: see above.
        min_words, max_words: keep utterances of this many words (short replies like "lol" carry
            little to learn from; long monologues are unlike a model's reply).
    Returns:
        n distinct utterances (case-insensitively), whitespace-normalised, in seeded random order.
    """
    check_number("seed", seed, integer=True)
    check_number("min_words", min_words, low=1, integer=True)
    check_number("max_words", max_words, low=min_words, integer=True)
    prompts = chitchat_opening_turns() if exclude_prompts is None else exclude_prompts
    pool = _utterance_pool(frozenset(_normalise(p) for p in prompts), min_words, max_words)
    order = np.random.default_rng(seed).permutation(len(pool))
    if n is None:
        return [pool[i] for i in order]
    check_number("n", n, low=0, integer=True)
    if n > len(pool):
        raise DataError(f"asked for {n} utterances but only {len(pool)} are eligible; lower n or exclude fewer prompts")
    return [pool[i] for i in order[:n]]


@functools.lru_cache(maxsize=4)
def _utterance_pool(excluded_openings: frozenset[str], min_words: int, max_words: int) -> tuple[str, ...]:
    """Distinct utterances of the conversations not excluded, in conversation-id order."""
    data = _chitchat()
    seen: set[str] = set()
    pool = []
    for cid in sorted(data):
        if _normalise(_opening_text(data[cid])) in excluded_openings:
            continue
        for group in data[cid]["messages"]:
            for utt in group:
                text = " ".join(utt.get("text", "").split())
                key = text.lower()
                if min_words <= len(text.split()) <= max_words and key not in seen:
                    seen.add(key)
                    pool.append(text)
    return tuple(pool)


# ---------------------------------------------------------------------------------------------
# ChatterBot questions (the second prompt distribution)
# ---------------------------------------------------------------------------------------------

def chatterbot_questions(min_words: int = 3, max_words: int = 30) -> list[tuple[str, str]]:
    """``(topic, question)`` for every English ChatterBot conversation that opens with a question.

    A question is the conversation's first line when it ends with "?" and has between ``min_words``
    and ``max_words`` words; case- and whitespace-insensitive duplicates keep the first, in the
    order of the sorted topic files and of the conversations in each (394 with the defaults, from
    ``chatterbot-corpus==1.3.3``, mostly trivia and programming). Deterministic order.
    """
    check_number("min_words", min_words, low=1, integer=True)
    check_number("max_words", max_words, low=min_words, integer=True)
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the second prompt distribution needs the PyPI package chatterbot-corpus; install it with: "
                        "pip install --no-deps chatterbot-corpus==1.3.3 (make setup does)")
    folder = Path(spec.submodule_search_locations[0]) / "data" / "english"
    seen: set[str] = set()
    out = []
    for path in sorted(folder.glob("*.yml")):
        for conversation in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            first = conversation[0] if conversation and isinstance(conversation[0], str) else ""
            text = " ".join(first.split())
            if not text.endswith("?") or not min_words <= len(text.split()) <= max_words:
                continue
            key = _normalise(text)
            if key not in seen:
                seen.add(key)
                out.append((path.stem, text))
    if not out:
        raise DataError(f"no ChatterBot questions found under {folder}; reinstall chatterbot-corpus==1.3.3")
    return out


def split_prompts(prompts: Sequence[Any], n_train: int, n_val: int, n_test: int, seed: int) -> dict[str, list]:
    """Seeded, disjoint train / val / test subsets of ``prompts``.

    The test set is drawn first, then val, then train, from one seeded permutation, so the test set
    for a given seed stays the same when n_train or n_val change. Items are strings or dicts with
    an ``"id"``; duplicates are an error because they would break disjointness.
    """
    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        check_number(name, value, low=0, integer=True)
    check_number("seed", seed, integer=True)
    keys = [p["id"] if isinstance(p, dict) else p for p in prompts]
    if len(set(keys)) != len(keys):
        raise DataError("prompts contain duplicates; deduplicate them before splitting")
    need = n_train + n_val + n_test
    if need > len(prompts):
        raise DataError(f"asked for {n_train} train + {n_val} val + {n_test} test = {need} prompts but only "
                        f"{len(prompts)} are available; lower the split sizes or loosen the prompt filter")
    order = np.random.default_rng(seed).permutation(len(prompts))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:need]
    return {"train": [prompts[i] for i in train], "val": [prompts[i] for i in val],
            "test": [prompts[i] for i in test]}


# ---------------------------------------------------------------------------------------------
# Chat templating
# ---------------------------------------------------------------------------------------------

def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def dialogue_prompt(tokenizer: Any, dialogue: Sequence[dict[str, str]], system: str | None = None) -> str:
    """Render a dialogue (``{"role", "content"}`` turns ending with a user turn) for generation.

    Uses the tokenizer's chat template with ``add_generation_prompt=True``; a tokenizer without
    one gets ``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"``.
    """
    turns = list(dialogue)
    if not turns or turns[-1].get("role") != "user":
        raise DataError("a dialogue to answer must end with a user turn")
    for turn in turns:
        if turn.get("role") not in ("user", "assistant", "system") or not isinstance(turn.get("content"), str):
            raise DataError(f"dialogue turns must be {{'role': user|assistant|system, 'content': str}}, got {turn!r}")
    if system is not None:
        turns = [{"role": "system", "content": system}] + turns
    if _has_template(tokenizer):
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises its own TemplateError for e.g. an unsupported system turn
            raise DataError(f"the tokenizer's chat template rejected the dialogue ({err}); "
                            "drop the system prompt or use a model whose template supports it") from err
    parts = []
    for turn in turns:
        if turn["role"] == "system":
            parts.append(turn["content"])
        else:
            parts.append(f"{'Human' if turn['role'] == 'user' else 'Assistant'}: {turn['content']}")
    return "\n\n".join(parts) + "\n\nAssistant:"


def chat_prompt(tokenizer: Any, user_text: str, system: str | None = None) -> str:
    """Render one user turn for generation (chat template, or ``"Human: ...\\n\\nAssistant:"``)."""
    return dialogue_prompt(tokenizer, [{"role": "user", "content": user_text}], system=system)


def filter_by_length(items: Sequence[Any], tokenizer: Any, max_prompt_tokens: int, system: str | None = None) -> list:
    """Keep the items whose rendered prompt has at most ``max_prompt_tokens`` tokens.

    Items are loader dicts (with ``"dialogue"``) or plain user-turn strings; the length counted is
    that of the prompt this tokenizer's model will actually see, chat template included.
    """
    check_number("max_prompt_tokens", max_prompt_tokens, low=1, integer=True)
    kept = []
    for item in items:
        dialogue = item["dialogue"] if isinstance(item, dict) else [{"role": "user", "content": item}]
        text = dialogue_prompt(tokenizer, dialogue, system=system)
        # The rendered template already holds BOS etc.; the fallback does not.
        n_tokens = len(tokenizer(text, add_special_tokens=not _has_template(tokenizer))["input_ids"])
        if n_tokens <= max_prompt_tokens:
            kept.append(item)
    return kept


# ---------------------------------------------------------------------------------------------
# The paper's datasets
# ---------------------------------------------------------------------------------------------

def _read_json_rows(path: Path) -> Iterator[dict]:
    """Rows of a JSONL file (optionally gzipped), streamed; a file holding one JSON array also works."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        first = True
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if first and line.lstrip().startswith("["):
                f.seek(0)
                yield from json.loads(f.read())
                return
            first = False
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {lineno} is not valid JSON ({err.msg}); expected one JSON object "
                                "per line") from err


def _split_files(folder: Path, split: str, suffixes: Sequence[str]) -> list[Path]:
    files = sorted(p for suf in suffixes for p in folder.rglob(f"{split}{suf}") if p.is_file())
    if not files:
        raise DataError(f"no {split} file ({' / '.join(split + s for s in suffixes)}) under {folder}; "
                        "check the folder and the split name")
    return files


def _rows(path_or_name: str | os.PathLike, split: str, suffixes: Sequence[str],
          dataset: str) -> Iterator[tuple[str, dict]]:
    """``(row id, row)`` from a local file, a local folder (every ``<split><suffix>`` below it) or the hub."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        for i, row in enumerate(_read_json_rows(path)):
            yield f"{path.name.split('.')[0]}:{i}", row
        return
    if path.is_dir():
        for file in _split_files(path, split, suffixes):
            rel = file.relative_to(path).as_posix().split(".")[0]
            for i, row in enumerate(_read_json_rows(file)):
                yield f"{rel}:{i}", row
        return
    name = str(path_or_name)
    if name.startswith((".", "/", "~")) or name.count("/") != 1 or path.suffix in (".json", ".jsonl", ".gz"):
        raise DataError(f"{name!r} is neither an existing file or folder nor a hub id 'org/name'; "
                        f"download {dataset} and pass its local path")
    try:
        import datasets
    except ImportError as err:
        raise DataError(f"{name!r} is not a local path; reading it from the hub needs the 'datasets' package "
                        f"(pip install datasets) and hub access, or download {dataset} and pass its local path") from err
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types for offline / missing / gated
        raise DataError(f"could not load {name!r} split {split!r} from the hub ({err.__class__.__name__}: {err}); "
                        f"check hub access, or download {dataset} and pass its local path") from err
    for i, row in enumerate(ds):
        yield f"{split}:{i}", row


def parse_hh_dialogue(text: str) -> tuple[list[dict[str, str]], str] | None:
    """Cut an HH-RLHF transcript at its last ``"\\n\\nAssistant:"``.

    Returns ``(dialogue, prompt_text)``: the turns before the cut (ending with a user turn) and the
    transcript up to and including the last ``"\\n\\nAssistant:"``; None if the transcript has no
    assistant marker or the turns before it do not end with a human turn.
    """
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        return None
    prompt_text = text[:cut + len(HH_ASSISTANT)]
    pieces = _HH_TURN.split(text[:cut])
    # pieces = [preamble, role, content, role, content, ...]
    dialogue = [{"role": _ROLES[role], "content": content.strip()}
                for role, content in zip(pieces[1::2], pieces[2::2])]
    if not dialogue or dialogue[-1]["role"] != "user":
        return None
    if pieces[0].strip():  # text before the first marker belongs to the first human turn
        dialogue[0]["content"] = (pieces[0].strip() + "\n\n" + dialogue[0]["content"]).strip()
    return dialogue, prompt_text


def load_hh_rlhf(path_or_name: str | os.PathLike, split: str = "test", limit: int | None = None) -> list[dict]:
    """Prompts of Anthropic/hh-rlhf: each row's ``chosen`` cut at its last ``"\\n\\nAssistant:"``.

    Args:
        path_or_name: a JSONL(.gz) file, a folder (every ``<split>.jsonl[.gz]`` below it, as in the
            hub repository's subsets, sorted by path), or a hub id read with ``datasets``.
        split: which split file(s) to read from a folder or the hub.
        limit: stop after this many prompts.
    Returns:
        ``[{"id", "dialogue", "prompt_text"}]``; rows whose transcript cannot be cut are skipped
        with a warning giving their number.
    """
    if limit is not None:
        check_number("limit", limit, low=1, integer=True)
    out, skipped = [], 0
    for rid, row in _rows(path_or_name, split, (".jsonl", ".jsonl.gz"), "Anthropic/hh-rlhf"):
        if "chosen" not in row:
            raise DataError(f"row {rid} of {path_or_name} has no 'chosen' field; is this the hh-rlhf format?")
        parsed = parse_hh_dialogue(row["chosen"])
        if parsed is None:
            skipped += 1
            continue
        dialogue, prompt_text = parsed
        out.append({"id": rid, "dialogue": dialogue, "prompt_text": prompt_text})
        if limit is not None and len(out) >= limit:
            break
    if skipped:
        warnings.warn(f"skipped {skipped} hh-rlhf row(s) without a human turn before the last Assistant:", stacklevel=2)
    return out


def load_shp(path_or_name: str | os.PathLike, split: str = "test", limit: int | None = None) -> list[dict]:
    """Prompts of stanfordnlp/SHP: one per post (first occurrence of each ``post_id``).

    Args:
        path_or_name: a JSONL file, a folder (every ``<split>.json[l]`` below it, as in the hub
            repository's per-domain folders, sorted by path), or a hub id read with ``datasets``.
        split: which split file(s) to read.
        limit: stop after this many posts.
    Returns:
        ``[{"id": post_id, "dialogue": [user turn = the post], "prompt_text": "Human: {history} Assistant:"}]``.
    """
    if limit is not None:
        check_number("limit", limit, low=1, integer=True)
    out, seen = [], set()
    for rid, row in _rows(path_or_name, split, (".json", ".jsonl", ".jsonl.gz"), "stanfordnlp/SHP"):
        if "post_id" not in row or "history" not in row:
            raise DataError(f"row {rid} of {path_or_name} lacks 'post_id' or 'history'; is this the SHP format?")
        if row["post_id"] in seen:
            continue
        seen.add(row["post_id"])
        history = row["history"].strip()
        out.append({"id": row["post_id"], "dialogue": [{"role": "user", "content": history}],
                    "prompt_text": f"Human: {history} Assistant:"})
        if limit is not None and len(out) >= limit:
            break
    return out
