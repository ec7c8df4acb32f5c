"""Non-adaptive samplers at a budget of N draws: the arms of the samplers stage's search.

Best-of-N with the base model's own sampling (temperature 1, no truncation) is one point of a
family of samplers that never learn anything from the reward; the samplers stage chooses the best
of them on the validation prompts by the same rule as AISP's tuning (successive halving,
:func:`prelogit.tune.successive_halving`), so that AISP is compared with the best non-adaptive
sampler at equal N rather than with one fixed baseline. An arm (:class:`SamplerArm`) is either

- ``temperature``: N independent samples at ``temperature`` and nucleus ``top_p`` (the sampler's
  ``top_k`` kept), scored by the reward, the best kept: best-of-N at another temperature;
- ``noisy_greedy``: N greedy decodings, each given its own pre-logit control V ~ N(0, sigma^2 I)
  on the first ``tau`` generated tokens (shape (tau, d), pre-logit units), U = 0 and never adapted:
  AISP's proposal without the adaptation. ``sigma_rms`` is sigma in units of the RMS of the
  pre-logit coordinates (the tune stage measures it), as AISP's sigma is.

:func:`run_arm_many` runs one arm on many prompts and returns records in the format of
:func:`prelogit.engine.run_best_of_n_many` (every draw's reward and response kept, so best-of-N'
for N' <= N is estimated from the same draws), with ``method: "sampler"`` and the arm's label.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .engine import check_prompt_lists, generate, prefill, prompt_generator, run_best_of_n_many, score
from .checks import ParameterError, check_choice, check_number
from .metrics import CostMeter
from .records import BestOfNRecord
from .rewards import RewardModel
from .sampling import PrelogitSampler

KINDS = ("temperature", "noisy_greedy")


def _num(x: float) -> str:
    """A number as labels write it: ``0.7``, ``1``, ``0.125`` (``%g``)."""
    return f"{float(x):g}"


@dataclass(frozen=True)
class SamplerArm:
    """One non-adaptive sampler.

    kind: ``temperature`` or ``noisy_greedy``. temperature (> 0) and top_p (in (0, 1]): the
    sampling distribution of a ``temperature`` arm. sigma_rms (> 0): the control noise std of a
    ``noisy_greedy`` arm in units of the pre-logit RMS; tau (>= 1): the number of generated tokens
    whose pre-logits it perturbs. The fields of the other kind keep their defaults and are ignored.
    """

    kind: str = "temperature"
    temperature: float = 1.0
    top_p: float = 1.0
    sigma_rms: float = 0.0
    tau: int = 0

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        if self.kind == "temperature":
            check_number("temperature", self.temperature, low=0, low_open=True)
            check_number("top_p", self.top_p, low=0, high=1, low_open=True)
        else:
            check_number("sigma_rms", self.sigma_rms, low=0, low_open=True)
            check_number("tau", self.tau, low=1, integer=True)

    @property
    def label(self) -> str:
        """A stable name: ``T=0.7,top_p=0.9`` or ``greedy|V,sigma=0.25rms`` (the tau of a search is shared)."""
        if self.kind == "temperature":
            return f"T={_num(self.temperature)},top_p={_num(self.top_p)}"
        return f"greedy|V,sigma={_num(self.sigma_rms)}rms"

    def as_dict(self) -> dict:
        """``label``, ``kind`` and the fields of the arm's kind (JSON-ready)."""
        fields = ("temperature", "top_p") if self.kind == "temperature" else ("sigma_rms", "tau")
        return {"label": self.label, "kind": self.kind, **{f: getattr(self, f) for f in fields}}

    @classmethod
    def from_dict(cls, d: dict) -> SamplerArm:
        """The arm :meth:`as_dict` wrote (``label`` ignored)."""
        return cls(**{k: v for k, v in d.items() if k != "label"})


def candidate_arms(temperatures: Sequence[float], top_ps: Sequence[float], sigma_rms: Sequence[float],
                   tau: int) -> list[SamplerArm]:
    """The arms of the search: every temperature x top_p (temperature-major), then one noisy-greedy
    arm per sigma_rms (all with the same tau). Repeated arms are dropped, the first kept.

    Raises:
        ParameterError: an invalid value (named), or no arm at all.
    """
    arms = [SamplerArm("temperature", temperature=float(t), top_p=float(p)) for t in temperatures for p in top_ps]
    arms += [SamplerArm("noisy_greedy", sigma_rms=float(s), tau=tau) for s in sigma_rms]
    out = list(dict.fromkeys(arms))
    if not out:
        raise ParameterError("no sampler arms: give at least one temperature and top_p, or one sigma_rms")
    return out


def _with_arm(sampler: PrelogitSampler, arm: SamplerArm) -> PrelogitSampler:
    """A shallow copy of ``sampler`` (the model shared) that samples at the arm's temperature and top_p."""
    s = copy.copy(sampler)
    s.decode, s.temperature, s.top_p = "sample", float(arm.temperature), float(arm.top_p)
    return s


def run_arm_many(sampler: PrelogitSampler, reward: RewardModel, prompts: Sequence[str], user_texts: Sequence[str],
                 arm: SamplerArm, N: int, generators: Sequence[torch.Generator], rms: float,
                 batch_size: int | None = None) -> list[BestOfNRecord]:
    """N draws of ``arm`` on each prompt, all prompts batched; one record per prompt.

    Args:
        sampler: the base sampler (its max_new_tokens, top_k and max_rows apply); not modified.
        reward: the optimised reward.
        prompts: templated prompts for the LM; user_texts: the user turns the reward sees.
        arm: the sampler to run.
        N: draws per prompt.
        generators: one RNG per prompt (:func:`prelogit.engine.prompt_generator`): a temperature
            arm's token uniforms, a noisy-greedy arm's controls V (N, tau, d), drawn at once
            before any decoding. A prompt's record does not depend on its batch-mates.
        rms: the RMS of the pre-logit coordinates (sigma = sigma_rms * rms, pre-logit units);
            read by noisy-greedy arms only.
        batch_size: draws per prompt in one sampler call (default N); the records do not depend on it.
    Returns:
        Records as :func:`prelogit.engine.run_best_of_n_many` returns (``N``, ``samples_used``,
        ``rewards``, ``responses``, ``lengths``, ``best``, ``cost``) with ``method: "sampler"``
        and ``arm``: the arm's label. A temperature arm at T = 1, top_p = 1 on a sampling sampler
        gives exactly best-of-N's records.
    Raises:
        ParameterError: bad N, batch_size or rms, mismatched prompt lists, or tau above the
            sampler's max_new_tokens.
    """
    if not isinstance(arm, SamplerArm):
        raise ParameterError(f"arm must be a SamplerArm, got {type(arm).__name__}")
    check_number("N", N, low=1, integer=True)
    batch_size = batch_size or N
    check_number("batch_size", batch_size, low=1, integer=True)
    check_prompt_lists(prompts, user_texts, generators)
    if arm.kind == "temperature":
        recs = run_best_of_n_many(_with_arm(sampler, arm), reward, prompts, user_texts, N, generators, batch_size)
    else:
        check_number("rms", rms, low=0, low_open=True)
        if arm.tau > sampler.max_new_tokens:
            raise ParameterError(f"arm {arm.label}: tau = {arm.tau} exceeds the sampler's max_new_tokens = "
                                 f"{sampler.max_new_tokens} (only generated tokens are controlled)")
        recs = _noisy_greedy_many(sampler, reward, prompts, user_texts, arm.sigma_rms * rms, arm.tau, N,
                                  generators, batch_size)
    for rec in recs:
        rec["method"], rec["arm"] = "sampler", arm.label
    return recs


def _noisy_greedy_many(sampler: PrelogitSampler, reward: RewardModel, prompts: Sequence[str],
                       user_texts: Sequence[str], sigma: float, tau: int, N: int,
                       generators: Sequence[torch.Generator], batch_size: int) -> list[BestOfNRecord]:
    """Greedy decoding given V ~ N(0, sigma^2 I) of shape (N, tau, d) per prompt; run_best_of_n_many's records."""
    P, d = len(prompts), sampler.d
    meters = [CostMeter() for _ in range(P)]
    pre = prefill(sampler, prompts, meters)
    V = [torch.randn(N, tau, d, generator=g) * sigma for g in generators]  # each (N, tau, d), drawn in prompt order
    texts: list[list[str]] = [[] for _ in range(P)]
    lengths: list[list[int]] = [[] for _ in range(P)]
    rewards: list[list[torch.Tensor]] = [[] for _ in range(P)]
    for start in range(0, N, batch_size):
        m = min(batch_size, N - start)
        gens = generate(sampler, pre, [m] * P, meters, controls=[v[start:start + m] for v in V],
                         generators=generators, decode="greedy")
        for p, s in enumerate(score(reward, user_texts, gens, meters)):
            rewards[p].append(s)
            texts[p] += gens[p].texts
            lengths[p] += gens[p].lengths.tolist()
    out: list[BestOfNRecord] = []
    for p in range(P):
        r = torch.cat(rewards[p])
        i = int(torch.argmax(r))
        out.append({"method": "sampler", "N": N, "samples_used": N, "rewards": r.tolist(), "responses": texts[p],
                    "lengths": lengths[p], "best": {"reward": float(r[i]), "response": texts[p][i], "index": i},
                    "cost": meters[p].as_dict()})
    return out


def pair_generator(seed: int, arm: SamplerArm, prompt_id: str) -> torch.Generator:
    """The RNG of (arm, prompt) in the search: keyed by the arm's label too, so that arms do not share draws."""
    return prompt_generator(seed, f"{arm.label}:{prompt_id}")


def run_pairs(sampler: PrelogitSampler, reward: RewardModel, arms: Sequence[SamplerArm], rows_by_id: dict[str, dict],
              pairs: Sequence[tuple[int, str]], seed: int, N: int, rms: float,
              batch_size: int | None = None) -> list[BestOfNRecord]:
    """One record per (arm index, prompt id) pair, in the order given: each arm's prompts in one
    :func:`run_arm_many` call (arms in order of first appearance), the generator of a pair
    :func:`pair_generator`, so a pair's record does not depend on the other pairs.

    ``rows_by_id``: prompt rows (``prompt``, ``text``) by id. Used under
    :func:`prelogit.shard.run_sharded`, which hands each process a share of the pairs.
    """
    pairs = [(int(i), pid) for i, pid in pairs]
    for i, pid in pairs:
        if not 0 <= i < len(arms):
            raise ParameterError(f"pair {(i, pid)}: arm index {i} is out of range (0 .. {len(arms) - 1})")
        if pid not in rows_by_id:
            raise ParameterError(f"pair {(i, pid)}: prompt id {pid!r} is not in rows_by_id")
    by_arm: dict[int, list[str]] = {}
    for i, pid in dict.fromkeys(pairs):  # a repeated pair runs once
        by_arm.setdefault(i, []).append(pid)
    got: dict[tuple[int, str], BestOfNRecord] = {}
    for i, pids in by_arm.items():
        rows = [rows_by_id[p] for p in pids]
        recs = run_arm_many(sampler, reward, [r["prompt"] for r in rows], [r["text"] for r in rows], arms[i], N,
                            [pair_generator(seed, arms[i], p) for p in pids], rms, batch_size)
        got.update(zip(((i, p) for p in pids), recs))
    return [got[pair] for pair in pairs]


def budgets_up_to(N: int) -> list[int]:
    """1, 2, 4, ... up to N, and N itself if it is not a power of two."""
    check_number("N", N, low=1, integer=True)
    out = [2**k for k in range(int(math.log2(N)) + 1) if 2**k <= N]
    return out if out[-1] == N else out + [N]


__all__ = ["KINDS", "SamplerArm", "candidate_arms", "run_arm_many", "pair_generator", "run_pairs", "budgets_up_to"]
