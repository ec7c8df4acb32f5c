"""AISP and best-of-N on one prompt, with the same sampler and the same accounting (spec section 5).

AISP keeps a control mean U (tau, d) per chain. Each iteration draws n control inputs
V_i = U + eps_i, eps_i ~ N(0, sigma^2 I), generates one response per V_i, scores them, and moves U
by importance sampling (:mod:`prelogit.control`). B independent chains run side by side in one
batch of B * n. The answer is the best response seen in any chain and iteration.

Because the iterations are sequential and do not look ahead, the best-so-far after k iterations of
a K-iteration run *is* the answer of AISP with K = k: one run gives the whole reward-vs-samples
curve at budgets N = B * n * k.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .checks import check_aisp_params, check_choice, check_number
from .control import effective_sample_size, importance_weights, update_mean
from .metrics import CostMeter
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
    select from) one response from each chain's final mean.
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


def prompt_generator(seed: int, index: int) -> torch.Generator:
    """The RNG of prompt ``index`` under run seed ``seed``: runs are reproducible prompt by prompt."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


def run_aisp(sampler: PrelogitSampler, reward: RewardModel, prompt: str, user_text: str, cfg: AISPConfig,
             generator: torch.Generator, decode: str | None = None) -> dict:
    """AISP on one prompt.

    Args:
        sampler: the controlled sampler (its decode mode and max_new_tokens apply).
        reward: the reward model that is optimised.
        prompt: the templated prompt fed to the LM; user_text: the raw user turn the reward sees.
        cfg: hyper-parameters. generator: RNG for the noise and for token sampling.
        decode: overrides the sampler's decode mode (``sample`` or ``greedy``).
    Returns:
        A JSON-ready record: ``best`` (response, reward, iteration, chain), ``iterations`` (per
        iteration and chain: rewards (n,), weights (n,), ESS, ||U||, KL(Q_U||P), effective lambda,
        the responses, and the best-so-far), ``final_rollout`` (per chain) and the cost counters.
    """
    B, n, tau, d = cfg.B, cfg.n, cfg.tau, sampler.d
    meter = CostMeter()
    U = torch.zeros(B, tau, d)
    best = {"reward": float("-inf"), "response": None, "iteration": None, "chain": None}
    iterations = []
    for k in range(1, cfg.K + 1):
        eps = torch.randn(B, n, tau, d, generator=generator) * cfg.sigma
        V = U[:, None] + eps  # (B, n, tau, d)
        g = meter.generate(sampler, prompt, B * n, control=V.reshape(B * n, tau, d), generator=generator,
                      decode=decode)
        r = meter.score(reward, user_text, g.texts).view(B, n)
        i_best = int(torch.argmax(r.view(-1)))
        if float(r.view(-1)[i_best]) > best["reward"]:
            best = {"reward": float(r.view(-1)[i_best]), "response": g.texts[i_best], "iteration": k,
                    "chain": i_best // n}
        rec = {"k": k, "samples_so_far": B * n * k, "rewards": r.tolist(), "responses": g.texts,
               "lengths": g.lengths.tolist(), "weights": [], "ess": [], "lam_eff": [], "U_norm": [], "kl": [],
               "best_so_far": dict(best)}
        for b in range(B):
            lam_eff = cfg.lam if cfg.lam_mode == "absolute" else cfg.lam * max(float(r[b].std(unbiased=False)), 1e-8)
            w = importance_weights(r[b], V[b], U[b], cfg.sigma, lam_eff, cfg.alpha, cfg.alpha_mode)
            U[b] = update_mean(U[b], V[b], w, cfg.alpha, cfg.alpha_mode)
            rec["weights"].append(w.tolist())
            rec["ess"].append(effective_sample_size(w))
            rec["lam_eff"].append(lam_eff)
            rec["U_norm"].append(float(U[b].norm()))
            rec["kl"].append(float(kl_to_base(U[b], cfg.sigma)))
        iterations.append(rec)
    final = None
    if cfg.final_rollout:
        g = meter.generate(sampler, prompt, B, control=U, generator=generator, decode=decode)
        rf = meter.score(reward, user_text, g.texts)
        final = {"responses": g.texts, "rewards": rf.tolist()}
    return {"method": "aisp", "config": asdict(cfg), "samples_used": cfg.budget, "best": best,
            "iterations": iterations, "final_rollout": final, "kl_final": [float(kl_to_base(U[b], cfg.sigma)) for b in range(B)],
            "cost": meter.as_dict()}


def run_best_of_n(sampler: PrelogitSampler, reward: RewardModel, prompt: str, user_text: str, N: int,
                  generator: torch.Generator, batch_size: int | None = None) -> dict:
    """Best-of-N on one prompt: N base-model samples (no control), keep the highest reward.

    Samples are generated in batches of ``batch_size`` (default: all N in one batch). The record
    keeps every sample's reward and response, so that best-of-N' for any N' <= N can be estimated
    from the same draws (:func:`prelogit.metrics.expected_best_of_n`).
    """
    check_number("N", N, low=1, integer=True)
    batch_size = batch_size or N
    check_number("batch_size", batch_size, low=1, integer=True)
    meter = CostMeter()
    texts, lengths, rewards = [], [], []
    for start in range(0, N, batch_size):
        m = min(batch_size, N - start)
        g = meter.generate(sampler, prompt, m, generator=generator)
        rewards.append(meter.score(reward, user_text, g.texts))
        texts += g.texts
        lengths += g.lengths.tolist()
    r = torch.cat(rewards)
    i = int(torch.argmax(r))
    return {"method": "bon", "N": N, "samples_used": N, "rewards": r.tolist(), "responses": texts,
            "lengths": lengths, "best": {"reward": float(r[i]), "response": texts[i], "index": i}, "cost": meter.as_dict()}
