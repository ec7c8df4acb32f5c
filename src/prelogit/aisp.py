"""AISP over a set of prompts (spec section 5), on the engine best-of-N also runs on (:mod:`prelogit.engine`).

AISP keeps a control mean U (tau, d) per prompt and chain. Each iteration draws n control inputs
V_i = U + eps_i, eps_i ~ N(0, sigma^2 I), generates one response per V_i, scores them, and moves U
by importance sampling (:mod:`prelogit.control`). B independent chains run side by side. The answer
is the best response seen in any chain and iteration.

Prompts run in lockstep: each iteration generates every prompt's B * n rows in one sampler call
(micro-batched by the sampler) and scores them with one reward call, and the prompts' prefill is
computed once and reused by all K iterations. A prompt's noise and token draws come from its own
generator (:func:`prompt_generator`), so its results do not depend on which prompts share its batch.
Each prompt may have its own configuration (sigma, lambda, alpha and tau may differ; n, K, B and
the final rollout are shared by the lockstep): a batch can hold several arms of a hyper-parameter
search (:mod:`prelogit.tune`), each prompt getting exactly the record it would get alone.

Because the iterations are sequential and do not look ahead, the best-so-far after k iterations of
a K-iteration run *is* the answer of AISP with K = k: one run gives the whole reward-vs-samples
curve at budgets N = B * n * k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import cast

import torch

from .checks import ParameterError, check_aisp_params, check_choice
from .control import effective_sample_size, log_weight_terms, normalised_weights, update_mean
from .engine import check_prompt_lists, generate, prefill, score
from .metrics import CostMeter
from .records import AISPBest, AISPConfigDict, AISPFinalRollout, AISPIteration, AISPRecord
from .rewards import RewardModel
from .sampling import PrelogitSampler
from .theory import kl_to_base

LAM_MODES = ("absolute", "std")


@dataclass(frozen=True)
class AISPConfig:
    """AISP hyper-parameters (all [open] choices of the spec are explicit here).

    sigma: std of the control noise, pre-logit units. lam: temperature lambda, reward units when
    ``lam_mode == "absolute"``; with ``"std"`` the effective lambda is lam times the standard
    deviation of the rewards within the iteration (so lam is unit-free). alpha, alpha_mode: see
    :func:`prelogit.control.likelihood_ratio_coefficient`. n: samples per iteration and chain;
    K: iterations; tau: controlled tokens; B: chains. final_rollout: also generate (and log, not
    select from) one response from each chain's final mean, with its sequence-level KL terms
    against the base model (:attr:`prelogit.sampling.Generation.kl`).
    """

    sigma: float = 0.5
    lam: float = 0.1
    lam_mode: str = "absolute"
    alpha: float = 0.0
    alpha_mode: str = "mppi"
    n: int = 8
    K: int = 4
    tau: int = 8
    B: int = 1
    final_rollout: bool = True

    def __post_init__(self) -> None:
        check_aisp_params(sigma=self.sigma, lam=self.lam, alpha=self.alpha, alpha_mode=self.alpha_mode,
                          n=self.n, K=self.K, tau=self.tau, B=self.B)
        check_choice("lam_mode", self.lam_mode, LAM_MODES)

    @property
    def budget(self) -> int:
        """Samples used for selection, B * n * K (the final rollouts are extra and logged apart)."""
        return self.B * self.n * self.K


def frozen_twin(cfg: AISPConfig) -> AISPConfig:
    """The configuration with U held at 0 for every draw: the ``step`` reading with step size 0 leaves
    the mean where it starts, (1 - 0) U + 0 U_hat = U = 0. The same sigma, tau, n, K and decoding
    given V and, drawn from the same per-prompt generator in the same order, the same noise: AISP
    minus its twin is what the adaptation of U adds. With n K draws at U = 0 it is also the K = 1
    limit (n = N), and the lambda -> 0 limit of a search that cannot move U."""
    return replace(cfg, alpha=0.0, alpha_mode="step", final_rollout=False)


SHARED_FIELDS = ("n", "K", "B", "final_rollout")


def per_prompt_configs(cfg: object, P: int, cls: type = AISPConfig, shared: Sequence[str] = SHARED_FIELDS,
                       caller: str = "run_aisp_many") -> list:
    """One config per prompt from ``cfg``: one ``cls`` instance for all prompts, or a list of P of
    them that agree on the ``shared`` fields (the lockstep iterations of ``caller`` need them equal).
    Used by AISP (``n, K, B, final_rollout``) and MISVO (:mod:`prelogit.misvo`).
    """
    name = cls.__name__
    if isinstance(cfg, cls):
        return [cfg] * P
    if isinstance(cfg, (str, bytes, dict)) or not isinstance(cfg, Sequence):
        raise ParameterError(f"cfg must be an {name} or a list of them (one per prompt), got {type(cfg).__name__}")
    cfgs = list(cfg)
    if len(cfgs) != P:
        raise ParameterError(f"give one config per prompt: {P} prompts, {len(cfgs)} configs")
    for i, c in enumerate(cfgs):
        if not isinstance(c, cls):
            raise ParameterError(f"cfg[{i}] must be an {name}, got {type(c).__name__}")
    for field in shared:
        values = [getattr(c, field) for c in cfgs]
        if any(v != values[0] for v in values):
            i = next(i for i, v in enumerate(values) if v != values[0])
            raise ParameterError(f"all configs of one {caller} call must share {field} (and "
                                 f"{', '.join(f for f in shared if f != field)}): cfg[0].{field} = "
                                 f"{values[0]!r} but cfg[{i}].{field} = {values[i]!r}")
    return cfgs


def run_aisp_many(sampler: PrelogitSampler, reward: RewardModel, prompts: Sequence[str], user_texts: Sequence[str],
                  cfg: AISPConfig | Sequence[AISPConfig], generators: Sequence[torch.Generator],
                  decode: str | None = None) -> list[AISPRecord]:
    """AISP on several prompts in lockstep; one record per prompt, as :func:`run_aisp` returns.

    Args:
        sampler: the controlled sampler (its decode mode, max_new_tokens and max_rows apply).
        reward: the reward model that is optimised.
        prompts: the templated prompts fed to the LM; user_texts: the raw user turns the reward sees.
        cfg: hyper-parameters: one :class:`AISPConfig` shared by all prompts, or a list of them,
            one per prompt. The configs of a list must share n, K, B and final_rollout (the
            prompts iterate in lockstep) and may differ in sigma, lam, lam_mode, alpha, alpha_mode
            and tau; a prompt's record is then exactly the one it gets alone with its own config.
        generators: one RNG per prompt for its noise and its token sampling
            (:func:`prompt_generator`).
        decode: overrides the sampler's decode mode (``sample`` or ``greedy``).
    Raises:
        ParameterError: a list of configs of the wrong length, or whose n, K, B or final_rollout differ.
    """
    check_prompt_lists(prompts, user_texts, generators)
    P, d = len(prompts), sampler.d
    cfgs = per_prompt_configs(cfg, P)
    B, n, K, final_rollout = cfgs[0].B, cfgs[0].n, cfgs[0].K, cfgs[0].final_rollout
    meters = [CostMeter() for _ in range(P)]
    pre = prefill(sampler, prompts, meters)
    U = [torch.zeros(B, c.tau, d) for c in cfgs]  # per prompt: tau differs between configs
    # a placeholder until the first iteration replaces it: every reward is finite (engine.score checks), so > -inf
    best: list[AISPBest] = [cast(AISPBest, {"reward": float("-inf"), "response": None, "iteration": None, "chain": None})
                            for _ in range(P)]
    iterations: list[list[AISPIteration]] = [[] for _ in range(P)]
    for k in range(1, K + 1):
        # Drawn prompt by prompt from each prompt's own generator, in prompt order.
        V = [U[p][:, None] + torch.randn(B, n, cfgs[p].tau, d, generator=generators[p]) * cfgs[p].sigma
             for p in range(P)]  # each (B, n, tau_p, d)
        gens = generate(sampler, pre, [B * n] * P, meters, controls=[v.reshape(B * n, v.shape[2], d) for v in V],
                         generators=generators, decode=decode)
        scores = score(reward, user_texts, gens, meters)
        for p in range(P):
            c, r, g = cfgs[p], scores[p].view(B, n), gens[p]
            i_best = int(torch.argmax(r.view(-1)))
            if float(r.view(-1)[i_best]) > best[p]["reward"]:
                best[p] = {"reward": float(r.view(-1)[i_best]), "response": g.texts[i_best], "iteration": k,
                           "chain": i_best // n}
            rec: AISPIteration = {
                "k": k, "samples_so_far": B * n * k, "rewards": r.tolist(), "responses": g.texts,
                "lengths": g.lengths.tolist(), "weights": [], "ess": [], "lam_eff": [], "U_norm": [], "kl_control": [],
                "sd_reward_term": [], "sd_lr_term": [], "best_so_far": cast(AISPBest, dict(best[p]))}
            for b in range(B):
                lam_eff = c.lam if c.lam_mode == "absolute" else c.lam * max(float(r[b].std(unbiased=False)), 1e-8)
                # what the weights follow: the spread of r / lam against that of the likelihood-ratio term
                reward_term, lr_term = log_weight_terms(r[b], V[p][b], U[p][b], c.sigma, lam_eff, c.alpha, c.alpha_mode)
                rec["sd_reward_term"].append(float(reward_term.std(unbiased=False)))
                rec["sd_lr_term"].append(float(lr_term.std(unbiased=False)))
                w = normalised_weights(reward_term - lr_term, V[p][b].dtype)  # = importance_weights(...)
                U[p][b] = update_mean(U[p][b], V[p][b], w, c.alpha, c.alpha_mode)
                rec["weights"].append(w.tolist())
                rec["ess"].append(effective_sample_size(w))
                rec["lam_eff"].append(lam_eff)
                rec["U_norm"].append(float(U[p][b].norm()))
                rec["kl_control"].append(float(kl_to_base(U[p][b], c.sigma)))
            iterations[p].append(rec)
    finals: list[AISPFinalRollout | None] = [None] * P
    if final_rollout:
        gens = generate(sampler, pre, [B] * P, meters, controls=list(U), generators=generators, decode=decode,
                         record_kl=True)
        scores = score(reward, user_texts, gens, meters)
        # g.kl is set: record_kl=True
        finals = [{"responses": g.texts, "rewards": s.tolist(), "kl_sequence": cast(torch.Tensor, g.kl).tolist()}
                  for g, s in zip(gens, scores)]
    return [{"method": "aisp", "config": cast(AISPConfigDict, asdict(cfgs[p])), "samples_used": cfgs[p].budget,
             "best": best[p], "iterations": iterations[p], "final_rollout": finals[p],
             "kl_control_final": [float(kl_to_base(U[p][b], cfgs[p].sigma)) for b in range(B)], "cost": meters[p].as_dict()}
            for p in range(P)]


def run_aisp(sampler: PrelogitSampler, reward: RewardModel, prompt: str, user_text: str, cfg: AISPConfig,
             generator: torch.Generator, decode: str | None = None) -> AISPRecord:
    """AISP on one prompt: :func:`run_aisp_many` with a single prompt.

    Args:
        sampler: the controlled sampler (its decode mode and max_new_tokens apply).
        reward: the reward model that is optimised.
        prompt: the templated prompt fed to the LM; user_text: the raw user turn the reward sees.
        cfg: hyper-parameters. generator: RNG for the noise and for token sampling.
        decode: overrides the sampler's decode mode (``sample`` or ``greedy``).
    Returns:
        A JSON-ready record: ``best`` (response, reward, iteration, chain), ``iterations`` (per
        iteration and chain: rewards (n,), weights (n,), ESS, ||U||, KL(Q_U||P), effective lambda,
        the sds over the n samples of the log-weights' reward and likelihood-ratio terms
        (``sd_reward_term``, ``sd_lr_term``: :func:`prelogit.control.log_weight_terms`, U before the
        update), the responses, and the best-so-far), ``final_rollout`` (per chain: the response generated from
        the final mean U without noise, its reward and ``kl_sequence``, the Monte-Carlo term of the
        sequence-level KL(pi_U || pi_ref) of the policy steered by U; see
        :attr:`prelogit.sampling.Generation.kl`), ``kl_control_final`` (the control-space KL(Q_U || P) of the
        final mean, per chain) and the cost counters. Every field, its shape and unit:
        :class:`prelogit.records.AISPRecord`.
    """
    return run_aisp_many(sampler, reward, [prompt], [user_text], cfg, [generator], decode)[0]
