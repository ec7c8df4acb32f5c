"""How firmly the tune stage's search selected each reading's arm.

Successive halving (:func:`prelogit.tune.successive_halving`) keeps the arms of best mean score
(best reward minus best-of-N's on the same prompt) after each rung; the arm selected is decided at
the last rung that still has two or more arms (the *deciding rung*). Its prompts are a sample, so
the pick has sampling error: :func:`selection_frequency` resamples the deciding rung's prompts
(percentile bootstrap, with replacement) and counts how often each arm alive there would have been
selected by the same rule. It measures the prompt-sampling part of the selection's instability only:
the draws' seeds and the CPU's rounding (which act like seeds) are not resampled, and an arm dropped
at an earlier rung is not brought back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from . import verdict


class Search:
    """The tune stage's search (``search.json``) seen from one reading.

    ``arms[i]`` is arm i's configuration (with ``label`` and ``sigma_rms``, sigma in units of the
    pre-logit RMS ``search["rms"]``); ``best(i, ids)`` the best reward of arm i's N draws on each
    of those validation prompts.
    """

    def __init__(self, search: Mapping, reading: str) -> None:
        self.search, self.reading = search, reading
        self.r = search["readings"][reading]
        self.arms = search["arms"]
        self.by_arm = {row["arm"]: row for row in search["rows"]}
        self.rung0 = self.r["rungs"][0]
        self.rung0_ids = list(self.by_arm[self.rung0["arms"][0]]["per_prompt"])[: self.rung0["prompts"]]
        self.claim_ids, self.claim_arms = search["claim_prompts"], self.r["claim_arms"]
        self.factors = [k for k in self.arms[0] if k != "label"]
        self.center = self.r["center"]  # the reading's center arm (its search runs over its own arms only)

    def differs_only_in(self, i: int, keys: Sequence[str]) -> bool:
        """Whether arm i equals the center arm in every factor but ``keys``."""
        a, center = self.arms[i], self.arms[self.center]
        return all(a[k] == center[k] for k in self.factors if k not in keys)

    def best(self, i: int, ids: Sequence[str]) -> list[float]:
        return [self.by_arm[i]["per_prompt"][pid]["best"] for pid in ids]


def selection_frequency(s: Search, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Re-select the reading's arm on bootstrap resamples of its deciding rung's prompts.

    Returns:
        ``{"rung", "survival": :func:`survival`, "prompts", "arms", "selected", "frequency": {label: share of resamples where that arm
        has the best mean score, ties to the lower arm index as in the search}, "runner_up",
        "selected_minus_runner_up": verdict.compare of the selected arm's scores minus the runner-up's
        on the rung's prompts (reward units)}``; ``frequency`` is None where one arm was alone from the
        first rung on.
    Raises:
        ValueError: the search's recorded selection is not what its own scores give (a corrupt search.json).
    """
    rungs = s.r["rungs"]
    deciding = max((i for i, rg in enumerate(rungs) if len(rg["arms"]) >= 2), default=None)
    selected = s.r["selected"]
    if deciding is None:
        return {"rung": None, "survival": [], "prompts": 0, "arms": [s.arms[selected]["label"]], "selected": s.arms[selected]["label"],
                "frequency": None, "runner_up": None, "selected_minus_runner_up": None}
    rg = rungs[deciding]
    arms = sorted(rg["arms"])
    ids = list(s.by_arm[selected]["per_prompt"])[: rg["prompts"]]
    scores = np.array([[s.by_arm[a]["per_prompt"][p]["score"] for p in ids] for a in arms])  # (arms, prompts)
    means = scores.mean(axis=1)
    # np.argmax takes the first of equal means: the lower arm index, as successive_halving ranks ties
    if arms[int(np.argmax(means))] != selected:
        raise ValueError(f"the {s.reading} reading's search records arm {selected} as selected, but its scores on the "
                         f"deciding rung's {len(ids)} prompts rank arm {arms[int(np.argmax(means))]} first; "
                         "re-run the tune stage (dvc repro tune)")
    rng = np.random.default_rng([seed, deciding])  # the same resamples as survival()'s at this rung
    picks = np.argmax(scores[:, rng.integers(0, len(ids), size=(n_boot, len(ids)))].mean(axis=2), axis=0)
    counts = np.bincount(picks, minlength=len(arms))
    order = np.argsort(-means, kind="stable")
    runner = arms[int(order[1])]
    label = lambda a: s.arms[a]["label"]
    return {"rung": deciding, "survival": survival(s, n_boot=n_boot, seed=seed), "prompts": len(ids), "arms": [label(a) for a in arms], "selected": label(selected),
            "frequency": {label(a): float(c / n_boot) for a, c in zip(arms, counts)}, "runner_up": label(runner),
            "selected_minus_runner_up": verdict.compare(scores[arms.index(selected)], scores[arms.index(runner)],
                                                        n_boot=n_boot, level=level, seed=seed,
                                                        names=(label(selected), label(runner)))}


def survival(s: Search, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per rung up to the deciding one: how often the finally selected arm is among the arms kept there
    when that rung's prompts (all those seen so far) are resampled.

    Returns rows ``{"rung", "prompts", "alive", "kept", "share"}``: ``kept`` arms of the ``alive``
    ones go on (``ceil(alive / eta)``, read off the next rung; 1 at the deciding rung); with 3
    prompts a bootstrap has at most 10 distinct resamples, so a first rung's share is coarse.
    """
    rungs, selected = s.r["rungs"], s.r["selected"]
    rows = []
    for i, rg in enumerate(rungs):
        if len(rg["arms"]) < 2:
            break
        rng = np.random.default_rng([seed, i])  # one stream per rung: a rung's shares do not depend on the others
        arms = sorted(rg["arms"])
        kept = len(rungs[i + 1]["arms"]) if i + 1 < len(rungs) and len(rungs[i + 1]["arms"]) >= 2 else 1
        ids = list(s.by_arm[selected]["per_prompt"])[: rg["prompts"]]
        scores = np.array([[s.by_arm[a]["per_prompt"][p]["score"] for p in ids] for a in arms])
        means = scores[:, rng.integers(0, len(ids), size=(n_boot, len(ids)))].mean(axis=2)  # (arms, n_boot)
        # the selected arm's rank among the alive ones, ties to the lower index (a stable sort of -means)
        rank = np.argsort(np.argsort(-means, axis=0, kind="stable"), axis=0, kind="stable")[arms.index(selected)]
        rows.append({"rung": i, "prompts": len(ids), "alive": len(arms), "kept": kept, "share": float(np.mean(rank < kept))})
    return rows
