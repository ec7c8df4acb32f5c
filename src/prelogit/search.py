"""The tuning procedure as one call: AISP's configuration chosen on validation prompts, per reading.

:func:`select_per_reading` is what the tune stage does before its claim runs (``notebooks/tune.ipynb``),
packaged so that the replicate stage can run the whole procedure, tune then test, again with
another seed:

1. sigma's unit: the RMS of the base model's pre-logits on the search's validation prompts;
2. best-of-N on every validation prompt (the reference every arm is scored against);
3. per reading of the decoding given V, successive halving over that reading's arms
   (:func:`prelogit.tune.reading_arms`, :func:`prelogit.tune.halving_within`); an arm's score on a
   prompt is its best reward at budget N minus best-of-N's (unbiased, from N base-model samples);
4. each reading's selected arm on the held-out validation prompts, which took no part in selecting it.

The seed keys every random number: the RMS samples, best-of-N's and every arm's per-prompt streams
(common random numbers across arms) and the seeded random arms. With the tune stage's parameters and
seed this reproduces its search and selection (the tune notebook keeps its inline copy until its
next re-run; ``tests/test_search.py`` checks that the two agree on the smoke configuration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

import torch

from . import tune
from .aisp import AISPConfig
from .engine import prompt_generator, run_best_of_n_many
from .gaussianity import collect_prelogits
from .metrics import expected_best_of_n, paired_difference
from .misvo import MISVOConfig
from .records import BestOfNRecord
from .rewards import RewardModel
from .sampling import PrelogitSampler
from .shard import run_sharded

#: The tune section's keys that define the arms (the sweeps around the center).
SWEEP_KEYS = ("sigma_rms", "lam_absolute", "lam_std", "alpha_mppi", "alpha_step", "tau", "n")


def prelogit_rms(sampler: PrelogitSampler, prompts: Sequence[str], samples: int, seed: int) -> float:
    """RMS per coordinate of the base model's pre-logits over ``samples`` draws of each prompt (every
    real generated token): the unit of sigma (``sigma_rms``)."""
    Z = collect_prelogits(sampler, list(prompts), samples, prompt_generator(seed, "rms"), progress=False).Z
    return float(Z.double().pow(2).mean().sqrt())


def validation_best_of_n(sampler: PrelogitSampler, reward: RewardModel, rows: Sequence[dict], N: int,
                         seed: int) -> tuple[list[BestOfNRecord], dict[str, float]]:
    """Best-of-N on the validation ``rows``: the records (``prompt_id`` filled in) and, per prompt
    id, the unbiased estimate of best-of-N's reward from its N draws. Sharded by prompt."""
    rows = list(rows)
    records: list[BestOfNRecord] = run_sharded(rows, lambda share: run_best_of_n_many(
        sampler, reward, [p["prompt"] for p in share], [p["text"] for p in share], N,
        [prompt_generator(seed, p["id"]) for p in share]))
    for p, r in zip(rows, records):
        r["prompt_id"] = p["id"]
    return records, {p["id"]: expected_best_of_n(torch.tensor(r["rewards"]), N) for p, r in zip(rows, records)}


def select_per_reading(sampler: PrelogitSampler, reward: RewardModel, search_rows: Sequence[dict],
                       holdout_rows: Sequence[dict], tune_params: Mapping[str, Any], seed: int,
                       max_new_tokens: int) -> dict:
    """Run the tune stage's search (steps 1-4 of the module docstring) with ``seed``.

    Args:
        search_rows, holdout_rows: validation prompt rows (``id``, ``prompt``, ``text``): the search's
            and the held-out ones.
        tune_params: params.yaml's ``tune`` section (``center``, the sweeps, ``readings``, ``n_random``,
            ``rungs``, ``eta``, ``N``, ``rms_samples``); its ``seed`` is ignored in favour of ``seed``.
        max_new_tokens: generation.max_new_tokens (``tau: full``).
    Returns:
        ``{"rms", "N", "seed", "arms", "blocks", "bon_at_N", "evaluations", "readings"}``; per reading
        ``{"selected": arm index, "label", "arm" (its factors), "config" (the AISPConfig as a dict),
        "decode", "rungs" (each rung's arms and mean scores), "scores" (arm -> prompt -> score),
        "val_minus_bon", "holdout_minus_bon" (paired differences, or None without held-out prompts)}``.
    """
    t = tune_params
    N = int(t["N"])
    search_rows, holdout_rows = list(search_rows), list(holdout_rows)
    rms = prelogit_rms(sampler, [p["prompt"] for p in search_rows], int(t["rms_samples"]), seed)
    _, bon_at_N = validation_best_of_n(sampler, reward, search_rows + holdout_rows, N, seed)
    arms, blocks = tune.reading_arms(t["center"], {k: t[k] for k in SWEEP_KEYS}, t["readings"], int(t["n_random"]), seed)
    configs: list[tuple[AISPConfig | MISVOConfig, str | None]] = [
        (tune.arm_config(a, rms, max_new_tokens, N), a["decode"]) for a in arms]
    by_id = {p["id"]: p for p in search_rows + holdout_rows}

    def evaluate(arm_indices: list[int], new_prompt_ids: list[str]) -> dict[tuple[int, str], float]:
        pairs = [(i, pid) for i in arm_indices for pid in new_prompt_ids]
        recs = tune.run_pairs(sampler, reward, configs, by_id, pairs, seed)
        return {(i, pid): rec["best"]["reward"] - bon_at_N[pid] for (i, pid), rec in recs.items()}

    ids = [p["id"] for p in search_rows]
    searches = {r: tune.halving_within(block, ids, list(t["rungs"]), int(t["eta"]), evaluate)
                for r, block in blocks.items()}
    held: dict[tuple[int, str], float] = {}
    if holdout_rows:  # in the tune stage's order: every reading's selected arm on every held-out prompt
        pairs = [(s["selected"], p["id"]) for s in searches.values() for p in holdout_rows]
        held = {pair: rec["best"]["reward"] - bon_at_N[pair[1]]
                for pair, rec in tune.run_pairs(sampler, reward, configs, by_id, pairs, seed).items()}
    readings = {}
    for reading, s in searches.items():
        sel = s["selected"]
        readings[reading] = {
            "selected": sel, "label": arms[sel]["label"], "arm": {k: arms[sel][k] for k in tune.FACTORS},
            "config": asdict(configs[sel][0]), "decode": configs[sel][1],
            "rungs": [{"rung": r["rung"], "prompts": r["prompts"], "arms": r["arms"],
                       "means": {str(a): m for a, m in r["means"].items()}} for r in s["rungs"]],
            "scores": {str(a): v for a, v in s["scores"].items()},
            "val_minus_bon": _minus_bon(s["scores"][sel], bon_at_N, seed),
            "holdout_minus_bon": (_minus_bon({p["id"]: held[(sel, p["id"])] for p in holdout_rows}, bon_at_N, seed)
                                  if holdout_rows else None),
        }
    return {"rms": rms, "N": N, "seed": seed, "arms": arms, "blocks": blocks, "bon_at_N": bon_at_N,
            "evaluations": sum(s["evaluations"] for s in searches.values()) + len(held), "readings": readings}


def _minus_bon(scores: Mapping[str, float], bon_at_N: Mapping[str, float], seed: int) -> dict:
    """An arm's paired difference from best-of-N over the prompts of ``scores`` (score = best - best-of-N)."""
    ids = list(scores)
    return paired_difference(torch.tensor([scores[i] + bon_at_N[i] for i in ids]),
                             torch.tensor([bon_at_N[i] for i in ids]), seed=seed).as_dict()


__all__ = ["SWEEP_KEYS", "prelogit_rms", "validation_best_of_n", "select_per_reading"]
