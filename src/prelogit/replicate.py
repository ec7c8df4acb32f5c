"""One seed's whole procedure, tune then test: the replicate stage's unit of work.

A conclusion holds only if it survives another seed (and float rounding on another CPU acts like
one). For each seed in params.yaml's ``replicate.seeds``, :func:`run_seed`

1. tunes each reading of the decoding given V on the validation prompts exactly as the tune stage
   does (:func:`prelogit.search.select_per_reading`: the same arms, rungs and prompts; every random
   number keyed by this seed);
2. runs on the first ``test_prompts`` test prompts, at budget N, each seeded by (seed, prompt id):
   each reading's selected configuration, its frozen-U twin (the same noise, U held at 0),
   temperature-1 best-of-N, and the best non-adaptive sampler that the samplers stage selected
   (its selection is not repeated per seed: it costs a second search; only its draws are new).

The result is per-prompt curves (best reward at every budget, judged), which the figures stage
pools with the main pipeline's seed (:mod:`prelogit.pooling`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import runs, samplers, search
from .aisp import frozen_twin
from .engine import prompt_generator
from .records import AISPRecord, BestOfNRecord, CurveRow
from .rewards import RewardModel
from .sampling import PrelogitSampler
from .shard import run_sharded
from .tune import arm_config

#: The keys of a samplers-stage selection (``results/samplers/selected.json``) that define the arm.
SAMPLER_ARM_KEYS = ("kind", "temperature", "top_p", "sigma_rms", "tau")


def sampler_arm(selected: Mapping[str, Any]) -> tuple[samplers.SamplerArm, float]:
    """The arm and the pre-logit RMS (sigma's unit for a noisy-greedy arm) of a samplers-stage selection."""
    return samplers.SamplerArm.from_dict({k: selected[k] for k in SAMPLER_ARM_KEYS if k in selected}), float(selected["rms"])


def sampler_records(sampler: PrelogitSampler, reward: RewardModel, judges: Mapping[str, RewardModel],
                    rows: Sequence[dict], arm: samplers.SamplerArm, N: int, seed: int, rms: float,
                    batch_size: int) -> list[BestOfNRecord]:
    """N draws of a non-adaptive sampler arm per prompt row, seeded by (seed, prompt id) as the samplers
    stage's test run, judged, ``prompt_id`` and ``prompt`` filled in; sharded by prompt."""
    def run(share: list[dict]) -> list[BestOfNRecord]:
        recs = samplers.run_arm_many(sampler, reward, [p["prompt"] for p in share], [p["text"] for p in share], arm, N,
                                     [prompt_generator(seed, p["id"]) for p in share], rms, batch_size)
        for p, rec in zip(share, recs):
            rec["prompt_id"], rec["prompt"] = p["id"], p["text"]
            rec["judges"] = runs.judge_all(judges, [p["text"]] * len(rec["responses"]), rec["responses"])
        return recs

    return run_sharded(list(rows), run)


def _judged_curve(records: Sequence[AISPRecord], reading: str | None = None) -> list[CurveRow]:
    return [{**row, **({"reading": reading} if reading else {})} for row in runs.aisp_curve(records)]


def run_seed(sampler: PrelogitSampler, reward: RewardModel, judges: Mapping[str, RewardModel], search_rows: Sequence[dict],
             holdout_rows: Sequence[dict], test_rows: Sequence[dict], tune_params: Mapping[str, Any], seed: int,
             N: int, max_new_tokens: int, arm: samplers.SamplerArm, arm_rms: float, batch_size: int) -> dict:
    """Tune with ``seed``, then test (module docstring).

    Returns:
        ``{"seed", "search"`` (:func:`prelogit.search.select_per_reading`'s result without its per-arm
        tables), ``"curves"``: ``{"bon", "sampler"`` (best-of-N' curves, :func:`prelogit.runs.bon_curve`
        rows), ``"aisp", "frozen"`` (per reading, :func:`prelogit.runs.aisp_curve` rows with
        ``reading``)}, ``"by_iteration"`` (per reading, :func:`prelogit.runs.by_iteration` of AISP and
        its twin), ``"new_tokens"``, ``"seconds"`` (per part, timing)}``.
    """
    import time

    t0 = time.perf_counter()
    sel = search.select_per_reading(sampler, reward, search_rows, holdout_rows, tune_params, seed, max_new_tokens)
    t1 = time.perf_counter()
    budgets = samplers.budgets_up_to(N)
    bon = runs.best_of_n_records(sampler, reward, judges, list(test_rows), N, seed, batch_size)
    smp = sampler_records(sampler, reward, judges, test_rows, arm, N, seed, arm_rms, batch_size)
    t2 = time.perf_counter()
    curves: dict[str, Any] = {"bon": runs.bon_curve(bon, budgets), "sampler": runs.bon_curve(smp, budgets),
                              "aisp": {}, "frozen": {}}
    by_iteration, new_tokens = {}, sum(r["cost"]["new_tokens"] for r in bon + smp)
    for reading, s in sel["readings"].items():
        cfg = replace(arm_config(s["arm"], sel["rms"], max_new_tokens, N), final_rollout=False)  # as transfer's
        recs = runs.aisp_records(sampler, reward, judges, list(test_rows), cfg, seed, s["decode"])
        frz = runs.aisp_records(sampler, reward, judges, list(test_rows), frozen_twin(cfg), seed, s["decode"])
        if [f["iterations"][0]["rewards"] for f in frz] != [a["iterations"][0]["rewards"] for a in recs]:
            raise RuntimeError(f"seed {seed}, {reading}: the frozen-U twin's first iteration differs from AISP's; "
                               "the pairing is broken")
        curves["aisp"][reading], curves["frozen"][reading] = _judged_curve(recs, reading), _judged_curve(frz, reading)
        by_iteration[reading] = {"aisp": runs.by_iteration(recs), "frozen": runs.by_iteration(frz)}
        new_tokens += sum(r["cost"]["new_tokens"] for r in recs + frz)
    t3 = time.perf_counter()
    summary = {k: v for k, v in sel.items() if k != "arms"}
    summary["arm_labels"] = [a["label"] for a in sel["arms"]]
    summary["readings"] = {r: {k: v for k, v in s.items() if k != "scores"} for r, s in sel["readings"].items()}
    return {"seed": seed, "search": summary, "curves": curves, "by_iteration": by_iteration, "new_tokens": new_tokens,
            "seconds": {"tune_seconds": t1 - t0, "baselines_seconds": t2 - t1, "aisp_seconds": t3 - t2}}


__all__ = ["SAMPLER_ARM_KEYS", "sampler_arm", "sampler_records", "run_seed"]
