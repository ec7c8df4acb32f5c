"""Is the pre-logit Gaussian? Statistics of a model's own pre-logits z_t (theory notebook).

AISP perturbs the pre-logit z_t (the LM head's input, spec section 1) with Gaussian noise and
treats its KL and importance weights as those of Gaussians. This module collects the model's
unperturbed pre-logits on its own samples and measures how far each dimension is from a normal
law, and the scale of z against which sigma should be quoted.

Shapes: Z is (N, d) -- N generated tokens (all prompts, samples and positions pooled), d the
pre-logit dimension. Units: pre-logit units (those of the LM head's input).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm.std import tqdm

from .checks import ParameterError, check_number
from .io import read_jsonl

#: Chit-chat openers used only when the prepare stage's prompts file does not exist yet.
FALLBACK_OPENERS = (
    "Hi! How was your weekend?",
    "I just got back from a long walk in the park.",
    "What do you usually have for breakfast?",
    "My cat keeps knocking things off the table.",
    "Have you seen any good movies lately?",
    "I'm thinking about learning to play the guitar.",
    "It's been raining all day here.",
    "What's your favourite season and why?",
    "I finally finished reading that book I told you about.",
    "Do you have any plans for the holidays?",
    "I tried cooking a new recipe tonight.",
    "Work has been really busy this week.",
)


def load_prompts(prompts_path: str | Path, tokenizer: Any, n: int, split: str = "train") -> tuple[list[str], str]:
    """Chat-templated prompts for collecting pre-logits, and a line saying where they came from.

    Reads the first n prompts of ``split`` from the prepare stage's JSONL file (keys ``split`` and
    ``prompt``). Only if the file does not exist, templates the first n of
    :data:`FALLBACK_OPENERS` with the tokenizer's chat template instead.
    """
    check_number("n", n, low=1, integer=True)
    path = Path(prompts_path)
    if path.exists():
        rows = [r for r in read_jsonl(path) if r.get("split") == split]
        if not rows:
            raise ParameterError(f"{path} has no prompts in split {split!r}; choose another gauss_split")
        rows = rows[:n]
        return [r["prompt"] for r in rows], f"{len(rows)} {split!r} prompts from {path}"
    texts = FALLBACK_OPENERS[:n]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                             add_generation_prompt=True) for t in texts]
    return prompts, (f"{len(prompts)} built-in chit-chat openers ({path} does not exist yet; "
                     "run the prepare stage to use the prepared prompts)")


@dataclass
class Prelogits:
    """Pre-logits of generated tokens.

    Z: (N, d) float32, one row per real generated token (padding after EOS removed).
    prompt: (N,) index of the prompt; sample: (N,) index of the sample within its prompt's batch;
    position: (N,) 0-based position t of the token in its response.
    """

    Z: torch.Tensor
    prompt: torch.Tensor
    sample: torch.Tensor
    position: torch.Tensor

    @property
    def sequences(self) -> int:
        return int(torch.unique(self.prompt * (int(self.sample.max()) + 1) + self.sample).numel())


def collect_prelogits(sampler: Any, prompts: list[str], n_samples: int, generator: torch.Generator,
                      max_new_tokens: int | None = None, progress: bool = True) -> Prelogits:
    """Sample n_samples responses per prompt with ``sampler`` (a :class:`prelogit.sampling.PrelogitSampler`)
    and keep the unperturbed pre-logits z_t of every real generated token (EOS included).

    Only the first ``lengths[i]`` positions of response i are real; the rest is padding.
    """
    check_number("n_samples", n_samples, low=1, integer=True)
    if not prompts:
        raise ParameterError("no prompts to collect pre-logits on")
    Zs, pids, sids, pos = [], [], [], []
    for p, prompt in enumerate(tqdm(prompts, desc="pre-logits", disable=not progress)):
        gen = sampler.generate(prompt, n_samples, generator=generator, max_new_tokens=max_new_tokens,
                               record_prelogits=True)
        T = gen.prelogits.shape[1]
        mask = torch.arange(T)[None, :] < gen.lengths[:, None]  # (n, T) real positions
        Zs.append(gen.prelogits[mask])
        rows, cols = mask.nonzero(as_tuple=True)
        pids.append(torch.full((rows.numel(),), p))
        sids.append(rows)
        pos.append(cols)
    return Prelogits(Z=torch.cat(Zs), prompt=torch.cat(pids), sample=torch.cat(sids), position=torch.cat(pos))


def gaussianity_stats(Z: torch.Tensor | np.ndarray, level: float = 0.05) -> dict:
    """Per-dimension normality statistics of Z (N, d) and their summary.

    Per dimension (arrays of length d): mean, std, rms (sqrt of the mean square), skew, excess
    kurtosis (0 for a normal law), and the p-value of D'Agostino-Pearson's omnibus test
    (scipy.stats.normaltest, which needs N >= 8 and is reliable from about N = 20).
    Per token: the L2 norm ||z_t||.

    Summary: the share of dimensions whose test does not reject normality at ``level``; the same
    with Bonferroni's correction (level / d), since d tests at ``level`` reject about level * d
    dimensions even when every one is normal; mean |skew| and mean excess kurtosis with the
    values expected under normality for comparison (standard errors sqrt(6/N), sqrt(24/N)); the
    overall RMS of z (sqrt of the mean of z^2 over tokens and dimensions), the share of E||z||^2
    carried by the largest 1% of dimensions (at least one), and token-norm quantiles.

    The test assumes independent draws; tokens of one response are correlated, so the p-values
    are too small and the shares passing are lower bounds (reported as such).
    """
    check_number("level", level, low=0, high=1, low_open=True, high_open=True)
    X = np.asarray(Z.detach().cpu().double() if isinstance(Z, torch.Tensor) else Z, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 8:
        raise ParameterError(f"Z must be (N >= 8 tokens, d), got {X.shape}")
    N, d = X.shape
    mean, std = X.mean(0), X.std(0, ddof=1)
    rms = np.sqrt((X**2).mean(0))
    skew = stats.skew(X, axis=0)
    kurt = stats.kurtosis(X, axis=0)  # excess (Fisher)
    pvalue = stats.normaltest(X, axis=0).pvalue
    norms = np.linalg.norm(X, axis=1)
    energy = np.sort((X**2).mean(0))[::-1]
    top = max(1, math.ceil(d / 100))
    summary = {
        "n_tokens": N,
        "d": d,
        "level": level,
        "share_pass": float((pvalue >= level).mean()),
        "share_pass_bonferroni": float((pvalue >= level / d).mean()),
        "expected_share_pass_if_normal": 1.0 - level,
        "mean_abs_skew": float(np.abs(skew).mean()),
        "mean_excess_kurtosis": float(kurt.mean()),
        "median_excess_kurtosis": float(np.median(kurt)),
        "max_excess_kurtosis": float(kurt.max()),
        "skew_se_if_normal": math.sqrt(6.0 / N),
        "kurtosis_se_if_normal": math.sqrt(24.0 / N),
        "mean_abs_skew_if_normal": math.sqrt(6.0 / N) * math.sqrt(2.0 / math.pi),
        "rms": float(np.sqrt((X**2).mean())),
        "rms_per_dim_median": float(np.median(rms)),
        "rms_per_dim_max": float(rms.max()),
        "std_per_dim_median": float(np.median(std)),
        "energy_share_top_1pct_dims": float(energy[:top].sum() / energy.sum()),
        "token_norm_mean": float(norms.mean()),
        "token_norm_q05": float(np.quantile(norms, 0.05)),
        "token_norm_q95": float(np.quantile(norms, 0.95)),
    }
    per_dim = {"mean": mean, "std": std, "rms": rms, "skew": skew, "excess_kurtosis": kurt, "pvalue": pvalue}
    return {"summary": summary, "per_dim": per_dim, "token_norm": norms}


def pick_qq_dims(per_dim: dict, k: int = 4) -> list[int]:
    """k dimensions for QQ plots, spread over the range of excess kurtosis (lowest, quantiles,
    highest), so that both near-normal and the most heavy-tailed dimensions are shown."""
    check_number("k", k, low=1, integer=True)
    order = np.argsort(per_dim["excess_kurtosis"])
    idx = np.unique(np.round(np.linspace(0, len(order) - 1, min(k, len(order)))).astype(int))
    return [int(order[i]) for i in idx]
