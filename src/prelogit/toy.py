"""The theory stage's Monte-Carlo harness (``notebooks/theory.ipynb``): Gaussian toy problems and checks.

It builds Gaussian toy problems (linear and quadratic rewards, where the optimal distribution q* is
Gaussian and known), runs the estimator of :mod:`prelogit.control` on them, and gives what the
estimates are compared with: the optimal mean, the fixed points of both ``alpha_mode``s, the
delta-method error and ESS of self-normalised importance sampling (from the closed forms of
:mod:`prelogit.theory`), and tolerances of k Monte-Carlo standard errors (:func:`judge`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import ParameterError, check_choice, check_number
from .control import effective_sample_size, importance_weights, update_mean
from .theory import F64, ESSPrediction, log_weight_moment, mppi_fixed_point_linear, optimal_mean_linear, predict_ess


# Every toy works with V flattened to (n, D); :func:`as_control` reshapes it to the (n, tau=1, d=D)
# layout of :mod:`prelogit.control`. The Gaussian algebra does not depend on how D is split into
# tau x d, so one layout covers every (tau, d) with tau * d = D. Computations are in float64.



def as_control(V: torch.Tensor) -> torch.Tensor:
    """(n, D) or (D,) flat draws -> the (n, 1, D) or (1, D) layout of :mod:`prelogit.control`."""
    return V.unsqueeze(-2)


def make_generator(seed: int, *tags: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from ``seed`` and any tags (deterministic across runs).

    Each part of an experiment gets its own stream, so resizing one part (more seeds, a longer
    n grid) leaves the random numbers of every other part unchanged.
    """
    check_number("seed", seed, low=0, integer=True)
    return torch.Generator().manual_seed(zlib.crc32(repr((seed, *tags)).encode()) + (seed << 32))


def random_direction(D: int, generator: torch.Generator) -> torch.Tensor:
    """A uniformly random unit vector in R^D, shape (D,), float64."""
    v = torch.randn(D, generator=generator, dtype=F64)
    return v / v.norm()


@dataclass(frozen=True)
class GaussianToy:
    """Reward r(V) = -1/2 V^T (A + iso I) V + <b, V> over V in R^D, base P = N(0, sigma^2 I_D).

    A = None and iso = 0 is the linear reward <b, V> (b is the spec's ``a``). The optimal
    distribution q* ~ exp(r/lam) p is then the Gaussian N(optimum, target_cov) with precision
    (A + iso I)/lam + I/sigma^2. ``iso`` keeps an isotropic curvature cheap in large D.

    Attributes:
        b: (D,) float64, reward units per pre-logit unit.
        A: (D, D) float64 positive semi-definite, or None.
        sigma: base standard deviation (pre-logit units); lam: temperature (reward units).
        iso: isotropic curvature (reward units per squared pre-logit unit), >= 0.
    """

    b: torch.Tensor
    A: torch.Tensor | None
    sigma: float
    lam: float
    iso: float = 0.0

    @property
    def D(self) -> int:
        return self.b.shape[0]

    @property
    def kind(self) -> str:
        return "linear" if self.A is None and self.iso == 0 else "quadratic"

    def reward(self, V: torch.Tensor) -> torch.Tensor:
        """r(V) for V of shape (n, D) -> (n,), float64."""
        V = V.to(F64)
        r = V @ self.b
        if self.A is not None:
            r = r - 0.5 * ((V @ self.A) * V).sum(-1)
        if self.iso:
            r = r - 0.5 * self.iso * (V * V).sum(-1)
        return r

    def _solve(self, shift: float, rhs: torch.Tensor) -> torch.Tensor:
        """(A/lam + (iso/lam + shift) I)^{-1} rhs."""
        diag = self.iso / self.lam + shift
        if self.A is None:
            return rhs / diag
        M = self.A / self.lam + diag * torch.eye(self.D, dtype=F64)
        return torch.linalg.solve(M, rhs)

    @property
    def optimum(self) -> torch.Tensor:
        """(D,) the optimal mean u* = E_{q*}[V] (closed form; see :func:`prelogit.theory.optimal_mean_quadratic`)."""
        if self.kind == "linear":
            return optimal_mean_linear(self.b.to(F64), self.sigma, self.lam)
        return self._solve(1.0 / self.sigma**2, self.b.to(F64) / self.lam)

    @property
    def target_cov(self) -> torch.Tensor:
        """(D, D) covariance of q*."""
        return self._solve(1.0 / self.sigma**2, torch.eye(self.D, dtype=F64))

    def expected_update(self, U: torch.Tensor, alpha: float, alpha_mode: str) -> torch.Tensor:
        """The n -> infinity limit of one :func:`prelogit.control.update_mean` step from U, (D,).

        ``mppi`` weights exp(r/lam - (1 - alpha) <U, V>/sigma^2) on V ~ N(U, sigma^2 I) tilt the
        proposal to a Gaussian with the precision of q* and mean
        (A/lam + I/sigma^2)^{-1} (alpha U/sigma^2 + b/lam). ``step`` weights tilt exactly to q*,
        so the step is U + alpha (u* - U).
        """
        check_number("alpha", alpha, low=0, high=1)
        check_choice("alpha_mode", alpha_mode, ("mppi", "step"))
        U = U.to(F64)
        if alpha_mode == "step":
            return (1.0 - alpha) * U + alpha * self.optimum
        return self._solve(1.0 / self.sigma**2, alpha * U / self.sigma**2 + self.b.to(F64) / self.lam)

    def fixed_point(self, alpha: float, alpha_mode: str) -> torch.Tensor:
        """(D,) fixed point of :meth:`expected_update`.

        ``step`` (alpha > 0): u*. ``mppi``: (A/lam + (1 - alpha) I/sigma^2)^{-1} b/lam, which is
        sigma^2 b / (lam (1 - alpha)) for the linear reward (:func:`prelogit.theory.mppi_fixed_point_linear`).
        """
        check_choice("alpha_mode", alpha_mode, ("mppi", "step"))
        if alpha_mode == "step":
            check_number("alpha", alpha, low=0, high=1, low_open=True)
            return self.optimum
        if self.kind == "linear":
            return mppi_fixed_point_linear(self.b.to(F64), self.sigma, self.lam, alpha)
        check_number("alpha", alpha, low=0, high=1)
        return self._solve((1.0 - alpha) / self.sigma**2, self.b.to(F64) / self.lam)


def linear_problem(D: int, sigma: float, lam: float, kappa: float, generator: torch.Generator) -> GaussianToy:
    """Linear reward <a, V>, a in a random direction, with ||u*|| = kappa * sigma.

    kappa = ||u*|| / sigma: the optimum's distance from the base mean in units of sigma.
    KL(q* || P) = kappa^2 / 2, and sampling from U = 0 gives an asymptotic ESS / n = exp(-kappa^2).
    """
    check_number("D", D, low=1, integer=True)
    check_number("kappa", kappa, low=0, low_open=True)
    a = random_direction(D, generator) * kappa * lam / sigma  # u* = sigma^2 a / lam = kappa sigma e
    return GaussianToy(b=a, A=None, sigma=float(sigma), lam=float(lam))


def quadratic_problem(D: int, sigma: float, lam: float, kappa: float, curvatures: Sequence[float] | torch.Tensor,
                      generator: torch.Generator) -> GaussianToy:
    """Quadratic reward with A = (lam/sigma^2) Q diag(curvatures) Q^T and ||u*|| = kappa * sigma.

    ``curvatures`` (r values >= 0, r <= D) are the eigenvalues of sigma^2 A / lam on a random
    r-dimensional subspace Q; A is singular when r < D. Along Q, q* is narrower than P: its
    variance is sigma^2 / (1 + curvature). b is chosen so that u* lies in a random direction at
    distance kappa * sigma from 0.
    """
    check_number("D", D, low=1, integer=True)
    check_number("kappa", kappa, low=0, low_open=True)
    c = torch.as_tensor(curvatures, dtype=F64).flatten()
    if c.numel() < 1 or c.numel() > D or (c < 0).any() or not torch.isfinite(c).all():
        raise ParameterError(f"curvatures must be 1 to D = {D} finite values >= 0, got {c.tolist()}")
    Q, _ = torch.linalg.qr(torch.randn(D, c.numel(), generator=generator, dtype=F64))
    A = (lam / sigma**2) * (Q * c) @ Q.T
    A = 0.5 * (A + A.T)
    u_star = random_direction(D, generator) * kappa * sigma
    b = A @ u_star + lam * u_star / sigma**2  # so that optimal_mean_quadratic(A, b) = u_star
    return GaussianToy(b=b, A=A, sigma=float(sigma), lam=float(lam))


# ---- the importance-sampling estimate -------------------------------------------------------------

@dataclass
class ISEstimate:
    """One self-normalised importance-sampling estimate.

    U_hat: (D,) the updated mean; weights: (n,); V: (n, D) draws from N(U, sigma^2 I);
    rewards: (n,); ess: Kish effective sample size in [1, n].
    """

    U_hat: torch.Tensor
    weights: torch.Tensor
    V: torch.Tensor
    rewards: torch.Tensor
    ess: float


def draw(U: torch.Tensor, sigma: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws from N(U, sigma^2 I_D), shape (n, D), float64.

    The standard normals are drawn in float32 (five times faster on CPU) and widened: their
    rounding, about 1e-7 relative, is far below any Monte-Carlo error measured here.
    """
    check_number("n", n, low=1, integer=True)
    U = U.to(F64)
    return U + sigma * torch.randn(n, U.shape[0], generator=generator, dtype=torch.float32).to(F64)


def estimate_from(problem: GaussianToy, U: torch.Tensor, V: torch.Tensor, rewards: torch.Tensor | None = None,
                  alpha: float = 0.0, alpha_mode: str = "mppi") -> ISEstimate:
    """The update from given draws V (n, D) of N(U, sigma^2 I), with :mod:`prelogit.control`."""
    r = problem.reward(V) if rewards is None else rewards
    U3, V3 = as_control(U.to(F64)), as_control(V)
    w = importance_weights(r, V3, U3, problem.sigma, problem.lam, alpha, alpha_mode)
    U_new = update_mean(U3, V3, w, alpha, alpha_mode)[0]
    return ISEstimate(U_hat=U_new, weights=w, V=V, rewards=r, ess=effective_sample_size(w))


def is_estimate(problem: GaussianToy, U: torch.Tensor, n: int, generator: torch.Generator, alpha: float = 0.0,
                alpha_mode: str = "mppi") -> ISEstimate:
    """Draw n samples from Q_U = N(U, sigma^2 I) and update the mean (spec sections 3-4).

    With alpha = 0 (either mode) U_hat is the self-normalised estimate of the closed-form u*.
    """
    return estimate_from(problem, U, draw(U, problem.sigma, n, generator), None, alpha, alpha_mode)


def relative_error_curve(problem: GaussianToy, U: torch.Tensor, n_grid: Sequence[int], n_seeds: int,
                         generator: torch.Generator) -> torch.Tensor:
    """Relative error ||U_hat - u*|| / ||u*|| from proposal U, shape (n_seeds, len(n_grid)).

    Each seed draws max(n_grid) samples once and estimates from its first n (nested prefixes):
    the curves are smooth in n and the seeds independent, so statistics across seeds
    (:func:`fit_loglog_slope`) have honest standard errors.
    """
    n_grid = [int(n) for n in n_grid]
    check_number("n_seeds", n_seeds, low=2, integer=True)
    for n in n_grid:
        check_number("n_grid entry", n, low=2, integer=True)
    u_star = problem.optimum
    scale = float(u_star.norm())
    if scale == 0:
        raise ParameterError("the optimum is 0, so a relative error is undefined; use kappa > 0")
    errors = torch.empty(n_seeds, len(n_grid), dtype=F64)
    for s in range(n_seeds):
        V = draw(U, problem.sigma, max(n_grid), generator)
        r = problem.reward(V)
        for g, n in enumerate(n_grid):
            errors[s, g] = (estimate_from(problem, U, V[:n], r[:n]).U_hat - u_star).norm() / scale
    return errors


# ---- the delta method on a toy: the error and ESS it predicts ------------------------------------

def predicted_error_cov(problem: GaussianToy, U: torch.Tensor) -> torch.Tensor:
    """Asymptotic n * Cov(U_hat) of the self-normalised estimate from proposal U, (D, D) (delta method).

    It is E_q[w~^2 (V - u*)(V - u*)^T] with w~ = q*/q: q*^2/q is an unnormalised Gaussian with
    precision 2 P* - I/sigma^2 (P* the precision of q*), mass E_q[w~^2] and mean mu, so this is
    E_q[w~^2] ((2 P* - I/sigma^2)^{-1} + (mu - u*)(mu - u*)^T). Squared pre-logit units.
    """
    m, S = problem.optimum, problem.target_cov
    P_star = torch.linalg.inv(S)
    P_2 = 2 * P_star - torch.eye(problem.D, dtype=F64) / problem.sigma**2
    C = torch.linalg.inv(P_2)
    mu = C @ (2 * P_star @ m - U.to(F64) / problem.sigma**2)
    mass = math.exp(log_weight_moment(2, U, problem.sigma, m, S))
    return mass * (C + torch.outer(mu - m, mu - m))


def predicted_mse(problem: GaussianToy, U: torch.Tensor) -> float:
    """Asymptotic n * E||U_hat - u*||^2 from proposal U: the trace of :func:`predicted_error_cov`.

    For a linear reward it is exp(||u* - U||^2/sigma^2) (D sigma^2 + ||u* - U||^2).
    """
    return float(torch.trace(predicted_error_cov(problem, U)))


def mse_ratio_se(problem: GaussianToy, U: torch.Tensor, n_seeds: int) -> float:
    """Delta-method standard error of (mean over n_seeds of ||U_hat - u*||^2) / (predicted MSE).

    Asymptotically U_hat - u* is Gaussian with covariance C/n, so ||U_hat - u*||^2 has mean
    tr(C)/n and variance 2 tr(C^2)/n^2. This is steadier than the spread of a few seeds, whose
    squared errors are skewed (chi-square-like) and often make a seed-based standard error far
    too small.
    """
    check_number("n_seeds", n_seeds, low=1, integer=True)
    C = predicted_error_cov(problem, U)
    return math.sqrt(2.0 * float((C * C).sum()) / n_seeds) / float(torch.trace(C))


def predict_ess_for(problem: GaussianToy, U: torch.Tensor, n: int) -> ESSPrediction:
    """:func:`prelogit.theory.predict_ess` for the exact weights (alpha = 0) of ``problem`` sampled from U."""
    m, S = problem.optimum, problem.target_cov
    return predict_ess([log_weight_moment(k, U, problem.sigma, m, S) for k in (2, 3, 4)], n)


def ess_testable(prediction: ESSPrediction, n_seeds: int) -> bool:
    """True where the asymptotic ESS prediction can be checked with n_seeds runs.

    That needs the O(1/n) bias term to be smaller than the standard error of a mean over the
    seeds, sd / sqrt(n_seeds): the systematic error then stays below the Monte-Carlo resolution.
    """
    return math.isfinite(prediction.sd) and abs(prediction.bias) <= prediction.sd / math.sqrt(n_seeds)


# ---- slope of the error against n -----------------------------------------------------------------

@dataclass(frozen=True)
class SlopeFit:
    """Log-log slope of an error against n.

    slope: mean over seeds of each seed's least-squares slope of log(error) on log(n).
    se: its standard error across seeds, with ``df`` = n_seeds - 1 degrees of freedom.
    per_seed: (n_seeds,) the per-seed slopes.
    rms_slope, rms_intercept: the fit to the root-mean-square error over seeds (for plots).
    """

    slope: float
    se: float
    df: int
    per_seed: torch.Tensor
    rms_slope: float
    rms_intercept: float


def fit_loglog_slope(n_grid: Sequence[int], errors: torch.Tensor) -> SlopeFit:
    """Fit log(error) = c + slope log(n) per seed; ``errors`` is (n_seeds, len(n_grid)).

    Asymptotically the error is a fixed law scaled by n^{-1/2}, so E[log error] has slope -1/2
    exactly; the per-seed slopes are independent, so their spread gives the standard error.
    """
    x = torch.log(torch.as_tensor(n_grid, dtype=F64))
    if errors.dim() != 2 or errors.shape[1] != x.numel() or x.numel() < 2 or errors.shape[0] < 2:
        raise ParameterError(f"errors must be (n_seeds >= 2, len(n_grid) = {x.numel()} >= 2), "
                             f"got {tuple(errors.shape)}")
    xc = x - x.mean()
    y = torch.log(errors.to(F64).clamp_min(1e-300))
    per_seed = (y - y.mean(1, keepdim=True)) @ xc / (xc @ xc)
    rms = 0.5 * torch.log(errors.to(F64).pow(2).mean(0))
    rms_slope = float((rms - rms.mean()) @ xc / (xc @ xc))
    S = errors.shape[0]
    return SlopeFit(slope=float(per_seed.mean()), se=float(per_seed.std() / math.sqrt(S)), df=S - 1,
                    per_seed=per_seed, rms_slope=rms_slope, rms_intercept=float(rms.mean() - rms_slope * x.mean()))


# ---- iterating the update ----------------------------------------------------------------------------

def iterate_mean(problem: GaussianToy, U0: torch.Tensor, K: int, n: int, alpha: float, alpha_mode: str,
                 generator: torch.Generator) -> torch.Tensor:
    """K sampled updates U <- update_mean(U, V, w) with n fresh draws each: trajectory (K + 1, D)."""
    check_number("K", K, low=1, integer=True)
    traj = torch.empty(K + 1, problem.D, dtype=F64)
    traj[0] = U0.to(F64)
    for k in range(K):
        traj[k + 1] = is_estimate(problem, traj[k], n, generator, alpha, alpha_mode).U_hat
    return traj


def expected_trajectory(problem: GaussianToy, U0: torch.Tensor, K: int, alpha: float,
                        alpha_mode: str) -> torch.Tensor:
    """The n -> infinity trajectory (K + 1, D) of :func:`iterate_mean` (closed-form recursion).

    For the linear reward: mppi U_k = alpha^k U0 + (1 - alpha^k) u*/(1 - alpha);
    step U_k = (1 - alpha)^k U0 + (1 - (1 - alpha)^k) u*.
    """
    check_number("K", K, low=1, integer=True)
    traj = [U0.to(F64)]
    for _ in range(K):
        traj.append(problem.expected_update(traj[-1], alpha, alpha_mode))
    return torch.stack(traj)


# ---- KL --------------------------------------------------------------------------------------------

def kl_monte_carlo(U: torch.Tensor, sigma: float, n: int, generator: torch.Generator) -> tuple[float, float]:
    """Monte-Carlo KL(Q_U || P) = E_Q[log q_U(V) - log p(V)] and its standard error, in nats.

    U: any shape (flattened). Each of the n draws V ~ N(U, sigma^2 I) contributes
    (||V||^2 - ||V - U||^2) / (2 sigma^2); compare :func:`prelogit.theory.kl_to_base`.
    """
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("n", n, low=2, integer=True)
    u = U.to(F64).flatten()
    V = draw(u, sigma, n, generator)
    log_ratio = ((V**2).sum(1) - ((V - u) ** 2).sum(1)) / (2 * sigma**2)
    return float(log_ratio.mean()), float(log_ratio.std() / math.sqrt(n))


# ---- effective sample size against lambda and D ------------------------------------------------------

@dataclass
class Sweep:
    """ESS / n and the largest weight over a swept parameter, n draws per run, n_seeds runs.

    grid: the swept values; ess_fraction, max_weight: (n_seeds, len(grid)); prediction: an
    :class:`prelogit.theory.ESSPrediction` per grid value; extra: sweep-specific (n_seeds, len(grid)) tensors.
    """

    grid: list[float]
    n: int
    ess_fraction: torch.Tensor
    max_weight: torch.Tensor
    prediction: list[ESSPrediction]
    extra: dict


def seed_stats(x: torch.Tensor | Sequence[float]) -> tuple[float, float, int]:
    """Mean over seeds (dim 0), its standard error and its degrees of freedom (float64)."""
    x = torch.as_tensor(x, dtype=F64)
    return float(x.mean()), float(x.std() / math.sqrt(x.shape[0])), x.shape[0] - 1


def ess_points(sweep: Sweep, n_seeds: int) -> list[tuple[float, float, int, ESSPrediction, bool]]:
    """Per grid value of an ESS sweep: ``(mean, se, df, prediction, testable)``, the ESS / n averaged over the
    seeds with its standard error and degrees of freedom (:func:`seed_stats`), the asymptotic prediction, and
    whether ``n_seeds`` runs can check it (:func:`ess_testable`)."""
    points = []
    for j in range(len(sweep.grid)):
        p = sweep.prediction[j]
        m, se, df = seed_stats(sweep.ess_fraction[:, j])
        points.append((m, se, df, p, ess_testable(p, n_seeds)))
    return points


def ess_vs_lam(D: int, sigma: float, lam_ratios: Sequence[float], n: int, n_seeds: int,
               generator: torch.Generator) -> Sweep:
    """ESS and the best-of-n limit as lambda shrinks: linear reward, sampled at U = 0.

    lam_ratios: lambda in units of the reward's standard deviation under P (sigma ||a|| = 1
    here); the asymptotic ESS / n is exp(-1/ratio^2). The same draws serve every lambda.
    extra: ``bon_match`` (bool) the largest weight sits on the highest reward;
    ``one_minus_wmax`` 1 - max_i w_i and ``wmax_bound`` its exact bound sum_{i != best}
    exp(-(r_best - r_i)/lam); ``bon_distance`` ||U_hat - V_best|| / ||V_best|| and
    ``bon_bound`` its bound sum_{i != best} exp(-(r_best - r_i)/lam) ||V_i - V_best|| / ||V_best||.
    Both bounds follow from w_i / w_best = exp(-(r_best - r_i)/lam) at U = 0 and go to 0 with lam.
    """
    check_number("n_seeds", n_seeds, low=1, integer=True)
    ratios = [float(x) for x in lam_ratios]
    for x in ratios:
        check_number("lam_ratios entry", x, low=0, low_open=True)
    a = random_direction(D, generator) / sigma  # reward sd under P is sigma ||a|| = 1
    U = torch.zeros(D, dtype=F64)
    shape = (n_seeds, len(ratios))
    ess, wmax = torch.empty(shape, dtype=F64), torch.empty(shape, dtype=F64)
    extra = {"bon_match": torch.empty(shape, dtype=torch.bool), "one_minus_wmax": torch.empty(shape, dtype=F64),
             "wmax_bound": torch.empty(shape, dtype=F64), "bon_distance": torch.empty(shape, dtype=F64),
             "bon_bound": torch.empty(shape, dtype=F64)}
    problems = [GaussianToy(b=a, A=None, sigma=float(sigma), lam=lam) for lam in ratios]
    for s in range(n_seeds):
        V = draw(U, sigma, n, generator)
        r = problems[0].reward(V)
        best = int(r.argmax())
        v_best = V[best]
        spread = (V - v_best).norm(dim=1)
        for j, (lam, problem) in enumerate(zip(ratios, problems)):
            est = estimate_from(problem, U, V, r)
            ess[s, j], wmax[s, j] = est.ess / n, est.weights.max()
            ratio_w = torch.exp(-(r[best] - r) / lam)
            ratio_w[best] = 0.0
            extra["bon_match"][s, j] = int(est.weights.argmax()) == best
            extra["one_minus_wmax"][s, j] = float(est.weights.sum() - est.weights[best])
            extra["wmax_bound"][s, j] = ratio_w.sum()
            extra["bon_distance"][s, j] = (est.U_hat - v_best).norm() / v_best.norm()
            extra["bon_bound"][s, j] = (ratio_w * spread).sum() / v_best.norm()
    preds = [predict_ess_for(p, U, n) for p in problems]
    return Sweep(grid=ratios, n=n, ess_fraction=ess, max_weight=wmax, prediction=preds, extra=extra)


def ess_vs_dim(dims: Sequence[int], sigma: float, lam: float, n: int, n_seeds: int, generator: torch.Generator,
               kind: str = "mean", shift: float = 0.05, curvature: float = 0.1) -> Sweep:
    """ESS / n at fixed n as D = tau * d grows, with the same mismatch in every coordinate.

    kind ``mean``: linear reward whose optimum is ``shift * sigma`` from 0 in every coordinate,
    sampled at U = 0: q* and the proposal differ in their means; ESS / n -> exp(-D shift^2).
    kind ``covariance``: isotropic quadratic reward (sigma^2 A / lam = curvature I) sampled at its
    optimum: only the widths differ, variance ratio s = 1/(1 + curvature); ESS / n ->
    (s (2 - s))^{D/2}.
    Either way the log of 1 + chi^2 adds up over coordinates, so importance sampling with a
    fixed n degenerates once D times the per-coordinate mismatch exceeds about log n.
    The predictions use this factorisation (one coordinate's moments times D), so they cost
    nothing even for D in the thousands.
    """
    check_choice("kind", kind, ("mean", "covariance"))
    check_number("shift", shift, low=0)
    check_number("curvature", curvature, low=0)
    dims = [int(D) for D in dims]
    for D in dims:
        check_number("dims entry", D, low=1, integer=True)
    iso = curvature * lam / sigma**2 if kind == "covariance" else 0.0
    one = GaussianToy(b=torch.full((1,), shift * (lam / sigma + iso * sigma), dtype=F64), A=None,
                      sigma=float(sigma), lam=float(lam), iso=iso)  # optimum shift * sigma
    U_one = torch.zeros(1, dtype=F64) if kind == "mean" else one.optimum
    per_coord = [log_weight_moment(k, U_one, sigma, one.optimum, one.target_cov) for k in (2, 3, 4)]
    ess = torch.empty(n_seeds, len(dims), dtype=F64)
    wmax = torch.empty_like(ess)
    preds = []
    for j, D in enumerate(dims):
        signs = torch.where(torch.rand(D, generator=generator) < 0.5, -1.0, 1.0).to(F64)
        problem = GaussianToy(b=one.b[0] * signs, A=None, sigma=float(sigma), lam=float(lam), iso=iso)
        U = torch.zeros(D, dtype=F64) if kind == "mean" else U_one[0] * signs
        for s in range(n_seeds):
            est = is_estimate(problem, U, n, generator)
            ess[s, j], wmax[s, j] = est.ess / n, est.weights.max()
        preds.append(predict_ess([D * x for x in per_coord], n))
    return Sweep(grid=[float(D) for D in dims], n=n, ess_fraction=ess, max_weight=wmax, prediction=preds, extra={})


# ---- pass / fail with tolerances from the Monte-Carlo error ---------------------------------------

@dataclass
class Check:
    """One check: |value - expected| <= tolerance.

    Either ``se``, a Monte-Carlo standard error with ``df`` degrees of freedom (None: from one
    large sample, treated as normal), and :func:`judge` sets the tolerance to k standard errors;
    or ``bound``, an exact bound that the theory derives from the same draws.
    """

    name: str
    value: float
    expected: float
    se: float | None = None
    df: int | None = None
    bound: float | None = None
    note: str = ""


def tolerance_multiplier(false_alarm: float, n_checks: int, df: int | None = None) -> float:
    """k such that n_checks two-sided k-standard-error checks of true statements all pass with
    probability at least 1 - false_alarm (Bonferroni; Student's t with ``df`` degrees of freedom
    when the standard error itself was estimated from df + 1 seeds)."""
    check_number("false_alarm", false_alarm, low=0, high=1, low_open=True, high_open=True)
    check_number("n_checks", n_checks, low=1, integer=True)
    from scipy import stats  # only here: keeps `import prelogit.theory` light for the other stages

    q = 1.0 - false_alarm / (2 * n_checks)
    return float(stats.t.ppf(q, df) if df else stats.norm.ppf(q))


def judge(checks: Sequence[Check], false_alarm: float) -> dict[str, dict]:
    """Pass/fail for every check at a family-wise false-alarm rate ``false_alarm``.

    Returns {name: {value, expected, se, k, tolerance, pass, note}}, ready for JSON.
    """
    names = [c.name for c in checks]
    if len(set(names)) != len(names):
        raise ParameterError(f"check names must be unique; duplicated: {sorted({x for x in names if names.count(x) > 1})}")
    se_checks = sum(c.bound is None for c in checks)
    out = {}
    for c in checks:
        if c.bound is not None:
            k, tol = None, float(c.bound)
        elif c.se is not None and math.isfinite(c.se):
            k = tolerance_multiplier(false_alarm, se_checks, c.df)
            tol = k * float(c.se)
        else:
            raise ParameterError(f"check {c.name!r} needs a finite standard error or a bound")
        ok = math.isfinite(c.value) and abs(float(c.value) - float(c.expected)) <= tol
        out[c.name] = {"value": float(c.value), "expected": float(c.expected),
                       "se": None if c.se is None else float(c.se), "k": k, "tolerance": tol,
                       "pass": bool(ok), "note": c.note}
    return out
