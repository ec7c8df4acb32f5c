"""Closed forms (prelogit.theory), the Monte-Carlo machinery of the theory notebook, and the
pre-logit Gaussianity statistics (prelogit.gaussianity).

Statistical assertions use k standard errors, k from :func:`prelogit.toy.tolerance_multiplier`
at a false-alarm rate of FALSE_ALARM over the checks of one test.
"""

import json
import math

import numpy as np
import pytest
import torch

from prelogit import gaussianity, theory, toy
from prelogit.checks import ParameterError

FALSE_ALARM = 1e-3
F64 = torch.float64


def _psd(D, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(D, rank, generator=g, dtype=F64)
    return X @ X.T


# ---- closed forms -----------------------------------------------------------------------------------

def test_quadratic_with_zero_curvature_reduces_to_linear():
    a = torch.randn(6, dtype=F64)
    zero = torch.zeros(6, 6, dtype=F64)
    assert torch.allclose(theory.optimal_mean_quadratic(zero, a, 0.7, 0.3), theory.optimal_mean_linear(a, 0.7, 0.3))
    for alpha in (0.0, 0.4, 0.9):
        assert torch.allclose(theory.mppi_fixed_point_quadratic(zero, a, 0.7, 0.3, alpha),
                              theory.mppi_fixed_point_linear(a, 0.7, 0.3, alpha))
    A = _psd(6, 3)
    assert torch.allclose(theory.mppi_fixed_point_quadratic(A, a, 0.7, 0.3, 0.0),
                          theory.optimal_mean_quadratic(A, a, 0.7, 0.3))


def test_optimal_mean_quadratic_is_the_mode_of_the_tilted_density():
    # q* ~ exp(r(V)/lam - ||V||^2/(2 sigma^2)) is Gaussian, so its mean is where the gradient vanishes.
    A, b = _psd(5, 2), torch.randn(5, dtype=F64)
    sigma, lam = 0.6, 0.4
    u = theory.optimal_mean_quadratic(A, b, sigma, lam).clone().requires_grad_(True)
    log_q = (-0.5 * u @ A @ u + b @ u) / lam - (u @ u) / (2 * sigma**2)
    (grad,) = torch.autograd.grad(log_q, u)
    assert grad.abs().max() < 1e-10


def test_closed_form_errors_name_the_parameter():
    with pytest.raises(ParameterError, match="sigma"):
        theory.kl_to_base(torch.ones(3), 0.0)
    with pytest.raises(ParameterError, match="lam"):
        theory.optimal_mean_linear(torch.ones(3), 1.0, 0.0)
    with pytest.raises(ParameterError, match="alpha"):
        theory.mppi_fixed_point_linear(torch.ones(3), 1.0, 1.0, 1.0)
    with pytest.raises(ParameterError, match="A must be"):
        theory.optimal_mean_quadratic(torch.ones(3, 2), torch.ones(3), 1.0, 1.0)
    with pytest.raises(ParameterError, match="curvatures"):
        toy.quadratic_problem(2, 1.0, 1.0, 1.0, [1.0, 1.0, 1.0], torch.Generator())
    assert theory.kl_best_of_n(1) == 0.0


@pytest.mark.parametrize("kind", ["linear", "quadratic"])
def test_toy_problem_has_the_requested_optimum_and_fixed_points(kind):
    g = toy.make_generator(0, "toy", kind)
    sigma, lam, kappa = 0.5, 0.2, 1.3
    p = (toy.linear_problem(7, sigma, lam, kappa, g) if kind == "linear"
         else toy.quadratic_problem(7, sigma, lam, kappa, [2.0, 0.5, 0.1], g))
    assert p.kind == kind
    assert float(p.optimum.norm()) == pytest.approx(kappa * sigma)
    if kind == "quadratic":
        assert torch.allclose(p.optimum, theory.optimal_mean_quadratic(p.A, p.b, sigma, lam))
        assert torch.linalg.matrix_rank(p.A) == 3
    for mode, alpha in (("mppi", 0.0), ("mppi", 0.6), ("step", 0.3)):
        fp = p.fixed_point(alpha, mode)
        assert torch.allclose(p.expected_update(fp, alpha, mode), fp, atol=1e-12)


def test_expected_trajectory_matches_the_linear_closed_form():
    g = toy.make_generator(0, "trajectory")
    p = toy.linear_problem(3, 0.5, 0.2, 1.0, g)
    U0, u = torch.randn(3, generator=g, dtype=F64), p.optimum
    K = 6
    for alpha in (0.0, 0.3, 0.8):
        mppi = toy.expected_trajectory(p, U0, K, alpha, "mppi")
        step = toy.expected_trajectory(p, U0, K, alpha, "step")
        for k in range(K + 1):
            assert torch.allclose(mppi[k], alpha**k * U0 + (1 - alpha**k) / (1 - alpha) * u)
            assert torch.allclose(step[k], (1 - alpha) ** k * U0 + (1 - (1 - alpha) ** k) * u)


def test_kl_closed_form_against_monte_carlo():
    g = toy.make_generator(0, "kl")
    sigma = 0.8
    U = 0.3 * torch.randn(4, 6, generator=g, dtype=F64)  # (tau, d)
    closed = float(theory.kl_to_base(U, sigma))
    assert closed == pytest.approx(float(theory.kl_to_base(U.flatten(), sigma)))
    assert closed == pytest.approx(float((U**2).sum()) / (2 * sigma**2))
    mc, se = toy.kl_monte_carlo(U, sigma, 20000, g)
    assert abs(mc - closed) <= toy.tolerance_multiplier(FALSE_ALARM, 1) * se


def test_weight_moments_closed_form():
    # linear case: w~ = exp(kappa Z - kappa^2/2), so log E[w~^k] = k (k - 1) kappa^2 / 2
    g = toy.make_generator(0, "moments")
    p = toy.linear_problem(5, 0.5, 0.2, 1.2, g)
    U = torch.zeros(5, dtype=F64)
    for k in (1, 2, 3, 4):
        got = theory.log_weight_moment(k, U, p.sigma, p.optimum, p.target_cov)
        assert got == pytest.approx(k * (k - 1) / 2 * 1.2**2, abs=1e-9)
    D = 5
    assert toy.predicted_mse(p, U) == pytest.approx(math.exp(1.2**2) * (D * 0.25 + (1.2 * 0.5) ** 2))
    # quadratic case against Monte Carlo: E_q[w~^2] estimated from draws of q
    q = toy.quadratic_problem(3, 0.5, 0.2, 0.8, [1.0, 0.5], g)
    U = 0.5 * q.optimum
    V = toy.draw(U, q.sigma, 200000, g)
    log_q = -((V - U) ** 2).sum(1) / (2 * q.sigma**2) - 1.5 * math.log(2 * math.pi * q.sigma**2)
    log_qs = torch.distributions.MultivariateNormal(q.optimum, q.target_cov).log_prob(V)
    w2 = torch.exp(2 * (log_qs - log_q))
    closed = math.exp(theory.log_weight_moment(2, U, q.sigma, q.optimum, q.target_cov))
    assert abs(float(w2.mean()) - closed) <= toy.tolerance_multiplier(FALSE_ALARM, 1) * float(w2.std()) / math.sqrt(len(w2))


def test_predicted_ess_is_the_measured_ess_where_testable():
    g = toy.make_generator(0, "ess")
    sw = toy.ess_vs_dim([1, 16, 64, 2048], 1.0, 1.0, 512, 24, g, kind="mean", shift=0.1)
    testable = [toy.ess_testable(p, 24) for p in sw.prediction]
    assert testable[:2] == [True, True] and testable[-1] is False
    k = toy.tolerance_multiplier(FALSE_ALARM, sum(testable), 23)
    for j, ok in enumerate(testable):
        if ok:
            x = sw.ess_fraction[:, j]
            assert abs(float(x.mean()) - sw.prediction[j].fraction) <= k * float(x.std()) / math.sqrt(24)
    means = sw.ess_fraction.mean(0)
    assert (means[1:] < means[:-1]).all()  # degenerates with D
    # beyond the testable range the measured ESS is optimistic (the heavy tail is unseen)
    assert float(means[-1]) > sw.prediction[-1].fraction
    assert theory.degenerate_dimension(0.5, 0.1**2) == pytest.approx(math.log(2) / 0.01)
    assert theory.degenerate_dimension(0.5, 0.0) == math.inf


def test_covariance_mismatch_prediction_factorises_over_coordinates():
    g = toy.make_generator(0, "cov")
    sw = toy.ess_vs_dim([1, 8], 0.7, 0.3, 64, 2, g, kind="covariance", curvature=0.5)
    s = 1 / 1.5
    for D, p in zip(sw.grid, sw.prediction):
        assert p.fraction == pytest.approx((s * (2 - s)) ** (D / 2))


def test_lambda_sweep_reaches_the_best_of_n_limit():
    g = toy.make_generator(0, "lam")
    sw = toy.ess_vs_lam(4, 0.5, [1e-5, 0.5, 10.0], 256, 4, g)
    ex = sw.extra
    assert bool(ex["bon_match"][:, 0].all())
    assert (ex["one_minus_wmax"] <= ex["wmax_bound"] + 256 * torch.finfo(F64).eps).all()
    assert (ex["bon_distance"] <= ex["bon_bound"] + 256 * torch.finfo(F64).eps).all()
    assert float(sw.max_weight[:, 0].min()) == pytest.approx(1.0)
    means = sw.ess_fraction.mean(0)
    assert float(means[0]) == pytest.approx(1 / 256) and (means[1:] > means[:-1]).all()


def test_slope_fit_recovers_an_exact_power_law_and_rejects_bad_shapes():
    n = [10, 100, 1000]
    errors = torch.tensor([[3 * x**-0.5 for x in n], [5 * x**-0.5 for x in n]], dtype=F64)
    fit = toy.fit_loglog_slope(n, errors)
    assert fit.slope == pytest.approx(-0.5) and fit.se == pytest.approx(0.0, abs=1e-12)
    assert fit.rms_slope == pytest.approx(-0.5)
    with pytest.raises(ParameterError):
        toy.fit_loglog_slope(n, errors[:, :2])


def test_judge_uses_bonferroni_and_can_fail():
    checks = [toy.Check("a", 1.05, 1.0, se=0.01, df=None), toy.Check("b", 0.0, 0.0, se=0.01, df=9),
              toy.Check("c", 0.2, 0.0, bound=0.1)]
    out = toy.judge(checks, 0.05)
    k2 = toy.tolerance_multiplier(0.05, 2)
    assert out["a"]["k"] == pytest.approx(k2) and out["a"]["pass"] is False  # 5 SE off
    assert out["b"]["k"] > k2 and out["b"]["pass"] is True  # Student's t is wider
    assert out["c"]["pass"] is False and out["c"]["k"] is None
    json.dumps(out)
    assert toy.tolerance_multiplier(0.01, 100) > toy.tolerance_multiplier(0.01, 10)
    with pytest.raises(ParameterError, match="unique"):
        toy.judge(checks + checks[:1], 0.05)


def test_generators_are_deterministic_and_separate_streams():
    a = torch.randn(3, generator=toy.make_generator(1, "x", 2))
    b = torch.randn(3, generator=toy.make_generator(1, "x", 2))
    c = torch.randn(3, generator=toy.make_generator(1, "x", 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---- gaussianity statistics -------------------------------------------------------------------------

def test_gaussianity_statistics_tell_gaussian_from_heavy_tailed():
    rng = np.random.default_rng(0)
    N, d, level = 2000, 200, 0.05
    gauss = gaussianity.gaussianity_stats(torch.from_numpy(rng.normal(size=(N, d)) * 2.0 + 1.0), level)
    heavy = gaussianity.gaussianity_stats(rng.standard_t(4, size=(N, d)), level)
    skewed = gaussianity.gaussianity_stats(rng.exponential(size=(N, d)), level)
    k = toy.tolerance_multiplier(FALSE_ALARM, 4)
    # independent dimensions: the number passing is binomial(d, 1 - level)
    binom_se = math.sqrt(level * (1 - level) / d)
    g = gauss["summary"]
    assert abs(g["share_pass"] - (1 - level)) <= k * binom_se
    # the mean of d independent kurtosis estimates has standard error sqrt(24/N/d)
    assert abs(g["mean_excess_kurtosis"]) <= k * g["kurtosis_se_if_normal"] / math.sqrt(d)
    assert g["rms"] == pytest.approx(math.sqrt(5.0), rel=0.02)  # E[z^2] = 2^2 + 1^2
    assert heavy["summary"]["share_pass"] < (1 - level) - k * binom_se
    assert heavy["summary"]["mean_excess_kurtosis"] > k * g["kurtosis_se_if_normal"] / math.sqrt(d)
    assert skewed["summary"]["mean_abs_skew"] > g["mean_abs_skew"] + k * g["skew_se_if_normal"]
    assert skewed["summary"]["share_pass_bonferroni"] == 0.0
    for key in ("mean", "std", "rms", "skew", "excess_kurtosis", "pvalue"):
        assert gauss["per_dim"][key].shape == (d,)
    assert gauss["token_norm"].shape == (N,)


def test_qq_dims_span_the_kurtosis_range():
    per_dim = {"excess_kurtosis": np.array([0.5, -1.0, 9.0, 2.0, 0.1])}
    dims = gaussianity.pick_qq_dims(per_dim, 3)
    assert dims[0] == 1 and dims[-1] == 2 and len(dims) == 3


def test_gaussianity_rejects_too_few_tokens():
    with pytest.raises(ParameterError, match="N >= 8"):
        gaussianity.gaussianity_stats(np.zeros((5, 3)))


def test_prompts_fall_back_to_builtin_openers_only_when_the_file_is_missing(tmp_path, tokenizer):
    prompts, source = gaussianity.load_prompts(tmp_path / "missing.jsonl", tokenizer, 3)
    assert len(prompts) == 3 and "built-in" in source
    assert gaussianity.FALLBACK_OPENERS[0] in prompts[0] and prompts[0].rstrip().endswith("assistant")
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": f"p{i}", "split": s, "text": f"t{i}", "prompt": f"P{i}"} for i, s in enumerate(["test", "train", "train"])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, source = gaussianity.load_prompts(path, tokenizer, 5, "train")
    assert prompts == ["P1", "P2"] and str(path) in source
    with pytest.raises(ParameterError, match="split"):
        gaussianity.load_prompts(path, tokenizer, 5, "val")


def test_collect_prelogits_keeps_only_real_tokens(tiny_lm, tokenizer):
    from prelogit.sampling import PrelogitSampler

    sampler = PrelogitSampler(tiny_lm, tokenizer, max_new_tokens=6)
    prompts, _ = gaussianity.load_prompts("does-not-exist.jsonl", tokenizer, 2)
    pre = gaussianity.collect_prelogits(sampler, prompts, 3, torch.Generator().manual_seed(0), progress=False)
    gen = sampler.generate(prompts[1], 3, generator=torch.Generator().manual_seed(1), record_prelogits=True)
    assert pre.Z.shape[1] == 32 and pre.Z.dtype == torch.float32
    assert pre.Z.shape[0] == pre.prompt.numel() == pre.sample.numel() == pre.position.numel()
    assert pre.sequences == 6
    assert torch.isfinite(pre.Z).all() and (pre.Z.norm(dim=1) > 0).all()  # padding rows would be zero
    assert gen.prelogits.shape[:2] == (3, int(gen.lengths.max()))


@pytest.mark.integration
def test_smollm_prelogit_norms_lie_in_the_range_the_final_norm_allows(smollm):
    """The pre-logit is the output of the final RMSNorm, z = w * x / rms(x), so
    min|w| sqrt(d) <= ||z|| <= max|w| sqrt(d) (up to bf16 rounding): recording the wrong tensor
    (e.g. the hidden state before the norm) would leave this range."""
    from prelogit.sampling import PrelogitSampler

    model, tok = smollm
    sampler = PrelogitSampler(model, tok, max_new_tokens=8)
    prompts, _ = gaussianity.load_prompts("does-not-exist.jsonl", tok, 2)
    pre = gaussianity.collect_prelogits(sampler, prompts, 2, torch.Generator().manual_seed(0), progress=False)
    w = model.model.norm.weight.detach().float().abs()
    d = w.numel()
    slack = 1 + 2 * torch.finfo(torch.bfloat16).eps
    norms = pre.Z.norm(dim=1)
    assert float(norms.min()) >= float(w.min()) * math.sqrt(d) / slack
    assert float(norms.max()) <= float(w.max()) * math.sqrt(d) * slack
    stats = gaussianity.gaussianity_stats(pre.Z)["summary"]
    assert stats["d"] == d == 576
    assert stats["token_norm_mean"] <= stats["rms"] * math.sqrt(d) * (1 + 1e-9)
