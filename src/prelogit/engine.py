"""The generation engine every method shares: per-prompt RNG, prefill, generation, scoring and best-of-N.

AISP (:mod:`prelogit.aisp`), MISVO (:mod:`prelogit.misvo`) and the non-adaptive samplers
(:mod:`prelogit.samplers`) all run on these few calls, so that every method is charged the same way
(:class:`prelogit.metrics.CostMeter`) and draws its randomness the same way:

- :func:`prompt_generator`: the RNG of one prompt, derived from (seed, prompt id) alone, so a
  prompt's draws do not depend on its batch, its position or its process;
- :func:`prefill`, :func:`generate`, :func:`score`: one sampler or reward call for all prompts,
  its wall-clock shared out to each prompt's meter;
- :func:`run_best_of_n_many`: best-of-N, the baseline every method is compared with at equal N.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from .checks import ParameterError, check_number
from .metrics import CostMeter
from .records import BestOfNRecord
from .rewards import RewardModel, check_scores
from .sampling import Generation, Prefill, PrelogitSampler


def prompt_generator(seed: int, key: int | str) -> torch.Generator:
    """The RNG of one prompt under run seed ``seed``; ``key`` is the prompt's id (or index).

    Derived from (seed, key) alone, by hashing, so a prompt's draws do not depend on its position
    in a list, on the other prompts of its batch, or on the process it runs in.
    """
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def check_prompt_lists(prompts: Sequence[str], user_texts: Sequence[str], generators: Sequence) -> None:
    if isinstance(prompts, str) or isinstance(user_texts, str):
        raise ParameterError("prompts and user_texts must be lists of strings, not a single string")
    if not (len(prompts) == len(user_texts) == len(generators)) or not prompts:
        raise ParameterError(f"give one user text and one generator per prompt: {len(prompts)} prompts, "
                             f"{len(user_texts)} user texts, {len(generators)} generators")


def generate(sampler: PrelogitSampler, pre: Prefill, counts: list[int], meters: list[CostMeter],
             **kwargs: Any) -> list[Generation]:
    """One sampler call for all prompts; its wall-clock is shared out by generated tokens."""
    t0 = time.perf_counter()
    gens = sampler.generate_many(pre, counts, **kwargs)
    seconds = time.perf_counter() - t0
    total = sum(g.new_tokens for g in gens) or 1
    for g, m in zip(gens, meters):
        m.add_generation(g)
        m.time_generation_s += seconds * g.new_tokens / total
    return gens


def score(reward: RewardModel, user_texts: Sequence[str], gens: list[Generation], meters: list[CostMeter]) -> list[torch.Tensor]:
    """One reward call on every prompt's responses; returns each prompt's scores (float32)."""
    prompts = [u for u, g in zip(user_texts, gens) for _ in g.texts]
    texts = [t for g in gens for t in g.texts]
    t0 = time.perf_counter()
    scores = reward.score(prompts, texts)
    seconds = time.perf_counter() - t0
    scores = check_scores(scores, len(texts), getattr(reward, "name", type(reward).__name__))
    out, start = [], 0
    for g, m in zip(gens, meters):
        out.append(scores[start:start + len(g.texts)])
        start += len(g.texts)
        m.add_scored(len(g.texts))
        m.time_reward_s += seconds * len(g.texts) / max(len(texts), 1)
    return out


def prefill(sampler: PrelogitSampler, prompts: Sequence[str], meters: list[CostMeter]) -> Prefill:
    """The prompts' shared prefill, charged as one forward call (and its time) to each prompt."""
    t0 = time.perf_counter()
    pre = sampler.prefill(prompts)
    seconds = time.perf_counter() - t0
    for m in meters:
        m.forward_calls += 1
        m.time_generation_s += seconds / len(meters)
    return pre


def run_best_of_n_many(sampler: PrelogitSampler, reward: RewardModel, prompts: Sequence[str],
                       user_texts: Sequence[str], N: int, generators: Sequence[torch.Generator],
                       batch_size: int | None = None) -> list[BestOfNRecord]:
    """Best-of-N on several prompts at once: N base-model samples each (no control), keep the highest reward.

    Every prompt's samples are generated in one sampler call (micro-batched by the sampler) and
    scored in one reward call; ``batch_size`` (default N) splits each prompt's N samples into
    several such calls. The record keeps every sample's reward and response, so that best-of-N'
    for any N' <= N can be estimated from the same draws (:func:`prelogit.metrics.expected_best_of_n`).
    """
    check_number("N", N, low=1, integer=True)
    batch_size = batch_size or N
    check_number("batch_size", batch_size, low=1, integer=True)
    check_prompt_lists(prompts, user_texts, generators)
    P = len(prompts)
    meters = [CostMeter() for _ in range(P)]
    pre = prefill(sampler, prompts, meters)
    texts: list[list[str]] = [[] for _ in range(P)]
    lengths: list[list[int]] = [[] for _ in range(P)]
    rewards: list[list[torch.Tensor]] = [[] for _ in range(P)]
    for start in range(0, N, batch_size):
        m = min(batch_size, N - start)
        gens = generate(sampler, pre, [m] * P, meters, generators=generators)
        for p, s in enumerate(score(reward, user_texts, gens, meters)):
            rewards[p].append(s)
            texts[p] += gens[p].texts
            lengths[p] += gens[p].lengths.tolist()
    out: list[BestOfNRecord] = []
    for p in range(P):
        r = torch.cat(rewards[p])
        i = int(torch.argmax(r))
        out.append({"method": "bon", "N": N, "samples_used": N, "rewards": r.tolist(), "responses": texts[p],
                    "lengths": lengths[p], "best": {"reward": float(r[i]), "response": texts[p][i], "index": i},
                    "cost": meters[p].as_dict()})
    return out


def run_best_of_n(sampler: PrelogitSampler, reward: RewardModel, prompt: str, user_text: str, N: int,
                  generator: torch.Generator, batch_size: int | None = None) -> BestOfNRecord:
    """Best-of-N on one prompt: :func:`run_best_of_n_many` with a single prompt."""
    return run_best_of_n_many(sampler, reward, [prompt], [user_text], N, [generator], batch_size)[0]


__all__ = ["prompt_generator", "check_prompt_lists", "prefill", "generate", "score", "run_best_of_n_many",
           "run_best_of_n"]
