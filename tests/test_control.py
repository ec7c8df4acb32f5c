"""The importance-sampling update (prelogit.control): validation, weights, and the Gaussian-toy theory.

Statistical assertions use tolerances of k standard errors, with k from
:func:`prelogit.toy.tolerance_multiplier` (a false-alarm rate of FALSE_ALARM over the checks of
one test), and standard errors estimated from independent seeds or from the delta method.
"""

import math

import pytest
import torch

from prelogit import theory, toy
from prelogit.checks import ParameterError
from prelogit.control import (effective_sample_size, importance_weights, likelihood_ratio_coefficient,
                              log_weight_terms, log_weights, normalised_weights, update_mean)

FALSE_ALARM = 1e-3
F64 = torch.float64


def _inputs(n=16, tau=3, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(tau, d, generator=g, dtype=F64)
    V = U + 0.7 * torch.randn(n, tau, d, generator=g, dtype=F64)
    r = torch.randn(n, generator=g, dtype=F64)
    return r, V, U


# ---- shapes and validation ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mppi", "step"])
def test_shapes_and_weights_sum_to_one(mode):
    r, V, U = _inputs()
    w = importance_weights(r, V, U, sigma=0.7, lam=0.3, alpha=0.4, alpha_mode=mode)
    assert w.shape == (16,) and w.dtype == V.dtype
    assert (w >= 0).all()
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    U_new = update_mean(U, V, w, alpha=0.4, alpha_mode=mode)
    assert U_new.shape == U.shape


@pytest.mark.parametrize("kwargs, name", [
    ({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"),
    ({"lam": 0.0}, "lam"), ({"lam": -0.1}, "lam"),
    ({"alpha": -0.1}, "alpha"), ({"alpha": 1.5}, "alpha"),
    ({"alpha_mode": "bogus"}, "alpha_mode"),
])
def test_bad_parameters_raise_naming_the_parameter(kwargs, name):
    r, V, U = _inputs()
    args = {"sigma": 1.0, "lam": 1.0, "alpha": 0.0, "alpha_mode": "mppi", **kwargs}
    with pytest.raises(ParameterError, match=rf"^{name}\b"):
        importance_weights(r, V, U, **args)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rewards_raise(bad):
    r, V, U = _inputs()
    r[3] = bad
    with pytest.raises(ParameterError, match="rewards"):
        importance_weights(r, V, U, 1.0, 1.0)


def test_bad_shapes_raise():
    r, V, U = _inputs()
    with pytest.raises(ParameterError, match="V must have shape"):
        importance_weights(r, V[:, 0], U, 1.0, 1.0)
    with pytest.raises(ParameterError, match="U must have shape"):
        importance_weights(r, V, U[:2], 1.0, 1.0)
    with pytest.raises(ParameterError, match="rewards must have shape"):
        importance_weights(r[:-1], V, U, 1.0, 1.0)
    w = importance_weights(r, V, U, 1.0, 1.0)
    with pytest.raises(ParameterError, match="weights must have shape"):
        update_mean(U, V, w[:-1])
    with pytest.raises(ParameterError, match="alpha_mode"):
        update_mean(U, V, w, alpha_mode="bogus")
    with pytest.raises(ParameterError, match="alpha"):
        update_mean(U, V, w, alpha=2.0)


# ---- the weights ------------------------------------------------------------------------------------

def test_log_weights_are_the_exact_likelihood_ratio_up_to_a_constant():
    # s_i = r_i/lam + log p(V_i) - log q_U(V_i) + const for c = 1 (alpha = 0).
    r, V, U = _inputs()
    sigma, lam = 0.7, 0.3
    s = log_weights(r, V, U, sigma, lam)
    log_p = -(V**2).sum((1, 2)) / (2 * sigma**2)
    log_q = -((V - U) ** 2).sum((1, 2)) / (2 * sigma**2)
    diff = s - (r / lam + log_p - log_q)
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=1e-9)


def test_log_weight_terms_are_the_reward_and_the_likelihood_ratio_and_make_up_the_log_weights():
    r, V, U = _inputs()
    sigma, lam, alpha = 0.7, 0.3, 0.5
    reward_term, lr_term = log_weight_terms(r, V, U, sigma, lam, alpha, "mppi")
    # the same float64 operations as log_weights, so the difference is exact
    assert torch.equal(reward_term - lr_term, log_weights(r, V, U, sigma, lam, alpha, "mppi"))
    assert torch.allclose(reward_term, r.double() / lam, atol=1e-12)
    expected = (1 - alpha) * (V.double() * U.double()).sum((1, 2)) / sigma**2
    assert torch.allclose(lr_term, expected, atol=1e-9)
    # at U = 0 (the first iteration, and the frozen-U twin) the weights follow the reward alone
    assert torch.count_nonzero(log_weight_terms(r, V, torch.zeros_like(U), sigma, lam)[1]) == 0


def test_weights_from_the_terms_are_the_importance_weights():
    # the AISP loop normalises the terms it already recorded instead of recomputing them: the same
    # float64 operations, so the weights are the same bits
    r, V, U = _inputs()
    for mode in ("mppi", "step"):
        reward_term, lr_term = log_weight_terms(r, V, U, 0.7, 0.3, 0.5, mode)
        w = normalised_weights(reward_term - lr_term, V.dtype)
        assert w.dtype == V.dtype
        assert torch.equal(w, importance_weights(r, V, U, 0.7, 0.3, 0.5, mode))


def test_mppi_alpha_one_ignores_the_control_cost():
    r, V, U = _inputs()
    w = importance_weights(r, V, U, sigma=0.7, lam=0.3, alpha=1.0, alpha_mode="mppi")
    w_other_U = importance_weights(r, V, 5 * U, sigma=0.7, lam=0.3, alpha=1.0, alpha_mode="mppi")
    assert torch.allclose(w, torch.softmax(r / 0.3, 0), atol=1e-12)
    assert torch.allclose(w, w_other_U, atol=1e-12)
    assert likelihood_ratio_coefficient(1.0, "mppi") == 0.0
    # ... whereas alpha = 0 depends on U through the likelihood ratio
    w0 = importance_weights(r, V, U, sigma=0.7, lam=0.3, alpha=0.0, alpha_mode="mppi")
    assert not torch.allclose(w0, w, atol=1e-6)


def test_step_mode_uses_exact_weights_and_moves_a_fraction_alpha():
    r, V, U = _inputs()
    exact = importance_weights(r, V, U, 0.7, 0.3, alpha=0.0)
    for alpha in (0.0, 0.3, 1.0):
        w = importance_weights(r, V, U, 0.7, 0.3, alpha=alpha, alpha_mode="step")
        assert torch.allclose(w, exact, atol=1e-12)
        U_new = update_mean(U, V, w, alpha=alpha, alpha_mode="step")
        U_hat = torch.einsum("n,ntd->td", w, V)
        assert torch.allclose(U_new, (1 - alpha) * U + alpha * U_hat, atol=1e-12)
    assert torch.equal(update_mean(U, V, exact, alpha=0.0, alpha_mode="step"), U)


def test_effective_sample_size_limits():
    assert effective_sample_size(torch.full((10,), 0.1)) == pytest.approx(10.0)
    assert effective_sample_size(torch.tensor([0.0, 1.0, 0.0])) == pytest.approx(1.0)


def test_lambda_to_zero_gives_one_hot_weights_on_the_best_sample():
    r, V, U = _inputs(n=64, seed=3)
    best = int(r.argmax())
    gap = float(r[best] - r.topk(2).values[1])
    for lam in (1e-3 * gap, 1e-4 * gap):
        w = importance_weights(r, V, torch.zeros_like(U), sigma=1.0, lam=lam)
        # exact bound: 1 - w_best <= sum_{i != best} exp(-(r_best - r_i)/lam) <= (n - 1) exp(-gap/lam)
        assert int(w.argmax()) == best
        assert 1 - float(w[best]) <= (len(r) - 1) * math.exp(-gap / lam) + len(r) * torch.finfo(F64).eps
        U_new = update_mean(torch.zeros_like(U), V, w)
        assert torch.allclose(U_new, V[best], atol=1e-12)
    # with the control term (U != 0) the rewards still dominate as lam -> 0
    w = importance_weights(r, V, U, sigma=1.0, lam=1e-6 * gap)
    assert int(w.argmax()) == best and float(w.max()) == pytest.approx(1.0, abs=1e-9)


# ---- the Gaussian toy: convergence to the closed form -----------------------------------------------

def test_estimate_converges_to_the_closed_form_like_one_over_root_n():
    g = toy.make_generator(0, "test", "convergence")
    problem = toy.linear_problem(8, sigma=0.5, lam=0.2, kappa=1.0, generator=g)
    assert torch.allclose(problem.optimum, theory.optimal_mean_linear(problem.b, 0.5, 0.2))
    n_grid, n_seeds = [64, 256, 1024, 4096], 32
    U = torch.zeros(8, dtype=F64)
    errors = toy.relative_error_curve(problem, U, n_grid, n_seeds, g)
    fit = toy.fit_loglog_slope(n_grid, errors)
    k = toy.tolerance_multiplier(FALSE_ALARM, 2, fit.df)
    assert abs(fit.slope + 0.5) <= k * fit.se, (fit.slope, fit.se)
    # the level: mean squared error at the largest n against the delta method
    predicted = toy.predicted_mse(problem, U) / n_grid[-1] / float(problem.optimum.norm()) ** 2
    ratio = float((errors[:, -1] ** 2).mean()) / predicted
    k = toy.tolerance_multiplier(FALSE_ALARM, 2)
    assert abs(ratio - 1) <= k * toy.mse_ratio_se(problem, U, n_seeds), ratio
    # and the error really shrinks: the largest n is far better than the smallest
    assert float(errors[:, -1].mean()) < 0.5 * float(errors[:, 0].mean())


def test_estimate_around_a_wrong_target_is_detected():
    # The level check must be able to fail: compare the same errors with a deliberately wrong
    # closed form (u* off by 10%) and the ratio leaves the tolerance.
    g = toy.make_generator(0, "test", "wrong")
    problem = toy.linear_problem(8, sigma=0.5, lam=0.2, kappa=1.0, generator=g)
    wrong = toy.GaussianToy(b=1.1 * problem.b, A=None, sigma=0.5, lam=0.2)
    U = torch.zeros(8, dtype=F64)
    n, n_seeds = 4096, 32
    sq = torch.stack([(toy.is_estimate(problem, U, n, g).U_hat - wrong.optimum).norm() ** 2
                      for _ in range(n_seeds)])
    ratio = float(sq.mean()) / (toy.predicted_mse(wrong, U) / n)
    k = toy.tolerance_multiplier(FALSE_ALARM, 1)
    assert abs(ratio - 1) > k * toy.mse_ratio_se(wrong, U, n_seeds)


@pytest.mark.parametrize("mode, alpha", [("mppi", 0.0), ("mppi", 0.5), ("step", 0.5), ("step", 1.0)])
def test_iteration_reaches_each_modes_fixed_point(mode, alpha):
    g = toy.make_generator(0, "test", "iterate", mode, alpha)
    sigma, lam = 0.5, 0.2
    problem = toy.linear_problem(4, sigma, lam, kappa=1.0, generator=g)
    u_star = problem.optimum
    target = (theory.mppi_fixed_point_linear(problem.b, sigma, lam, alpha) if mode == "mppi" else u_star)
    assert torch.allclose(problem.fixed_point(alpha, mode), target)
    K, n, n_seeds = 25, 512, 16
    finals = torch.stack([toy.iterate_mean(problem, torch.zeros(4, dtype=F64), K, n, alpha, mode, g)[-1]
                          for _ in range(n_seeds)])
    mean, se = finals.mean(0), finals.std(0) / math.sqrt(n_seeds)
    k = toy.tolerance_multiplier(FALSE_ALARM, 4, n_seeds - 1)
    assert ((mean - target).abs() <= k * se).all(), (mean, target, se)
    if mode == "mppi" and alpha > 0:
        # the mppi fixed point is sigma^2 a / (lam (1 - alpha)), not u*: far outside the tolerance
        assert ((mean - u_star).abs() > k * se).any()
