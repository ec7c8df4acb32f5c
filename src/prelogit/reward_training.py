"""How the prepare stage makes the embedded reward: VADER-labelled utterances and the head fitted to them.

The embedded default reward (:class:`prelogit.rewards.EmbeddingHeadReward`) is a logistic head on
the all-MiniLM-L6-v2 embedding of a response. :func:`vader_labelled_utterances` draws the
training data (chit-chat utterances labelled by VADER's compound) and :func:`train_reward_head`
fits the head on their embeddings; the prepare stage saves it with
:func:`prelogit.rewards.save_head`, and every later stage only loads and uses it.

Only the prepare stage trains, so the training lives here, apart from :mod:`prelogit.rewards`:
this module imports from ``rewards``, never the reverse, and editing the training invalidates the
prepare stage alone (a stage's code dependencies are the import closure of what it runs).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from .checks import ParameterError, check_number
from .rewards import MiniLMEncoder, canonical_head, head_logits, vader_analyzer


def vader_labelled_utterances(n: int, seed: int, threshold: float = 0.3,
                              exclude_prompts: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """A balanced, seeded sample of chit-chat utterances labelled by VADER.

    Utterances come from :func:`prelogit.data.chitchat_utterances` (by default from conversations
    that supply no candidate prompt; see there). An utterance is positive (label 1) when its
    compound is >= ``threshold``, negative (0) when <= -``threshold``; the neutral band in between
    is dropped because VADER's sign there is mostly noise. Utterances are scored in seeded order
    until n/2 of each class are found.

    Returns:
        ``(texts, labels, compounds)``: n texts, labels (n,) int64 in {0, 1}, compounds (n,) float32,
        in the seeded draw order (positives and negatives mixed).
    """
    from .data import chitchat_utterances

    check_number("n", n, low=2, integer=True)
    check_number("threshold", threshold, low=0, high=1, high_open=True)
    if n % 2:
        raise ParameterError(f"n must be even so that the two classes are balanced, got {n}")
    pool = chitchat_utterances(None, seed, exclude_prompts=exclude_prompts)
    analyzer = vader_analyzer()
    per_class = n // 2
    kept: list[tuple[str, int, float]] = []
    counts = [0, 0]
    for text in pool:
        c = analyzer.polarity_scores(text)["compound"]
        label = 1 if c >= threshold else 0 if c <= -threshold else None
        if label is None or counts[label] >= per_class:
            continue
        counts[label] += 1
        kept.append((text, label, c))
        if counts[0] == counts[1] == per_class:
            break
    if counts[0] < per_class or counts[1] < per_class:
        raise ParameterError(f"only {counts[1]} positive and {counts[0]} negative utterances pass threshold "
                             f"{threshold} out of {len(pool)}; ask for n <= {2 * min(counts)} or lower threshold")
    texts = [t for t, _, _ in kept]
    labels = torch.tensor([lab for _, lab, _ in kept], dtype=torch.int64)
    compounds = torch.tensor([c for _, _, c in kept], dtype=torch.float32)
    return texts, labels, compounds


def train_reward_head(texts: Sequence[str] | None, labels: torch.Tensor | Sequence[int], encoder: MiniLMEncoder | None,
                      seed: int, val_fraction: float = 0.2, max_iter: int = 200, weight_decay: float = 1e-4,
                      embeddings: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fit a logistic head on sentence embeddings: full-batch L-BFGS with an L2 penalty.

    Args:
        texts: n training texts (ignored when ``embeddings`` is given).
        labels: (n,) in {0, 1}, 1 = positive sentiment.
        encoder: embeds ``texts`` once; may be None when ``embeddings`` is given.
        seed: fixes the train / held-out split; the fit itself is deterministic (zero start, L-BFGS).
        val_fraction: share of the data held out, stratified by class.
        max_iter: L-BFGS iterations (the loss is convex; ~100 suffice on 384-d embeddings).
        weight_decay: L2 penalty ``weight_decay / 2 * ||w||^2`` on the weights (not the bias), per
            sample; it sets the scale of the logits, so larger values give a tighter logit range
            (on 8,000 VADER-labelled utterances: 1e-4 gave the lowest held-out log-loss, logits
            within about +-7 with std 2.6; 1e-3 gave +-4, std 1.4, at one point less accuracy).
        embeddings: precomputed (n, d) embeddings, to reuse across fits.
    Returns:
        ``(head, metrics)``: head ``{"weight": (d,), "bias": (1,)}`` float32; metrics with held-out and
        train accuracy, log-losses, n_train, n_val, positive fractions, the held-out logit range,
        mean and std, the weight norm and the seconds spent embedding and fitting.
    """
    check_number("val_fraction", val_fraction, low=0, high=1, low_open=True, high_open=True)
    check_number("max_iter", max_iter, low=1, integer=True)
    check_number("weight_decay", weight_decay, low=0)
    check_number("seed", seed, integer=True)
    y = torch.as_tensor(labels).to(torch.int64).flatten()
    if not bool(((y == 0) | (y == 1)).all()):
        raise ParameterError("labels must be 0 (negative) or 1 (positive)")
    t0 = time.perf_counter()
    if embeddings is None:
        if encoder is None or texts is None:
            raise ParameterError("train_reward_head needs texts and an encoder, or precomputed embeddings")
        if len(texts) != len(y):
            raise ParameterError(f"got {len(texts)} texts but {len(y)} labels")
        embeddings = encoder.embed(texts)
    X = embeddings.detach().to("cpu", torch.float32)
    if X.dim() != 2 or X.shape[0] != len(y):
        raise ParameterError(f"embeddings must have shape ({len(y)}, d), got {tuple(X.shape)}")
    t_embed = time.perf_counter() - t0

    # Stratified split so that held-out accuracy is not skewed by a lopsided draw.
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for cls in (0, 1):
        idx = (y == cls).nonzero().flatten()
        if len(idx) < 2:
            raise ParameterError(f"need at least 2 examples of class {cls} to train and hold out, got {len(idx)}")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx))))
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    Xtr, ytr, Xva, yva = X[tr], y[tr].float(), X[va], y[va].float()

    t1 = time.perf_counter()
    # float64 for the fit: L-BFGS line searches are fragile in float32 near convergence.
    Xd, yd = Xtr.double(), ytr.double()
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(Xd @ w + b, yd) + 0.5 * weight_decay * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    t_fit = time.perf_counter() - t1
    head = canonical_head({"weight": w, "bias": b})

    with torch.no_grad():
        ltr, lva = head_logits(head, Xtr), head_logits(head, Xva)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        metrics = {
            "val_accuracy": float(((lva > 0).float() == yva).float().mean()),
            "train_accuracy": float(((ltr > 0).float() == ytr).float().mean()),
            "val_log_loss": float(bce(lva, yva)),
            "train_log_loss": float(bce(ltr, ytr)),
            "n_train": len(tr), "n_val": len(va),
            "train_positive_fraction": float(ytr.mean()), "val_positive_fraction": float(yva.mean()),
            "val_logit_min": float(lva.min()), "val_logit_max": float(lva.max()),
            "val_logit_mean": float(lva.mean()), "val_logit_std": float(lva.std()),
            "weight_norm": float(head["weight"].norm()), "bias": float(head["bias"][0]),
            "weight_decay": weight_decay, "seed": seed,
            "embed_seconds": t_embed, "fit_seconds": t_fit,
        }
    return head, metrics
