"""Importance-sampling update of the control mean U (spec sections 3 and 4).

Shapes: V is (n, tau, d) -- n draws of the control input for the first tau generated tokens,
each a d-dimensional pre-logit offset; U is (tau, d); rewards and weights are (n,).
Units: V and U are in pre-logit units (the same units as the LM head's input); rewards in the
reward model's units; ``lam`` in reward units.
"""

from __future__ import annotations

import torch

from .checks import ParameterError, check_choice, check_number


def _check_shapes(V: torch.Tensor, U: torch.Tensor) -> None:
    if V.dim() != 3:
        raise ParameterError(f"V must have shape (n, tau, d), got {tuple(V.shape)}")
    if U.shape != V.shape[1:]:
        raise ParameterError(f"U must have shape (tau, d) = {tuple(V.shape[1:])}, got {tuple(U.shape)}")


def likelihood_ratio_coefficient(alpha: float, alpha_mode: str) -> float:
    """The factor c in front of the control-cost term of the log-weights.

    ``mppi``: c = 1 - alpha (alpha = 0 is exact importance sampling, alpha = 1 drops the term);
    ``step``: c = 1 (exact weights; alpha is the step size of the mean update instead).
    """
    check_number("alpha", alpha, low=0, high=1)
    check_choice("alpha_mode", alpha_mode, ("mppi", "step"))
    return 1.0 - alpha if alpha_mode == "mppi" else 1.0


def log_weight_terms(rewards: torch.Tensor, V: torch.Tensor, U: torch.Tensor, sigma: float, lam: float,
                     alpha: float = 0.0, alpha_mode: str = "mppi") -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the log-weights, each (n,) float64: the reward term r_i / lam and the
    likelihood-ratio term c * sum_t u_t . v_{t,i} / sigma^2, so that s = reward - likelihood ratio.

    Their spreads over the n samples say what the weights follow: once the likelihood-ratio term
    varies far more than the reward term, the weights follow the noise, not the reward.
    Computed in float64: r / lam is large when lam is small, and the softmax that follows only
    needs differences, which float32 would round away.
    """
    check_number("sigma", sigma, low=0, low_open=True)
    check_number("lam", lam, low=0, low_open=True)
    _check_shapes(V, U)
    rewards = torch.as_tensor(rewards)
    if rewards.shape != (V.shape[0],):
        raise ParameterError(f"rewards must have shape (n,) = ({V.shape[0]},), got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ParameterError("rewards contain NaN or infinity; check the reward model's output")
    c = likelihood_ratio_coefficient(alpha, alpha_mode)
    r = rewards.to(torch.float64)
    # sum over (t, j) of u_tj * v_itj; the ||u||^2 term of log p/q is the same for all i and
    # cancels in the softmax.
    cross = V.reshape(V.shape[0], -1).to(torch.float64) @ U.reshape(-1).to(torch.float64)
    return r / lam, c * cross / sigma**2


def log_weights(rewards: torch.Tensor, V: torch.Tensor, U: torch.Tensor, sigma: float, lam: float,
                alpha: float = 0.0, alpha_mode: str = "mppi") -> torch.Tensor:
    """Unnormalised log-weights s_i = r_i / lam - c * sum_t u_t . v_{t,i} / sigma^2, shape (n,),
    float64 (:func:`log_weight_terms`)."""
    reward_term, lr_term = log_weight_terms(rewards, V, U, sigma, lam, alpha, alpha_mode)
    return reward_term - lr_term


def importance_weights(rewards: torch.Tensor, V: torch.Tensor, U: torch.Tensor, sigma: float, lam: float,
                       alpha: float = 0.0, alpha_mode: str = "mppi") -> torch.Tensor:
    """Self-normalised importance weights w = softmax(s), shape (n,), summing to 1.

    Args:
        rewards: (n,) reward of each sample.
        V: (n, tau, d) control inputs drawn from N(U, sigma^2 I).
        U: (tau, d) current proposal mean.
        sigma: standard deviation of the proposal and of the base distribution P = N(0, sigma^2 I).
        lam: temperature lambda of the objective (reward units); as lam -> 0 the weights become
            one-hot on the best sample (best-of-n).
        alpha, alpha_mode: see :func:`likelihood_ratio_coefficient`.
    Returns:
        (n,) weights in the dtype of ``V``.
    """
    return normalised_weights(log_weights(rewards, V, U, sigma, lam, alpha, alpha_mode), V.dtype)


def normalised_weights(log_w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """softmax of the log-weights ``log_w`` (n,), float64, in ``dtype``: the self-normalised
    weights, for a caller that already holds the terms of :func:`log_weight_terms`."""
    return torch.softmax(log_w, dim=0).to(dtype)


def update_mean(U: torch.Tensor, V: torch.Tensor, weights: torch.Tensor, alpha: float = 0.0,
                alpha_mode: str = "mppi") -> torch.Tensor:
    """New proposal mean, shape (tau, d).

    The importance-sampling estimate is U_hat = sum_i w_i V_i. ``mppi`` returns U_hat (alpha
    already entered the weights); ``step`` returns (1 - alpha) U + alpha U_hat.
    """
    _check_shapes(V, U)
    check_number("alpha", alpha, low=0, high=1)
    check_choice("alpha_mode", alpha_mode, ("mppi", "step"))
    if weights.shape != (V.shape[0],):
        raise ParameterError(f"weights must have shape (n,) = ({V.shape[0]},), got {tuple(weights.shape)}")
    # A plain (1, n) x (n, tau*d) matmul: einsum's generic path was measured far slower on small,
    # thread-contended CPUs.
    U_hat = (weights.to(V.dtype) @ V.reshape(V.shape[0], -1)).view(V.shape[1:])
    if alpha_mode == "mppi":
        return U_hat
    return (1.0 - alpha) * U + alpha * U_hat


def effective_sample_size(weights: torch.Tensor) -> float:
    """Kish's effective sample size 1 / sum w_i^2 of normalised weights, in [1, n]."""
    return float(1.0 / (weights.to(torch.float64) ** 2).sum())
