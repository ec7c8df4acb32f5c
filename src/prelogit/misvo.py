"""MISVO: minimally invasive steering by per-position pre-logit vectors (Entesari, Zhang, Khashabi, Fazlyab 2026).

One steering vector u_t per generated position t (t = 0..T-1 here, T = ``max_new_tokens``) is
added to the pre-logit, exactly as AISP's controls act::

    pi_u(. | x, y_<t) = softmax((W (z_t + u_t) + b) / temperature)

with z_t the unsteered pre-logit (the LM head's input) and W, b the LM head. MISVO maximises

    J(u) = E_{y ~ pi_u}[R(x, y)] - lam * 1/2 * sum_t u_t^T F_t u_t

by stochastic gradient ascent: each of ``steps`` steps samples K responses from pi_u, scores them, and
moves ``u_t <- u_t + eta * (g_t - lam * F_t u_t)`` where g_t is the leave-one-out (LOO)
score-function estimate of the reward gradient (:func:`score_gradient`) and F_t is the Fisher
information of the *reference* policy (u = 0) at position t, averaged over the first step's
rollouts (which are drawn with u = 0 and count in the K * steps budget; :func:`fisher_vector_product`,
matrix-free). ``fisher="identity"`` replaces F_t by I (plain L2 penalty); ``lam = 0`` drops the
penalty. The answer is the best response seen in any step, as for AISP.

Sampling distribution. The score function d log pi_u(y_t) / d u_t = W^T (e_{y_t} - p_t) / temperature
is exact only if p_t is the distribution the sampler really drew from. We compute p_t as
softmax((W (z_t + u_t) + b) / temperature) with the sampler's temperature and *no truncation*:
top-k and top-p must be off (``top_k = 0``, ``top_p = 1``) and decoding must be ``sample``
(greedy decoding has no score function); :func:`run_misvo_many` raises :class:`ParameterError`
otherwise. With temperature tau the Fisher of the sampling policy is W^T (diag p - p p^T) W / tau^2,
which is what :func:`fisher_vector_product` returns (at tau = 1, the paper's setting, exactly
the formula of the paper).

Numerics. The sampler records z_t in float32 and applies u_t in float32; :func:`run_misvo_many`
recomputes the steered logits from the recorded z_t and the float32-rounded u_t in float32 (float64
for a float64 model), the precision the sampler drew from, so p_t matches the sampler's
distribution up to the rounding of a differently shaped product. The control u is accumulated in
float64. Cost per step and prompt: K + 3 LM-head products (K for the samples' logits, which serve
the gradient and the KL alike; u's logits; the gradient's and the Fisher's projections back).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import cast

import torch

from .aisp import per_prompt_configs
from .engine import check_prompt_lists, generate, prefill, score
from .checks import ParameterError, check_choice, check_number
from .metrics import CostMeter
from .records import MISVOBest, MISVOConfigDict, MISVOFinalRollout, MISVOIteration, MISVORecord
from .rewards import RewardModel
from .sampling import PrelogitSampler

FISHERS = ("reference", "identity")


@dataclass(frozen=True)
class MISVOConfig:
    """MISVO hyper-parameters.

    eta: learning rate of the gradient ascent on u (paper: 0.1). lam: weight lambda of the
    Fisher penalty lam/2 sum_t u_t^T F_t u_t, in reward units (paper: 1; 0 = unregularised).
    K: responses per step (>= 2: the LOO baseline needs another sample). steps: the number of
    steps (the sample budget is K * steps, :attr:`budget`).
    fisher: ``"reference"`` (F_t of the reference policy, from the first step's rollouts) or
    ``"identity"`` (F_t = I, an ablation). final_rollout: also generate (and log, not select from)
    one response from the final u, with its sequence-level KL terms against the base model.

    The iteration is stable for the penalty alone when eta * lam * ||F_t|| < 2 (and monotone when
    < 1); ||F_t|| <= ||W||_2^2 / (2 temperature^2).
    """

    eta: float = 0.1
    lam: float = 1.0
    K: int = 8
    steps: int = 4
    fisher: str = "reference"
    final_rollout: bool = True

    def __post_init__(self) -> None:
        check_number("eta", self.eta, low=0, low_open=True)
        check_number("lam", self.lam, low=0)
        check_number("K", self.K, low=2, integer=True)
        check_number("steps", self.steps, low=1, integer=True)
        check_choice("fisher", self.fisher, FISHERS)

    @property
    def budget(self) -> int:
        """Samples drawn and scored, K * steps (the first step's reference rollouts included)."""
        return self.K * self.steps


# ---- pure functions --------------------------------------------------------------------------------


def loo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Leave-one-out advantages A_i = R_i - mean_{j != i} R_j, shape (K,) from rewards (K,), K >= 2.

    Identity used by the tests: A_i = K / (K - 1) * (R_i - mean(R)), so sum_i A_i = 0.
    """
    r = torch.as_tensor(rewards)
    if r.dim() != 1 or r.shape[0] < 2:
        raise ParameterError(f"rewards must have shape (K,) with K >= 2, got {tuple(r.shape)}")
    r = r.to(torch.float64)
    K = r.shape[0]
    return r - (r.sum() - r) / (K - 1)


def _logits(W: torch.Tensor, b: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    """Logits W z + b, shape (..., V) from z (..., d)."""
    out = z @ W.T
    return out if b is None else out + b


def _position_mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    """(K, T) bool, True at the generated positions t < lengths[i] (the EOS token included)."""
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]


def _fit_u(u: torch.Tensor, T: int) -> torch.Tensor:
    """u (T_u, d) cut or zero-padded to (T, d): positions beyond T_u carry no steering."""
    if u.shape[0] >= T:
        return u[:T]
    return torch.cat([u, u.new_zeros(T - u.shape[0], u.shape[1])])


def _log_policies(W: torch.Tensor, b: torch.Tensor | None, Z: torch.Tensor, u: torch.Tensor,
                  temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_u, log pi_ref), each (K, T, V), on the prefixes whose pre-logits Z (K, T, d) were recorded.

    One LM-head product for the K samples (the unsteered logits) plus one for u: steering only adds
    W u_t to the logits, so both policies come from the same pass.
    """
    K, T, d = Z.shape
    base = _logits(W, b, Z.to(dtype=W.dtype, device=W.device))
    steered = base + _logits(W, None, _fit_u(u.to(dtype=W.dtype, device=W.device), T))[None]
    return torch.log_softmax(steered / temperature, dim=-1), torch.log_softmax(base / temperature, dim=-1)


def _gradient(W: torch.Tensor, logp: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
              temperature: float, T_u: int) -> torch.Tensor:
    """The LOO score-function gradient (T_u, d) from the steered log-probabilities logp (K, T, V)."""
    K, T, _ = logp.shape
    w = advantages.to(dtype=W.dtype, device=W.device)[:, None] * mask.to(W.dtype) / (K * temperature)  # (K, T)
    coef = -(w[..., None] * logp.exp()).sum(0)  # (T, V): sum_i w_it (e_{y_t^i} - p_t^i), the e part below
    coef.scatter_add_(1, tokens.to(W.device).clamp_min(0).T.contiguous(), w.T.contiguous())
    return _fit_u(coef @ W, T_u)


def _kl_terms(logp: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample sum over real positions of KL(pi_u || pi_ref) at each position, (K,)."""
    kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)  # (K, T)
    return (kl * mask.to(kl.dtype)).sum(-1)


def score_gradient(W: torch.Tensor, b: torch.Tensor | None, Z: torch.Tensor, u: torch.Tensor, tokens: torch.Tensor,
                   lengths: torch.Tensor, advantages: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """LOO score-function estimate of d E_{pi_u}[R] / d u, shape (T_u, d).

    g_t = 1/K sum_i A_i [t < lengths_i] W^T (e_{y_t^i} - p_t^i) / temperature, where
    p_t^i = softmax((W (z_t^i + u_t) + b) / temperature) is the steered next-token distribution on
    sample i's prefix. This is the gradient w.r.t. u of 1/K sum_i A_i log pi_u(y^i) (advantages
    held fixed).

    Args:
        W: (V, d) LM head weight; b: (V,) bias or None.
        Z: (K, T, d) the unsteered pre-logits recorded while sampling (any value after a sample's end).
        u: (T_u, d) the steering vectors the samples were drawn with (positions t >= T_u: none).
        tokens: (K, T) sampled ids (anything after a sample's end); lengths: (K,) tokens per sample.
        advantages: (K,), e.g. :func:`loo_advantages`.
    Returns:
        (T_u, d) in the dtype of W; rows t >= T are zero (no sample reached them).
    Memory: the K samples' (T, V) probabilities at once.
    """
    logp, _ = _log_policies(W, b, Z, u, temperature)
    return _gradient(W, logp, tokens, _position_mask(lengths.to(W.device), Z.shape[1]), advantages, temperature,
                     u.shape[0])


@dataclass
class ReferenceFisher:
    """The reference Fisher F_t = mean_r W^T (diag p_rt - p_rt p_rt^T) W / tau^2 in factored form.

    Kept per position t: the mean p-bar_t of the valid reference rows' distributions (T, V) and each
    row's mean embedding m_rt = W^T p_rt (R, T, d), so that
    F_t u = (W^T (p-bar_t * W u) - mean_r m_rt (m_rt . u)) / tau^2 costs two LM-head products per step
    and the d x d matrix is never formed. ``pooled_*``: the same over every valid reference position,
    used where no reference row reached t. Memory: T V + R T d numbers per prompt.
    """

    pbar: torch.Tensor  # (T_ref, V)
    M: torch.Tensor  # (R, T_ref, d)
    mask: torch.Tensor  # (R, T_ref) bool
    count: torch.Tensor  # (T_ref,)
    pooled_pbar: torch.Tensor  # (V,)
    temperature: float

    def apply(self, W: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """F_t u_t for every t, (T_u, d) from u (T_u, d), in the dtype of W."""
        T_ref = self.pbar.shape[0]
        T_u = u.shape[0]
        u = u.to(dtype=W.dtype, device=W.device)
        n = min(T_u, T_ref)
        fu = torch.zeros(T_u, W.shape[1], dtype=W.dtype, device=W.device)
        Wu = _logits(W, None, u)  # (T_u, V)
        m = self.mask.to(W.dtype)
        reached = self.count[:n] > 0
        if bool(reached.any()):
            first = (self.pbar[:n] * Wu[:n]) @ W  # (n, d)
            dots = (self.M[:, :n] * u[None, :n]).sum(-1) * m[:, :n]  # (R, n): m_rt . u_t on valid rows
            second = (dots[..., None] * self.M[:, :n]).sum(0) / self.count[:n].clamp_min(1)[:, None]
            fu[:n][reached] = (first - second)[reached]
        need = torch.ones(T_u, dtype=torch.bool, device=W.device)
        need[:n] = ~reached
        if bool(need.any()):
            total = self.count.sum()
            Mv = self.M[self.mask]  # (n_valid, d)
            first = (self.pooled_pbar[None] * Wu[need]) @ W
            second = ((u[need] @ Mv.T) @ Mv) / total
            fu[need] = first - second
        return fu / self.temperature**2


def reference_fisher(W: torch.Tensor, b: torch.Tensor | None, Z_ref: torch.Tensor, mask: torch.Tensor,
                     temperature: float = 1.0) -> ReferenceFisher:
    """The factored reference Fisher (:class:`ReferenceFisher`) of reference (u = 0) pre-logits
    Z_ref (R, T_ref, d) at the positions where ``mask`` (R, T_ref) is True."""
    R, T_ref, d = Z_ref.shape
    if mask.shape != (R, T_ref):
        raise ParameterError(f"mask must have shape (R, T_ref) = ({R}, {T_ref}), got {tuple(mask.shape)}")
    mask = mask.to(W.device).bool()
    count = mask.sum(0).to(W.dtype)
    if float(count.sum()) == 0:
        raise ParameterError("the reference rollouts have no valid position")
    p = torch.softmax(_logits(W, b, Z_ref.to(dtype=W.dtype, device=W.device)) / temperature, dim=-1)  # (R, T, V)
    p = p * mask.to(W.dtype)[..., None]
    M = p @ W  # (R, T, d); zero at invalid positions
    psum = p.sum(0)  # (T, V)
    return ReferenceFisher(pbar=psum / count.clamp_min(1)[:, None], M=M, mask=mask, count=count,
                           pooled_pbar=psum.sum(0) / count.sum(), temperature=temperature)


def fisher_vector_product(W: torch.Tensor, b: torch.Tensor | None, Z_ref: torch.Tensor, mask: torch.Tensor,
                          u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """F_t u_t for every position t, matrix-free, shape (T_u, d).

    F_t = mean over the reference rows r valid at t of W^T (diag p - p p^T) W / temperature^2 with
    p = softmax((W z_t^r + b) / temperature), so F_t u_t = mean_r W^T (p * (W u_t) - p (p . W u_t)) / tau^2.
    A position that no reference row reached (t >= every reference length) uses the Fisher pooled
    over all valid reference positions instead (so the penalty still acts there).

    Args:
        W: (V, d); b: (V,) or None. Z_ref: (R, T_ref, d) reference (unsteered, u = 0) pre-logits.
        mask: (R, T_ref) bool, True where the position was generated. u: (T_u, d).
    Returns:
        (T_u, d) in the dtype of W. The d x d matrices are never formed
        (:func:`reference_fisher` factors them once; the driver reuses the factors every step).
    """
    return reference_fisher(W, b, Z_ref, mask, temperature).apply(W, u)


def sequence_kl(W: torch.Tensor, b: torch.Tensor | None, Z: torch.Tensor, u: torch.Tensor, lengths: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """Per-sample Monte-Carlo terms of the sequence-level KL(pi_u || pi_ref), shape (K,).

    For y^i ~ pi_u, sum_{t < lengths_i} KL(softmax((W (z_t^i + u_t) + b) / tau) || softmax((W z_t^i + b) / tau)):
    the exact token-level KL on sample i's own prefix, summed over its real positions. Both
    distributions come from the same z_t (steering only adds W u_t to the logits). The mean over
    i is an unbiased estimate of KL(pi_u || pi_ref) over whole responses; the caller averages (and
    bootstraps). Z: (K, T, d); u: (T_u, d); lengths: (K,). The sampler records the same terms while
    generating (``record_kl``, :attr:`prelogit.sampling.Generation.kl`).
    """
    logp, logq = _log_policies(W, b, Z, u, temperature)
    return _kl_terms(logp, logq, _position_mask(lengths.to(W.device), Z.shape[1]))


# ---- driver --------------------------------------------------------------------------------------------

SHARED_FIELDS = ("K", "steps", "final_rollout")


def check_sampler_for_misvo(sampler: PrelogitSampler, decode: str | None = None) -> None:
    """MISVO's score function needs plain sampling at the sampler's temperature, without truncation."""
    decode = decode or sampler.decode
    if decode != "sample":
        raise ParameterError(f"MISVO needs decode = 'sample' (greedy decoding has no score function), got {decode!r}")
    if 0 < sampler.top_k < sampler.head.weight.shape[0]:
        raise ParameterError(f"MISVO needs top_k = 0 (its score function assumes the untruncated softmax), "
                             f"got top_k = {sampler.top_k}")
    if sampler.top_p < 1.0:
        raise ParameterError(f"MISVO needs top_p = 1 (its score function assumes the untruncated softmax), "
                             f"got top_p = {sampler.top_p}")


def run_misvo_many(sampler: PrelogitSampler, reward: RewardModel, prompts: Sequence[str], user_texts: Sequence[str],
                   cfg: MISVOConfig | Sequence[MISVOConfig], generators: Sequence[torch.Generator],
                   decode: str | None = None) -> list[MISVORecord]:
    """MISVO on several prompts in lockstep; one JSON-ready record per prompt.

    Each step generates every prompt's K rows in one sampler call (steered by the prompt's current
    u, shape (K, T, d) with T = ``sampler.max_new_tokens``; unsteered pre-logits recorded) and
    scores them in one reward call; the prefill is computed once. A prompt's token draws come
    from its own generator (:func:`prelogit.engine.prompt_generator`) and nothing else is random, so
    its record does not depend on the other prompts of the batch.

    Args:
        sampler: the sampler; decode must be ``sample`` with top_k = 0 and top_p = 1 (its temperature applies).
        reward: the reward model that is optimised. prompts: templated prompts; user_texts: the
            raw user turns the reward sees. cfg: one :class:`MISVOConfig` or one per prompt (sharing
            K, steps and final_rollout).
        generators: one RNG per prompt. decode: overrides the sampler's decode mode (must be ``sample``).
    Returns:
        Per prompt: ``method`` ("misvo"), ``config``, ``samples_used`` (K * steps), ``best`` (reward,
        response, step, index), ``iterations`` (per step k = 1..steps: ``samples_so_far`` = K * k, the
        K rewards, responses and lengths, ``u_norm`` (||u|| of the control these samples were drawn
        with), ``grad_norm`` (||g||), ``u_norm_next`` (after the update), ``kl_sequence`` (the K per-sample
        Monte-Carlo terms of KL(pi_u || pi_ref) of this step's samples, see :func:`sequence_kl`;
        0 at step 1), ``kl_sequence_mean`` and ``best_so_far``), ``final_rollout`` (None, or the response
        generated from the final u, its reward and its ``kl_sequence`` term, recorded by the sampler), and
        ``cost`` (as for AISP). ``best_so_far`` after step k is the answer of MISVO with steps = k. Every
        field, its shape and unit: :class:`prelogit.records.MISVORecord`.
    Raises:
        ParameterError: greedy decoding, top-k or top-p on, or bad configs.
    """
    check_prompt_lists(prompts, user_texts, generators)
    check_sampler_for_misvo(sampler, decode)
    P, d, T = len(prompts), sampler.d, sampler.max_new_tokens
    cfgs = per_prompt_configs(cfg, P, MISVOConfig, SHARED_FIELDS, "run_misvo_many")
    K, steps, final_rollout = cfgs[0].K, cfgs[0].steps, cfgs[0].final_rollout
    tau = sampler.temperature
    head = sampler.head
    # the precision the sampler drew in (float32 for float32/bf16/fp16 models), float64 for a float64 model
    dtype = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    W = head.weight.detach().to(dtype)
    b = None if getattr(head, "bias", None) is None else head.bias.detach().to(dtype)
    meters = [CostMeter() for _ in range(P)]
    pre = prefill(sampler, prompts, meters)
    U = [torch.zeros(T, d, dtype=torch.float64, device=W.device) for _ in range(P)]
    ref: list[ReferenceFisher | None] = [None] * P
    # a placeholder until the first step replaces it: every reward is finite (engine.score checks), so > -inf
    best: list[MISVOBest] = [cast(MISVOBest, {"reward": float("-inf"), "response": None, "step": None, "index": None})
                             for _ in range(P)]
    iterations: list[list[MISVOIteration]] = [[] for _ in range(P)]
    for k in range(1, steps + 1):
        # the control the sampler applies is u rounded to float32; the algebra uses that same value
        applied = [u.float() for u in U]
        gens = generate(sampler, pre, [K] * P, meters, controls=[a[None].expand(K, T, d).cpu() for a in applied],
                         generators=generators, decode="sample", record_prelogits=True)
        scores = score(reward, user_texts, gens, meters)
        for p in range(P):
            c, g, r = cfgs[p], gens[p], scores[p]
            Z = g.prelogits  # (K, T_used, d), unsteered
            assert Z is not None  # record_prelogits=True above
            mask = _position_mask(g.lengths.to(W.device), Z.shape[1])
            if k == 1 and c.lam > 0 and c.fisher == "reference":
                ref[p] = reference_fisher(W, b, Z, mask, tau)
            i_best = int(torch.argmax(r))
            if float(r[i_best]) > best[p]["reward"]:
                best[p] = {"reward": float(r[i_best]), "response": g.texts[i_best], "step": k, "index": i_best}
            logp, logq = _log_policies(W, b, Z, applied[p], tau)
            kl = _kl_terms(logp, logq, mask)
            grad = _gradient(W, logp, g.tokens, mask, loo_advantages(r), tau, T).to(torch.float64)
            del logp, logq
            step = grad
            if c.lam > 0:
                # ref[p] was set at k = 1 (lam > 0 and fisher "reference")
                Fu = U[p] if c.fisher == "identity" else cast(ReferenceFisher, ref[p]).apply(W, U[p]).to(torch.float64)
                step = grad - c.lam * Fu
            # u_norm_next, after the update, is filled in below
            rec = cast(MISVOIteration, {
                "k": k, "samples_so_far": K * k, "rewards": r.tolist(), "responses": g.texts,
                "lengths": g.lengths.tolist(), "u_norm": float(U[p].norm()), "grad_norm": float(grad.norm()),
                "kl_sequence": kl.tolist(), "kl_sequence_mean": float(kl.mean()), "best_so_far": dict(best[p])})
            U[p] = U[p] + c.eta * step
            rec["u_norm_next"] = float(U[p].norm())
            iterations[p].append(rec)
    finals: list[MISVOFinalRollout | None] = [None] * P
    if final_rollout:
        gens = generate(sampler, pre, [1] * P, meters, controls=[u.float()[None].cpu() for u in U],
                         generators=generators, decode="sample", record_kl=True)
        scores = score(reward, user_texts, gens, meters)
        # g.kl is set: record_kl=True
        finals = [{"responses": g.texts, "rewards": s_.tolist(), "kl_sequence": cast(torch.Tensor, g.kl).tolist(),
                   "u_norm": float(u.norm())} for g, s_, u in zip(gens, scores, U)]
    return [{"method": "misvo", "config": cast(MISVOConfigDict, asdict(cfgs[p])), "samples_used": cfgs[p].budget,
             "best": best[p], "iterations": iterations[p], "final_rollout": finals[p], "cost": meters[p].as_dict()}
            for p in range(P)]


def run_misvo(sampler: PrelogitSampler, reward: RewardModel, prompt: str, user_text: str, cfg: MISVOConfig,
              generator: torch.Generator, decode: str | None = None) -> MISVORecord:
    """MISVO on one prompt: :func:`run_misvo_many` with a single prompt."""
    return run_misvo_many(sampler, reward, [prompt], [user_text], cfg, [generator], decode)[0]
