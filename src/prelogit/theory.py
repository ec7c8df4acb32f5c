"""Closed-form results of the method (spec sections 2-4): what sampled estimates are checked against.

V is flattened to a vector of dimension D = tau * d where a formula needs it. The base
distribution is P = N(0, sigma^2 I_D); Q_U = N(U, sigma^2 I_D).

- the control-space KL of Q_U to P (:func:`kl_to_base`) and best-of-N's KL bound (:func:`kl_best_of_n`),
  which the runs report;
- the reward-optimal mean for a linear and a quadratic reward, and the fixed points of the update in
  both ``alpha_mode`` readings;
- the moments of the importance weights between Gaussians (:func:`log_weight_moment`) and the
  effective sample size they predict (:func:`predict_ess`, :func:`degenerate_dimension`).

The Gaussian toy problems and the Monte-Carlo checks of the theory stage that use them are in
:mod:`prelogit.toy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .checks import ParameterError, check_number

F64 = torch.float64


def kl_to_base(U: torch.Tensor, sigma: float) -> torch.Tensor:
    """KL(Q_U || P) = sum_t ||u_t||^2 / (2 sigma^2) in nats (exact for equal covariances).

    U: any shape, usually (tau, d). Returns a 0-dim tensor.
    """
    check_number("sigma", sigma, low=0, low_open=True)
    return (U.to(torch.float64) ** 2).sum() / (2.0 * sigma**2)


def optimal_mean_linear(a: torch.Tensor, sigma: float, lam: float) -> torch.Tensor:
    """Optimal mean u* = sigma^2 a / lam for the linear reward r(V) = <a, V>; same shape as ``a``."""
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("lam", lam, low=0, low_open=True)
    return sigma**2 * a / lam


def mppi_fixed_point_linear(a: torch.Tensor, sigma: float, lam: float, alpha: float) -> torch.Tensor:
    """Fixed point sigma^2 a / (lam (1 - alpha)) of the ``mppi`` iteration for r(V) = <a, V>.

    The expected update is U -> alpha U + sigma^2 a / lam; alpha = 1 has no fixed point.
    """
    check_number("alpha", alpha, low=0, high=1, high_open=True)
    return optimal_mean_linear(a, sigma, lam) / (1.0 - alpha)


def optimal_mean_quadratic(A: torch.Tensor, b: torch.Tensor, sigma: float, lam: float) -> torch.Tensor:
    """Optimal mean for r(V) = -1/2 V^T A V + <b, V>, A positive semi-definite (D, D), b (D,).

    q*(V) is proportional to exp(r(V)/lam) N(V; 0, sigma^2 I), a Gaussian with precision
    A/lam + I/sigma^2, so u* = (A/lam + I/sigma^2)^{-1} b / lam, shape (D,).
    """
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("lam", lam, low=0, low_open=True)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or b.shape != (A.shape[0],):
        raise ParameterError(f"A must be (D, D) and b (D,), got {tuple(A.shape)} and {tuple(b.shape)}")
    A64 = A.to(torch.float64)
    precision = A64 / lam + torch.eye(A.shape[0], dtype=torch.float64) / sigma**2
    return torch.linalg.solve(precision, b.to(torch.float64) / lam).to(b.dtype)


def kl_best_of_n(N: int) -> float:
    """KL of the best-of-N distribution to the base model, log N - (N - 1) / N (nats).

    The usual analytic expression (Beirami et al. 2024); an upper bound for discrete outputs.
    """
    check_number("N", N, low=1, integer=True)
    return math.log(N) - (N - 1) / N


def mppi_fixed_point_quadratic(A: torch.Tensor, b: torch.Tensor, sigma: float, lam: float,
                               alpha: float) -> torch.Tensor:
    """Fixed point (A/lam + (1 - alpha) I/sigma^2)^{-1} b/lam of the ``mppi`` iteration, shape (D,).

    Reduces to :func:`mppi_fixed_point_linear` for A = 0 and to :func:`optimal_mean_quadratic`
    for alpha = 0. With alpha = 1 it exists only if A is positive definite.
    """
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("lam", lam, low=0, low_open=True)
    check_number("alpha", alpha, low=0, high=1)
    if A.dim() != 2 or A.shape[0] != A.shape[1] or b.shape != (A.shape[0],):
        raise ParameterError(f"A must be (D, D) and b (D,), got {tuple(A.shape)} and {tuple(b.shape)}")
    M = A.to(F64) / lam + (1.0 - alpha) * torch.eye(A.shape[0], dtype=F64) / sigma**2
    return torch.linalg.solve(M, b.to(F64) / lam).to(b.dtype)


# ---- closed-form moments of the importance weights (delta method) ------------------------------------

def log_weight_moment(k: float, U: torch.Tensor, sigma: float, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """log E_q[(q*/q)^k] for q = N(U, sigma^2 I_D), q* = N(mean, cov), in nats.

    +inf where k cov^{-1} + (1 - k) I/sigma^2 is not positive definite (the moment diverges).
    k = 2 gives log(1 + chi^2(q* || q)), which sets the effective sample size.
    """
    D = U.shape[0]
    U, mean, cov = U.to(F64), mean.to(F64), cov.to(F64)
    P_star = torch.linalg.inv(cov)
    P_k = k * P_star + (1 - k) * torch.eye(D, dtype=F64) / sigma**2
    L, info = torch.linalg.cholesky_ex(0.5 * (P_k + P_k.T))
    if info != 0:
        return math.inf
    # Integrate exp(k log q* + (1 - k) log q): a Gaussian integral with precision P_k and linear
    # term h; the 2 pi factors cancel.
    h = k * P_star @ mean + (1 - k) * U / sigma**2
    quad = float(h @ torch.cholesky_solve(h[:, None], L)[:, 0])
    const = k * float(mean @ P_star @ mean) + (1 - k) * float(U @ U) / sigma**2
    logdet_cov = float(torch.linalg.slogdet(cov)[1])
    logdet_Pk = 2.0 * float(torch.log(torch.diagonal(L)).sum())
    return 0.5 * (quad - const - k * logdet_cov - (1 - k) * D * math.log(sigma**2) - logdet_Pk)


@dataclass(frozen=True)
class ESSPrediction:
    """Large-n prediction for the Kish ESS / n of weights w~ = q*/q under q (E[w~] = 1).

    fraction: 1 / E[w~^2] = 1 / (1 + chi^2), the limit of ESS / n.
    sd: delta-method standard deviation of ESS / n in one run of n samples.
    bias: the delta method's O(1/n) bias term of ESS / n. When it is not small next to the
        Monte-Carlo resolution the asymptotic prediction cannot be tested (see
        :func:`prelogit.toy.ess_testable`): the weights' heavy tail is then rarely sampled, and the measured
        ESS lies above the prediction.
    """

    fraction: float
    sd: float
    bias: float


def predict_ess(log_moments: Sequence[float], n: int) -> ESSPrediction:
    """ESS / n prediction for n samples from log E[w~^k], k = 2, 3, 4 (with E[w~] = 1)."""
    lm2, lm3, lm4 = (float(x) for x in log_moments)
    if not lm4 < 700:  # E[w~^4] infinite or beyond float range: no delta method
        return ESSPrediction(math.exp(-lm2), math.inf, math.inf)
    M2, M3, M4 = math.exp(lm2), math.exp(lm3), math.exp(lm4)
    var_w, var_w2, cov = M2 - 1.0, M4 - M2**2, M3 - M2
    # ESS / n = R(m1, m2) = m1^2 / m2 at (1, M2): gradient (2/M2, -1/M2^2); Hessian
    # (2/M2, -2/M2^2; -2/M2^2, 2/M2^3) gives the second-order bias.
    var_g = (2 / M2) ** 2 * var_w + var_w2 / M2**4 - 4 * cov / M2**3
    bias = (var_w / M2 - 2 * cov / M2**2 + var_w2 / M2**3) / n
    return ESSPrediction(fraction=1.0 / M2, sd=math.sqrt(max(var_g, 0.0) / n), bias=bias)


def degenerate_dimension(fraction: float, per_coord_log_chi: float) -> float:
    """D at which the asymptotic ESS / n = exp(-D * per_coord_log_chi) falls to ``fraction``.

    per_coord_log_chi: one coordinate's log(1 + chi^2): shift^2 for a mean offset of
    shift * sigma, -log(s (2 - s)) / 2 for a variance ratio s. Returns +inf when it is 0.
    """
    check_number("fraction", fraction, low=0, high=1, low_open=True)
    check_number("per_coord_log_chi", per_coord_log_chi, low=0)
    return math.inf if per_coord_log_chi == 0 else -math.log(fraction) / per_coord_log_chi
