"""Glue shared by the pipeline notebooks: prompts, the sampler and reward from parameters,
judging, and the reward-vs-samples curves. Kept here so that the notebooks stay readable and
every stage computes the same quantity the same way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .aisp import AISPConfig, run_aisp_many
from .engine import prompt_generator, run_best_of_n_many
from .io import read_jsonl
from .metrics import distinct_ngram_diversity, expected_best_of_n
from .models import load_model
from .records import AISPIteration, AISPRecord, BestOfNRecord, CurveRow, SearchRecord
from .rewards import build_judges, build_reward, MiniLMEncoder, RewardModel
from .sampling import DEFAULT_MAX_ROWS, PrelogitSampler
from .shard import process_device, run_sharded
from .theory import kl_best_of_n


def load_prompts(path: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """Prompt records ({id, split, text, prompt}) of one split, in file order."""
    rows = [r for r in read_jsonl(path) if r["split"] == split]
    if not rows:
        raise ValueError(f"{path} has no prompts in split {split!r}; re-run the prepare stage")
    return rows[:limit] if limit else rows


def set_threads(threads: int) -> int:
    """Use ``threads`` torch CPU threads (0 keeps torch's default); returns the number in use.

    Measured on the project's 2-core machines: one thread generates as fast as two when the
    machine is idle and many times faster when anything else runs, because every small operation
    of token-by-token decoding waits for a thread hand-off.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_sampler(model_name: str, model_dtype: str, model_device: str, model_cache_dir: str,
                  max_new_tokens: int, decode: str, temperature: float, top_k: int, top_p: float,
                  model_threads: int = 0, model_max_rows: int = DEFAULT_MAX_ROWS,
                  model_device_map: str | None = None) -> tuple[PrelogitSampler, float]:
    """Load the LM and wrap it in a :class:`PrelogitSampler` (``model_max_rows`` rows per forward pass);
    returns (sampler, load seconds).

    Under ``accelerate launch`` a ``cuda`` device becomes this process's own GPU
    (:func:`prelogit.shard.process_device`); ``model_device_map: auto`` spreads the model over every
    visible GPU instead (one process).
    """
    set_threads(model_threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name, dtype=model_dtype, device=process_device(model_device),
                                  cache_dir=model_cache_dir, device_map=model_device_map)
    sampler = PrelogitSampler(model, tokenizer, max_new_tokens=max_new_tokens, decode=decode,
                              temperature=temperature, top_k=top_k, top_p=top_p, max_rows=model_max_rows)
    return sampler, time.perf_counter() - t0


def build_scorers(reward_kind: str, reward_name: str | None, reward_dtype: str, reward_head_path: str,
                  device: str = "cpu") -> tuple[RewardModel, dict[str, RewardModel], MiniLMEncoder]:
    """The optimised reward and the held-out judges (which share the MiniLM encoder), on ``device``
    (this process's own GPU under ``accelerate launch``, as for the LM)."""
    device = process_device(device)
    encoder = MiniLMEncoder(device=device)
    if reward_kind == "embedded":
        spec: dict[str, str | None] = {"kind": "embedded", "head": reward_head_path}
    else:
        spec = {"kind": reward_kind, "name": reward_name, "dtype": reward_dtype, "device": device}
    return build_reward(spec, encoder=encoder, device=device), build_judges(encoder), encoder


def judge_all(judges: Mapping[str, RewardModel], user_texts: list[str], responses: list[str]) -> dict[str, list[float]]:
    """Every judge's score for each (prompt, response) pair."""
    return {name: j.score(user_texts, responses).tolist() for name, j in judges.items()}


def best_of_n_records(sampler: PrelogitSampler, reward: RewardModel, judges: Mapping[str, RewardModel], rows: list[dict], N: int,
                      seed: int, batch_size: int) -> list[BestOfNRecord]:
    """Best-of-N records for the prompt ``rows`` (``load_prompts`` rows): N samples each, every
    prompt seeded by (seed, prompt id), every sample scored by the held-out judges; ``prompt_id``
    and ``prompt`` filled in. Under ``accelerate launch`` each process runs its share of the prompts
    and every process gets all records back, in prompt order (:func:`prelogit.shard.run_sharded`).
    """
    def run(share: list[dict]) -> list[BestOfNRecord]:
        recs = run_best_of_n_many(sampler, reward, [p["prompt"] for p in share], [p["text"] for p in share], N,
                                  [prompt_generator(seed, p["id"]) for p in share], batch_size)
        for p, rec in zip(share, recs):
            rec["prompt_id"], rec["prompt"] = p["id"], p["text"]
            rec["judges"] = judge_all(judges, [p["text"]] * len(rec["responses"]), rec["responses"])
        return recs

    return run_sharded(rows, run)


def aisp_records(sampler: PrelogitSampler, reward: RewardModel, judges: Mapping[str, RewardModel], rows: list[dict],
                 config: AISPConfig, seed: int, decode: str | None) -> list[AISPRecord]:
    """AISP records for the prompt ``rows``, all prompts in lockstep (one batched generate and one
    reward call per iteration), each seeded by (seed, prompt id), decoding given V by ``decode``;
    the held-out judges score every best-so-far answer (``best_so_far_judges``, one dict per
    iteration); ``prompt_id`` and ``prompt`` filled in. Sharded as :func:`best_of_n_records`.
    """
    def run(share: list[dict]) -> list[AISPRecord]:
        recs = run_aisp_many(sampler, reward, [p["prompt"] for p in share], [p["text"] for p in share], config,
                             [prompt_generator(seed, p["id"]) for p in share], decode=decode)
        for p, rec in zip(share, recs):
            rec["prompt_id"], rec["prompt"] = p["id"], p["text"]
            answers = [it["best_so_far"]["response"] for it in rec["iterations"]]
            scores = judge_all(judges, [p["text"]] * len(answers), answers)
            rec["best_so_far_judges"] = [{j: scores[j][k] for j in scores} for k in range(len(answers))]
        return recs

    return run_sharded(rows, run)


def bon_curve(records: Sequence[BestOfNRecord], budgets: list[int]) -> list[CurveRow]:
    """Best-of-N at each budget from the same draws, per prompt (unbiased order-statistics estimate).

    For the reward and for each judge, the judge's score of the reward-selected sample. A prompt
    with fewer than N samples has no row at N (the large budgets run on a subset of the prompts).
    The rows' ``kl`` is best-of-N's bound log N - (N - 1) / N (:data:`prelogit.records.CurveRow`).
    """
    rows: list[CurveRow] = []
    for N in budgets:
        for rec in records:
            if len(rec["rewards"]) < N:
                continue
            r = torch.tensor(rec["rewards"])
            row: CurveRow = {"N": N, "prompt_id": rec["prompt_id"], "reward": expected_best_of_n(r, N),
                             "kl": kl_best_of_n(N)}
            for name, vals in rec["judges"].items():
                row[name] = expected_best_of_n(r, N, torch.tensor(vals))
            rows.append(row)
    return rows


def aisp_curve(records: Sequence[SearchRecord]) -> list[CurveRow]:
    """AISP's best-so-far after each iteration, per prompt: budget N = B * n * k.

    Also MISVO's after each step (the misvo stage), N = K * k. The rows' ``kl`` is the mean of the
    iteration's ``kl``: for AISP records a control-space KL, for MISVO records a Monte-Carlo
    sequence-level KL (:data:`prelogit.records.CurveRow`).
    """
    rows: list[CurveRow] = []
    for rec in records:
        for it, judged in zip(rec["iterations"], rec["best_so_far_judges"]):
            row: CurveRow = {"N": it["samples_so_far"], "prompt_id": rec["prompt_id"],
                             "reward": it["best_so_far"]["reward"], "kl": float(sum(it["kl"]) / len(it["kl"]))}
            row.update(judged)
            rows.append(row)
    return rows


def mean_by(rows: Sequence[Mapping[str, Any]], key: str, value: str) -> dict[Any, float]:
    """Mean of ``value`` grouped by ``key``."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r[value])
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def by_iteration(records: Sequence[AISPRecord], ids: set[str] | None = None) -> dict[str, dict[str, float]]:
    """AISP (or frozen-U twin) records per iteration: k (as a string, JSON's key) -> the means over
    the prompts (those in ``ids``, or all) and their chains of

    - ``best_in_iteration``: the best reward of iteration k's n draws (not the best so far);
    - ``mean_reward``: the mean reward of those draws;
    - ``ess``: the effective sample size of the update (of n);
    - ``U_norm``: ||U|| after the update;
    - ``sd_reward_term``, ``sd_lr_term``: the sds over the n draws of the log-weights' reward and
      likelihood-ratio terms (:func:`prelogit.control.log_weight_terms`, U before the update);

    and ``prompts``, how many prompts reached iteration k. Every prompt runs the same chains of n
    draws, so a mean over all draws is also the mean of the per-prompt means.
    """
    its: dict[int, list[AISPIteration]] = {}
    for r in records:
        if ids is None or r["prompt_id"] in ids:
            for it in r["iterations"]:
                its.setdefault(it["k"], []).append(it)

    def mean(xs: Iterable[float]) -> float:
        xs = list(xs)
        return sum(xs) / len(xs)

    return {str(k): {"prompts": len(v), "best_in_iteration": mean(max(max(c) for c in it["rewards"]) for it in v),
                     "mean_reward": mean(x for it in v for c in it["rewards"] for x in c),
                     "ess": mean(e for it in v for e in it["ess"]), "U_norm": mean(u for it in v for u in it["U_norm"]),
                     "sd_reward_term": mean(s for it in v for s in it["sd_reward_term"]),
                     "sd_lr_term": mean(s for it in v for s in it["sd_lr_term"])}
            for k, v in sorted(its.items())}


__all__ = ["load_prompts", "build_sampler", "build_scorers", "judge_all", "best_of_n_records", "aisp_records",
           "bon_curve", "aisp_curve", "mean_by",
           "by_iteration", "distinct_ngram_diversity"]
