"""Closed-form results the sampled estimates are checked against (spec sections 2-4).

V is flattened to a vector of dimension D = tau * d where a formula needs it. The base
distribution is P = N(0, sigma^2 I_D); Q_U = N(U, sigma^2 I_D).
"""

from __future__ import annotations

import math

import torch

from .checks import ParameterError, check_number


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
