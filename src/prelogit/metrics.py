"""Evaluation metrics shared by every method: diversity, coherence, KL, best-of-N, CIs, cost.

Conventions: a "prompt" is the unit of replication. Per-prompt numbers go in, and confidence
intervals come from a bootstrap over prompts (never over samples within a prompt, which are
not independent of the prompt).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, cast

import numpy as np
import torch

from .checks import ParameterError, check_number
from .records import CostRecord
from .rewards import check_scores
from .theory import kl_best_of_n, kl_to_base

# ---- diversity --------------------------------------------------------------------------------

# A token is a run of letters/digits/underscores, optionally joined by apostrophes ("don't",
# "it's"), or a single punctuation character. This mirrors what nltk's word_tokenize (used by the
# ARGS and RE-Control evaluation scripts) does for plain English, without the nltk dependency.
_TOKEN = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``: split at whitespace and punctuation.

    Words are maximal runs of ``\\w`` characters (apostrophes inside a word are kept, so
    "Don't" -> "don't"); every other non-space character is a token of its own ("hi!" ->
    ["hi", "!"]).
    """
    return _TOKEN.findall(text.lower())


def rep_n(text: str, n: int) -> float:
    """Repetition rate rep-n = 100 * (1 - unique n-grams / (total n-grams + 1)), in percent.

    The +1 (as in the ARGS/RE-Control code) keeps empty texts finite: a text with fewer than n
    tokens has rep-n = 100. It also means a short text with no repetition has rep-n > 0.
    """
    check_number("n", n, low=1, integer=True)
    toks = word_tokens(text)
    grams = [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]
    return 100.0 * (1.0 - len(set(grams)) / (len(grams) + 1))


def diversity_per_response(responses: Sequence[str]) -> list[float]:
    """Diversity of each response: prod over n = 2, 3, 4 of (1 - rep-n / 100), in [0, 1).

    Higher is more diverse (less repetition within the response). See :func:`word_tokens`.
    """
    if isinstance(responses, str):
        raise ParameterError("responses must be a list of strings, got a single string")
    return [math.prod(1.0 - rep_n(r, n) / 100.0 for n in (2, 3, 4)) for r in responses]


def distinct_ngram_diversity(responses: Sequence[str]) -> float:
    """Mean over responses of :func:`diversity_per_response` (the paper's "diversity")."""
    values = diversity_per_response(responses)
    if not values:
        raise ParameterError("responses must contain at least one response, got an empty list")
    return float(np.mean(values))


# ---- coherence --------------------------------------------------------------------------------

def coherence(prompt_emb: torch.Tensor, response_emb: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each prompt's embedding with its response's embedding.

    Args:
        prompt_emb, response_emb: (n, e) sentence embeddings (the caller embeds both with the
            project's default sentence encoder), row i of each belonging together.
    Returns:
        (n,) float32 in [-1, 1].
    """
    p = torch.as_tensor(prompt_emb)
    r = torch.as_tensor(response_emb)
    if p.dim() != 2 or p.shape != r.shape:
        raise ParameterError(f"prompt_emb and response_emb must both have shape (n, e), got "
                             f"{tuple(p.shape)} and {tuple(r.shape)}")
    return torch.nn.functional.cosine_similarity(p.double(), r.double(), dim=1).float()


# ---- KL ---------------------------------------------------------------------------------------

def kl_bon(N: int) -> float:
    """KL(best-of-N || base) = log N - (N - 1) / N nats (see :func:`prelogit.theory.kl_best_of_n`)."""
    return kl_best_of_n(N)


def kl_aisp(U: torch.Tensor, sigma: float) -> float:
    """KL(Q_U || P) = sum_t ||u_t||^2 / (2 sigma^2) nats of AISP's final proposal (tau, d).

    This is the KL in control space; by the data-processing inequality it bounds the KL between
    the resulting response distributions from above.
    """
    return float(kl_to_base(U, sigma))


# ---- best-of-N from a pool of draws ------------------------------------------------------------

def best_of_n_weights(M: int, N: int) -> torch.Tensor:
    """Probability that the i-th smallest of M draws is the maximum of a random N-subset, (M,) float64.

    w_i = C(i-1, N-1) / C(M, N) for i = 1..M (zero for i < N), computed in log space with lgamma
    so that M in the thousands does not overflow. The weights sum to 1 (hockey-stick identity).
    """
    check_number("N", N, low=1, integer=True)
    check_number("M", M, low=N, integer=True)
    i = torch.arange(1, M + 1, dtype=torch.float64)
    log_c_total = math.lgamma(M + 1) - math.lgamma(N + 1) - math.lgamma(M - N + 1)
    valid = i >= N
    iv = i[valid]
    log_w = torch.lgamma(iv) - math.lgamma(N) - torch.lgamma(iv - N + 1) - log_c_total
    w = torch.zeros(M, dtype=torch.float64)
    w[valid] = torch.exp(log_w)
    return w


def expected_best_of_n(rewards: torch.Tensor, N: int, values: torch.Tensor | None = None) -> float:
    """Unbiased estimate of E[value of the best of N draws] from M >= N i.i.d. draws.

    The estimate averages, over all C(M, N) subsets of size N, the value of the subset's
    highest-reward draw; with the draws sorted by reward this is sum_i w_i value_(i) with the
    weights of :func:`best_of_n_weights`. It is the U-statistic of the best-of-N value, so it has
    lower variance than splitting the pool into M / N disjoint groups.

    Args:
        rewards: (M,) rewards of the draws (what best-of-N selects on).
        N: the best-of-N budget, 1 <= N <= M.
        values: (M,) what to report for the selected draw, e.g. a held-out judge's score of the
            reward-selected response. Defaults to ``rewards``.
    Ties in reward are broken by position (a stable sort: among equal rewards the later draw
    counts as larger); with continuous rewards ties have probability zero.
    """
    r = torch.as_tensor(rewards, dtype=torch.float64)
    if r.dim() != 1 or r.numel() == 0:
        raise ParameterError(f"rewards must have shape (M,) with M >= 1, got {tuple(r.shape)}")
    if not torch.isfinite(r).all():
        raise ParameterError("rewards contain NaN or infinity")
    M = r.numel()
    check_number("N", N, low=1, high=M, integer=True)
    v = r if values is None else torch.as_tensor(values, dtype=torch.float64)
    if v.shape != r.shape:
        raise ParameterError(f"values must have the shape of rewards, ({M},), got {tuple(v.shape)}")
    order = torch.sort(r, stable=True).indices
    return float((best_of_n_weights(M, N) * v[order]).sum())


# ---- confidence intervals over prompts ---------------------------------------------------------

def _as_1d(name: str, x: object) -> np.ndarray:
    a = np.asarray(torch.as_tensor(x, dtype=torch.float64))
    if a.ndim != 1 or a.size == 0:
        raise ParameterError(f"{name} must have shape (P,) with P >= 1 prompts, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ParameterError(f"{name} contains NaN or infinity")
    return a


def _bootstrap_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    return x[idx].mean(axis=1)


def bootstrap_ci(x: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Mean of per-prompt values and its percentile-bootstrap confidence interval.

    Args:
        x: (P,) one value per prompt.
        n_boot: bootstrap resamples (of P prompts with replacement).
        level: coverage of the interval, in (0, 1).
        seed: the resampling is deterministic for a seed.
    Returns:
        (mean, lo, hi) in the units of ``x``.
    """
    a = _as_1d("x", x)
    check_number("n_boot", n_boot, low=1, integer=True)
    check_number("level", level, low=0, high=1, low_open=True, high_open=True)
    check_number("seed", seed, low=0, integer=True)
    means = _bootstrap_means(a, n_boot, seed)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(a.mean()), float(lo), float(hi)


@dataclass(frozen=True)
class PairedDifference:
    """Method a minus method b over the same P prompts.

    mean, lo, hi: mean per-prompt difference a - b and its bootstrap interval.
    share_a_greater: share of prompts with a > b; share_ties: share with a == b.
    """

    mean: float
    lo: float
    hi: float
    share_a_greater: float
    share_ties: float
    n_prompts: int
    level: float

    def as_dict(self) -> dict:
        return asdict(self)


def paired_difference(a: Any, b: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> PairedDifference:
    """Per-prompt difference a - b with its bootstrap CI and the share of prompts where a > b.

    a, b: (P,) per-prompt values of two methods on the same prompts, in the same order.
    """
    xa, xb = _as_1d("a", a), _as_1d("b", b)
    if xa.shape != xb.shape:
        raise ParameterError(f"a and b must have the same shape (P,), got {xa.shape} and {xb.shape}")
    mean, lo, hi = bootstrap_ci(xa - xb, n_boot=n_boot, level=level, seed=seed)
    return PairedDifference(mean=mean, lo=lo, hi=hi, share_a_greater=float(np.mean(xa > xb)),
                            share_ties=float(np.mean(xa == xb)), n_prompts=int(xa.size), level=level)


# ---- cost accounting --------------------------------------------------------------------------

@dataclass
class CostMeter:
    """Compute spent by one method, accumulated over calls.

    forward_calls: LM forward passes (a prefill counts once). new_tokens: generated tokens.
    generations: responses generated. reward_calls: texts scored by the reward model (a batch of
    k texts counts k); reward_batches: ``score`` calls. time_generation_s / time_reward_s:
    wall-clock seconds inside :meth:`generation` / :meth:`reward` blocks. The keys of
    :meth:`as_dict` match the cost records of :mod:`prelogit.aisp`.
    """

    forward_calls: int = 0
    new_tokens: int = 0
    generations: int = 0
    reward_calls: int = 0
    reward_batches: int = 0
    time_generation_s: float = 0.0
    time_reward_s: float = 0.0

    @contextmanager
    def generation(self) -> Iterator[CostMeter]:
        """Time the enclosed block as generation (the time counts even if the block raises)."""
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.time_generation_s += time.perf_counter() - t0

    @contextmanager
    def reward(self) -> Iterator[CostMeter]:
        """Time the enclosed block as reward-model scoring."""
        t0 = time.perf_counter()
        try:
            yield self
        finally:
            self.time_reward_s += time.perf_counter() - t0

    def add_generation(self, gen: Any) -> None:
        """Count a :class:`prelogit.sampling.Generation` (forward calls, tokens, responses)."""
        self.forward_calls += int(gen.forward_calls)
        self.new_tokens += int(gen.new_tokens)
        self.generations += len(gen.texts)

    def add_scored(self, n_texts: int) -> None:
        """Count one ``score`` call on ``n_texts`` texts."""
        self.reward_calls += int(n_texts)
        self.reward_batches += 1

    def score(self, reward: Any, user_text: str, texts: list[str]) -> torch.Tensor:
        """``reward.score`` of ``texts`` as replies to ``user_text``: timed, counted and checked.

        Returns (len(texts),) float32 (see :func:`prelogit.rewards.check_scores`).
        """
        return self.score_pairs(reward, [user_text] * len(texts), texts)

    def score_pairs(self, reward: Any, user_texts: list[str], texts: list[str]) -> torch.Tensor:
        """One ``reward.score`` call on (user text, response) pairs: timed, counted and checked."""
        with self.reward():
            scores = reward.score(list(user_texts), list(texts))
        self.add_scored(len(texts))
        return check_scores(scores, len(texts), getattr(reward, "name", type(reward).__name__))

    def add(self, other: CostMeter) -> CostMeter:
        """Add another meter's counts and times into this one; returns self."""
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)
        return self

    @property
    def time_total_s(self) -> float:
        return self.time_generation_s + self.time_reward_s

    def as_dict(self) -> CostRecord:
        return cast(CostRecord, {**asdict(self), "time_total_s": self.time_total_s})
